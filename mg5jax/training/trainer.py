"""The training loop around any model with `model.loss(batch, rng) -> {"loss", "text_loss", ...}`.

The trainer knows nothing of the model beyond that method, its parameter paths and an optional
`weighted_terms` mapping ({term: the term that counts what it is a mean over}, so that steps average
it by that count). It owns the
mesh, places the model with its logical shardings, builds the optimizer from the trainable rules,
and runs one `jax.jit` train step over the split state (trainable params and optimizer state
donated, frozen params read-only; gradients only for the trainable params). Each step's rng is
`fold_in(train_key, step)`, so a resumed run is bit-identical to an uninterrupted one. Train steps
run the model in train mode (dropout on, its "dropout" rng stream reseeded from the step's rng);
validation runs it in eval mode.

Around the step: resume from the latest checkpoint, periodic/async checkpoints with the
data-iterator state, validation that keeps the params of the best validation step (`best/`, as the
original's ModelCheckpoint(monitor="val_loss", save_top_k=1)), a sample hook, a tqdm bar, JSONL
metrics, a NaN/Inf stop that keeps the last good checkpoint, and a SIGTERM / Ctrl-C handler that saves and
returns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from mg5jax import parallel
from mg5jax.convert.sources import CheckpointError
from mg5jax.training.checkpoint import (BestCheckpoint, Checkpointer, CheckpointLayoutError, flat_config,
                                       set_aside)
from mg5jax.training.optimizer import (OptimizerConfig, UpdateMasks, build_optimizer, linear_warmup_decay,
                                      masked_global_norm, resolve_masks)
from mg5jax.training.tensorboard import EventWriter

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one may be -1 (all remaining devices)."""

    data: int = -1  # pure data parallelism (params replicated)
    fsdp: int = 1  # data parallelism with params sharded on their `embed` axis
    tensor: int = 1  # tensor parallelism (heads / mlp / vocab)


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Everything the loop needs besides the model and the data."""

    workdir: str  # checkpoints/, best/, metrics.jsonl and tensorboard/ are written here
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    seed: int = 42  # base key of the per-step rng
    num_steps: int | None = None  # micro-steps to run; None = optimizer.total_steps × grad_accum_steps
    log_every: int = 10  # steps per JSONL line (means over the window)
    save_every: int = 1000  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    async_checkpointing: bool = True  # write checkpoints in the background
    eval_every: int = 0  # steps between validations, and one at the end (0 = never)
    sample_every: int = 0  # steps between `on_sample(step)` calls (0 = never)
    tensorboard: bool = True  # also write the metrics as TensorBoard events to <workdir>/tensorboard/
    # GPU programs without atomics or autotuning (deterministic_ops), so a resume is bit-exact there as on
    # CPU and TPU; train.py asks XLA for it before JAX starts
    deterministic: bool = True

    def __post_init__(self):
        for name in ("log_every", "keep_checkpoints"):  # 0 has no "off" meaning here (orbax keeps 0 checkpoints)
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name}={getattr(self, name)}: expected at least 1")
        for name in ("save_every", "eval_every", "sample_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name}={getattr(self, name)}: expected 0 (off) or more")

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainerConfig:
        """Build from a nested mapping (e.g. `ConfigDict.to_dict()`); unknown keys are errors naming them."""
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d).difference(names))
        if unknown:
            raise ValueError(f"TrainerConfig: unknown key {unknown[0]!r}; known keys: {sorted(names)}")
        if isinstance(d.get("optimizer"), Mapping):
            d["optimizer"] = OptimizerConfig.from_dict(d["optimizer"])
        if isinstance(d.get("mesh"), Mapping):
            mesh_names = {f.name for f in dataclasses.fields(MeshConfig)}
            bad = sorted(set(d["mesh"]).difference(mesh_names))
            if bad:
                raise ValueError(f"TrainerConfig.mesh: unknown key {bad[0]!r}; known keys: {sorted(mesh_names)}")
            d["mesh"] = MeshConfig(**d["mesh"])
        return cls(**d)


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops"


def request_deterministic_ops() -> bool:
    """Ask XLA for run-to-run deterministic GPU programs (reductions and scatters without atomics, no
    autotuning), which a bit-exact resume needs there; CPU and TPU programs already are. It must run before
    JAX starts its backends, and a user's own setting of the flag wins. Returns whether it is in effect."""
    flags = os.environ.get("XLA_FLAGS", "")
    if DETERMINISTIC_FLAG not in flags:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():  # XLA has read its flags
            return False
        os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}=true".strip()
    return deterministic_ops_enabled()


def deterministic_ops_enabled() -> bool:
    """Whether XLA_FLAGS turns deterministic GPU ops on (its last setting of the flag)."""
    settings = re.findall(rf"{DETERMINISTIC_FLAG}(?:=(\S*))?(?:\s|$)", os.environ.get("XLA_FLAGS", ""))
    return bool(settings) and settings[-1].lower() in ("", "true", "1")


class NonFiniteLossError(FloatingPointError):
    """A train step produced a NaN/Inf loss term; the message names the step and the last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class FitResult:
    step: int  # micro-steps completed
    preempted: bool  # stopped by SIGTERM or Ctrl-C (after saving)
    train_metrics: dict[str, float]  # the last step's terms
    eval_metrics: dict[str, float] | None  # the last validation's means
    stop_signal: int | None = None  # the signal that stopped it (SIGTERM, SIGINT)
    skipped_samples: int = 0  # samples the data pipelines of all processes dropped during this call (see `fit`)


SKIPPED = "skipped_samples"  # a metrics line's count of samples the pipeline dropped (summed, not averaged)


def _shardings(state: nnx.State) -> nnx.State:
    return jax.tree.map(lambda x: x.sharding, state)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line a crash left half-written."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class _MetricsLog:
    """Appends one JSON object per line to `path`, from process 0 only (the loss terms are global means),
    and with `tensorboard` each number as the scalar `<split>/<name>` of a TensorBoard event file in
    `tensorboard`. Records of steps after `step` (written before a crash, past the checkpoint resumed
    from) and half-written lines are dropped first, and TensorBoard hides its events after `step`, so a
    resumed run shows each step once. A `fresh` run (no checkpoint to resume) moves an earlier run's
    records and events aside to `<name>.earlier_<n>`, as it does an earlier best/."""

    def __init__(self, path: pathlib.Path, step: int, tensorboard: pathlib.Path | None = None, *,
                 fresh: bool = False):
        self._file = self._events = None
        if jax.process_index() != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            for earlier in (path, tensorboard):
                if earlier is not None and earlier.exists() and (earlier.is_file() or any(earlier.iterdir())):
                    log.warning("%s held an earlier run's records: moved to %s", earlier, set_aside(earlier))
        elif path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if _logged_step(line) <= step]
            if len(kept) < len(lines):
                log.info("metrics.jsonl: dropped %d records after step %d", len(lines) - len(kept), step)
                path.write_text("".join(kept))
        self._file = open(path, "a")
        if tensorboard is not None:
            # the file is named by the second it opens: the step keeps a quick restart from writing over it
            self._events = EventWriter(tensorboard, purge_step=step + 1 if step else None, suffix=f".from_step_{step}")

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._events is not None:
            self._events.scalars(record["step"], {f"{record['split']}/{name}": value for name, value in record.items()
                                                  if name not in ("step", "split") and isinstance(value, (int, float))})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._events is not None:
            self._events.close()


class Trainer:
    """Owns mesh, sharded model state, optimizer, jitted steps and checkpoints for one run.

    `model` is placed on the mesh in place; read the current weights through `trainer.model`
    (the step donates the trainable arrays, so other references to them go stale). `run_config` is
    stored with every checkpoint; a resume with a different one is logged, and one whose "schedule"
    entry (what a step means: global batch, accumulation, total updates) differs is refused.
    """

    def __init__(self, model: nnx.Module, cfg: TrainerConfig, *,
                 devices: list[jax.Device] | None = None, update_masks: UpdateMasks | None = None,
                 run_config: dict | None = None):
        self.cfg = cfg
        self.workdir = pathlib.Path(cfg.workdir)
        self.mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
        check_training_mesh(self.mesh)
        if cfg.deterministic and self.mesh.devices.flat[0].platform == "gpu" and not deterministic_ops_enabled():
            log.warning("trainer.deterministic, but XLA was started without %s=true: GPU steps are not "
                        "run-to-run deterministic, so a resume is not bit-exact (call "
                        "mg5jax.training.trainer.request_deterministic_ops() before JAX starts)", DETERMINISTIC_FLAG)
        self._batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        # {term: the term counting what it is a mean over}: terms averaged over steps with those weights
        self._weighted = dict(getattr(model, "weighted_terms", {}))
        self._model = parallel.shard_model(model, self.mesh)
        tx, self.trainable = build_optimizer(model, cfg.optimizer, update_masks=update_masks)
        masks = resolve_masks(update_masks, nnx.state(model, self.trainable))
        self._optimizer = parallel.shard_model(nnx.Optimizer(model, tx, wrt=self.trainable), self.mesh)
        self._model_def, self._params, self._frozen = nnx.split(model, self.trainable, ...)
        self._opt_def, self._opt_state = nnx.split(self._optimizer)
        self._schedule = linear_warmup_decay(cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps,
                                             cfg.optimizer.total_steps)
        self._run_config = run_config if run_config is not None else dataclasses.asdict(cfg)
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints,
                                         async_save=cfg.async_checkpointing)
        self.best = BestCheckpoint(self.workdir / "best", async_save=cfg.async_checkpointing)
        self.step = 0
        self._window: list[dict[str, float]] = []  # the steps since the last metrics line
        self._started = False
        self._last_saved = None
        self._validation_pending = False  # a stop signal cut the current step's validation short
        self._stop_signal: int | None = None
        train_key, eval_key = jax.random.split(jax.random.key(cfg.seed))
        self._train_step = make_train_step(self._model_def, self._opt_def, self.trainable, train_key,
                                           param_shardings=_shardings(self._params),
                                           opt_shardings=_shardings(self._opt_state), mesh=self.mesh,
                                           grad_masks=masks)
        self._eval_step = self._make_eval_step(eval_key)
        n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self._params))
        n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.filter_state(self._frozen, nnx.Param)))
        log.info("trainer: mesh %s; %d trainable / %d frozen parameters", dict(self.mesh.shape), n_train, n_frozen)
        for line in parallel.describe(self._params):
            log.info("trainable %s", line)

    # -- jitted steps -------------------------------------------------------------------------

    def _make_eval_step(self, eval_key: jax.Array):
        model_def = self._model_def

        def eval_step(params, frozen, batch, index):
            rng = jax.random.fold_in(eval_key, index)
            return _check_terms(nnx.merge(model_def, params, frozen).loss(batch, rng))

        return jax.jit(eval_step, out_shardings=NamedSharding(self.mesh, PartitionSpec()))

    def _place_batch(self, batch: Any) -> Any:
        """Put a host batch on the mesh, its leading (batch) axis split over ('data', 'fsdp')."""

        def put(keypath, x):
            x = np.asarray(x)
            name = jax.tree_util.keystr(keypath)
            if x.dtype.kind not in "biuf":
                raise ValueError(f"batch leaf {name}: dtype {x.dtype} cannot go to the device")
            if x.ndim and x.shape[0] % self._batch_shards:
                raise ValueError(f"batch leaf {name}: batch size {x.shape[0]} is not divisible by "
                                 f"data × fsdp = {self._batch_shards}")
            sharding = (parallel.batch_sharding(self.mesh, x.ndim) if x.ndim
                        else NamedSharding(self.mesh, PartitionSpec()))
            return jax.make_array_from_process_local_data(sharding, x)

        return jax.tree_util.tree_map_with_path(put, batch)

    # -- public steps -------------------------------------------------------------------------

    @property
    def model(self) -> nnx.Module:
        """The model with the current trainable weights."""
        nnx.update(self._model, self._params)
        return self._model

    @property
    def optimizer(self) -> nnx.Optimizer:
        nnx.update(self._optimizer, self._opt_state)
        return self._optimizer

    @property
    def params(self) -> nnx.State:
        """The current trainable parameters (sharded; donated by the next step)."""
        return self._params

    @property
    def opt_state(self) -> nnx.State:
        """The current optimizer state (sharded; donated by the next step)."""
        return self._opt_state

    def lr(self, step: int | None = None) -> float:
        """Base learning rate of the last optimizer update once `step` micro-steps are done (default: now)."""
        step = self.step if step is None else step
        updates_before = max(0, step // self.cfg.optimizer.grad_accum_steps - 1)
        return float(self._schedule(updates_before))

    def train_step(self, batch: Any) -> dict[str, float]:
        """One micro-step on a host batch; returns its loss terms (and `grad_norm`) as floats.

        Raises `NonFiniteLossError` when a term is NaN/Inf (the state is then unusable).
        """
        placed = self._place_batch(batch)
        with jax.set_mesh(self.mesh):
            self._params, self._opt_state, terms = self._train_step(
                self._params, self._opt_state, self._frozen, placed, np.int32(self.step))
        terms = {k: float(v) for k, v in jax.device_get(terms).items()}
        self.step += 1
        bad = sorted(k for k, v in terms.items() if not math.isfinite(v))
        if bad:
            last = self.checkpointer.latest_step()
            raise NonFiniteLossError(
                f"non-finite {', '.join(bad)} at step {self.step} ({terms}); stopping without saving. "
                + (f"The last good checkpoint is step {last} in {self.checkpointer.directory}."
                   if last is not None else f"There is no checkpoint in {self.checkpointer.directory}."))
        return terms

    def evaluate(self, batches: Iterable, *, stop: Callable[[], object] | None = None) -> dict[str, float] | None:
        """Mean loss terms over `batches` (no gradients, deterministic per-batch rng; the model's
        `weighted_terms` weighted by their counts); None when `stop()`, asked before each batch, says so."""
        steps = []
        with jax.set_mesh(self.mesh):
            for index, batch in enumerate(batches):
                if stop is not None and stop():
                    return None
                steps.append(self._eval_step(self._params, self._frozen, self._place_batch(batch), np.int32(index)))
        if not steps:
            raise ValueError("evaluate: the validation data yielded no batches")
        return self._means([{k: float(v) for k, v in terms.items()} for terms in jax.device_get(steps)])

    def _means(self, steps: list[dict]) -> dict[str, float]:
        """The terms every step has, each averaged over the steps: summed for `skipped_samples`, weighted
        by their count for the model's `weighted_terms` (e.g. an image term by the step's groups with an
        image: a step without any adds nothing)."""
        keys = [k for k in steps[-1] if all(k in s for s in steps)]
        out = {}
        for k in keys:
            values = [s[k] for s in steps]
            weight = self._weighted.get(k)
            if k == SKIPPED:
                out[k] = int(sum(values))
            elif weight in keys:
                total = sum(s[weight] for s in steps)
                out[k] = float(sum(v * s[weight] for v, s in zip(values, steps)) / total) if total else 0.0
            else:
                out[k] = float(np.mean(values))
        return out

    # -- checkpoints --------------------------------------------------------------------------

    def save(self, data_iter: Any = None) -> None:
        """Checkpoint the current step (asynchronously), with `data_iter.get_state()` if given."""
        data_state = data_iter.get_state() if data_iter is not None else None
        self.checkpointer.save(self.step, params=self._params, opt_state=self._opt_state,
                               data_state=data_state, config=self._run_config, metrics_window=self._window,
                               validation_pending=self._validation_pending)
        self._last_saved = self.step

    def restore_latest(self, data_iter: Any = None) -> int | None:
        """Resume from the newest checkpoint in the workdir (state, step and `data_iter` position).
        Returns the restored step, or None when there is no checkpoint."""
        step = self.checkpointer.latest_step()
        if step is None:
            self.best.forget()  # a fresh run: an earlier run's best/ in this workdir sets no bar for it
            return None
        changed = []
        try:
            # the schedule first: another accumulation count also gives the optimizer state another structure
            saved, now = self.checkpointer.recorded_config(step), json.loads(json.dumps(self._run_config))
            check_schedule(f"{self.checkpointer.directory} step {step}", (saved or {}).get("schedule"),
                           now.get("schedule"))
            changed = _changed_settings(saved, now) if saved is not None else []
            restored = self.checkpointer.restore(self._params, self._opt_state, step)
        except CheckpointError as e:
            raise type(e)(f"{e}{self._restore_hint(step, changed, e)}") from e
        if data_iter is not None:
            if restored.data_state is None:  # saved without an iterator
                raise CheckpointError(f"{self.checkpointer.directory / str(step)}: has no data-iterator state"
                                      f"{self._restore_hint(step, changed, None)}")
            try:
                data_iter.set_state(restored.data_state)
            except Exception as e:  # noqa: BLE001 - the iterator's own error for a state it cannot take
                where = self.checkpointer.directory / str(step) / "data_state"
                raise CheckpointError(f"{where}: the data iterator refuses the saved position ({type(e).__name__}: "
                                      f"{e}){self._restore_hint(step, changed, e)}") from e
        self._params, self._opt_state = restored.params, restored.opt_state
        self._window = list(restored.metrics_window)  # a resumed run's metrics lines average what a straight one's do
        if changed:
            log.warning("resuming step %d with settings that differ from the checkpoint's: %s", step,
                        "; ".join(changed))
        self.step = self._last_saved = step
        self._validation_pending = restored.validation_pending
        log.info("resumed from step %d", step)
        return step

    def _restore_hint(self, step: int, changed: list[str], error: Exception | None) -> str:
        layout = isinstance(error, CheckpointLayoutError)
        if changed and (layout or "structure" in str(error)):  # e.g. another trainable set: all checkpoints have it
            return (f"; this run's settings differ from the checkpoint's ({'; '.join(changed)}): resume with "
                    "the checkpoint's settings, or use a new trainer.workdir")
        if layout:
            return "; the older checkpoints have the same layout: use a new trainer.workdir"
        older = [s for s in self.checkpointer.all_steps() if s < step]
        return (f"; to resume from the older checkpoint {older[-1]}, move {self.checkpointer.directory / str(step)} "
                "away") if older else ""

    # -- the loop -----------------------------------------------------------------------------

    def fit(self, train_iter: Iterator, *, eval_data: Callable[[], Iterable] | None = None,
            on_sample: Callable[[int], None] | None = None, num_steps: int | None = None,
            skipped_samples: Callable[[], int] | None = None) -> FitResult:
        """Train until `num_steps` micro-steps (default from the config) or the data runs out.

        `train_iter` is an iterator of host batches with `get_state()`/`set_state()` (grain's
        DatasetIterator has both); `eval_data()` returns a fresh iterable of validation batches;
        `on_sample(step)` may read `trainer.model`; `skipped_samples()`, the samples this process's
        pipeline has dropped so far (`ExampleBuilder.dropped`): each metrics line then has the number
        all processes dropped over its steps. On first use the latest checkpoint in the workdir is restored.
        Returns after a SIGTERM or a first Ctrl-C once the current step is checkpointed.
        """
        for method in ("get_state", "set_state"):
            if not callable(getattr(train_iter, method, None)):
                raise TypeError(f"fit: the data iterator {type(train_iter).__name__} has no {method}() "
                                "(needed to checkpoint its position)")
        fresh = False
        if not self._started:
            self._started = True
            fresh = self.restore_latest(train_iter) is None
        cfg = self.cfg
        self._stop_signal = None
        total = num_steps or cfg.num_steps or cfg.optimizer.total_steps * cfg.optimizer.grad_accum_steps
        metrics = _MetricsLog(self.workdir / "metrics.jsonl", self.step,
                              self.workdir / "tensorboard" if cfg.tensorboard else None, fresh=fresh)
        previous_handlers = self._install_stop_handlers()
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        terms: dict[str, float] = {}
        eval_terms, evaluated_at, first_step = None, None, self.step
        skipped_before = skipped_samples() if skipped_samples is not None else 0
        skipped_total = 0

        def validate():
            """Validate this step (a stop signal cuts it short: the checkpoint then says it is still to do)."""
            terms = self.evaluate(eval_data(), stop=self._agreed_stop)
            self._validation_pending = terms is None
            if terms is None:
                bar.write(f"step {self.step}: validation stopped by {signal.Signals(self._stop_signal).name}; "
                          "the resumed run does it first")
                return eval_terms, evaluated_at
            metrics.write({"step": self.step, "split": "eval", **terms})
            best = self.best.offer(self.step, terms["loss"], self._params)
            bar.write(f"step {self.step} eval: " + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                      + (" (best so far: saved to best/)" if best else ""))
            return terms, self.step

        try:
            if self._validation_pending:  # the validation a stop signal cut short: done before training on
                self._validation_pending = False
                if eval_data is not None and cfg.eval_every:
                    eval_terms, evaluated_at = validate()
            while self.step < total and self._agreed_stop() is None:
                try:
                    batch = next(train_iter)
                except StopIteration:
                    log.info("training data exhausted at step %d", self.step)
                    break
                start = time.perf_counter()
                terms = self.train_step(batch)
                elapsed = time.perf_counter() - start
                batch_size = int(np.shape(jax.tree.leaves(batch)[0])[0]) * jax.process_count()  # global
                record = dict(terms, step_time_s=elapsed, samples_per_s=batch_size / elapsed)
                if skipped_samples is not None:  # every host's (each reads its own slice of the data)
                    skipped_now = skipped_samples()
                    record[SKIPPED], skipped_before = _sum_over_hosts(skipped_now - skipped_before), skipped_now
                    skipped_total += record[SKIPPED]
                self._window.append(record)
                bar.update(1)
                bar.set_postfix({**{k: f"{v:.4g}" for k, v in terms.items()}, "lr": f"{self.lr():.3g}",
                                 "step_s": f"{elapsed:.3f}", "samples/s": f"{batch_size / elapsed:.1f}"})
                if self.step % cfg.log_every == 0 or self.step == total:
                    # a resumed window may hold terms this run no longer has: the ones every step has
                    metrics.write({"step": self.step, "split": "train", "lr": self.lr(), **self._means(self._window)})
                    self._window = []
                # validation and samples before the checkpoint: a run killed between them resumes from the
                # checkpoint before, and does this step's again (once saved, they would be lost). The final
                # weights are a candidate for best/ too (the original validates at each epoch's end)
                if eval_data is not None and cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == total):
                    eval_terms, evaluated_at = validate()
                if on_sample is not None and cfg.sample_every and self.step % cfg.sample_every == 0:
                    on_sample(self.step)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save(train_iter)
            stopped = self._agreed_stop()  # once more: a signal that came during the last step reaches every host
            # the data ran out before `total`: those weights are the final ones
            if eval_data is not None and cfg.eval_every and self.step > first_step and evaluated_at != self.step \
                    and stopped is None:
                eval_terms, evaluated_at = validate()
            if self._last_saved != self.step:
                self.save(train_iter)
            if self._stop_signal is not None:
                log.warning("%s: saved step %d, stopping", signal.Signals(self._stop_signal).name, self.step)
        finally:
            bar.close()
            metrics.close()
            self._restore_stop_handlers(previous_handlers)
            self.checkpointer.wait()
            self.best.wait()
        return FitResult(self.step, self._stop_signal is not None, terms, eval_terms, self._stop_signal,
                         skipped_total)

    def _agreed_stop(self) -> int | None:
        """The stop signal any process has received (None if none): every process of a multi-host run stops
        after the same step, so they save it together (a checkpoint needs all of them)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            signals = multihost_utils.process_allgather(np.int32(self._stop_signal or 0))
            self._stop_signal = int(np.max(signals)) or None
        return self._stop_signal

    def _install_stop_handlers(self) -> dict:
        """SIGTERM (a preemption) and a first Ctrl-C stop the loop after the current step, which is saved;
        a second Ctrl-C interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            del frame
            self._stop_signal = signum
            if signum == signal.SIGINT:
                log.warning("Ctrl-C: stopping after this step, once it is saved (Ctrl-C again stops without saving)")
                signal.signal(signal.SIGINT, signal.default_int_handler)

        signals = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) != signal.SIG_IGN else [])
        return {s: signal.signal(s, handler) for s in signals}  # a SIGINT the process ignores stays ignored

    def _restore_stop_handlers(self, previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def close(self) -> None:
        """Wait for pending checkpoint writes and release the checkpoint managers."""
        self.checkpointer.close()
        self.best.close()


def check_schedule(checkpoint: str, saved: dict | None, now: dict | None) -> None:
    """Refuse to resume `checkpoint` (named in the error) under another batch schedule (`{global_batch,
    grad_accum_steps, total_steps}`, compared where both have them): its steps would mean other batches
    and learning rates."""
    if saved is None or now is None:
        return
    diff = {k: (saved[k], now[k]) for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k]}
    if not diff:
        return
    if set(diff) == {"total_steps"}:  # another trainer.num_steps, from which train.py derives total_steps
        ends = diff["total_steps"][0]
        hint = (f"its learning rate would follow another schedule. To go on with this run's (it ends after {ends} "
                f"updates), add --config.trainer.optimizer.total_steps={ends}; "
                "to train longer, start a new trainer.workdir (with model.init_from set to this one to go on from "
                "its weights)")
    else:
        hint = (f"its steps would mean other batches and learning rates. Keep the global batch at "
                f"{saved.get('global_batch')} (data.per_device_batch_size × devices) with "
                f"{saved.get('grad_accum_steps')} accumulation steps, or use a new trainer.workdir")
    changes = ", ".join(f"{k} {a} → {b}" for k, (a, b) in diff.items())
    raise ValueError(f"{checkpoint} was trained with another schedule ({changes}): {hint}")


def check_training_mesh(mesh: jax.sharding.Mesh) -> None:
    """Refuse a mesh the train step cannot use."""
    if all(mesh.shape[a] > 1 for a in parallel.MESH_AXES):
        # measured with jax/jaxlib 0.10.2 on CPU: the batch over data×fsdp replicated over tensor gives
        # wrong U-Net/mapper gradients (the forward is right) with both partitioners (Shardy and GSPMD)
        raise ValueError(f"TrainerConfig.mesh {dict(mesh.shape)}: data, fsdp and tensor all > 1 is "
                         "not supported (XLA mis-partitions the diffusion backward on such meshes); "
                         "use two of the three axes")


def _sum_over_hosts(count: float) -> int:
    """A count summed over the processes of a multi-host run (each process calls it at the same point)."""
    if jax.process_count() == 1:
        return int(count)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int64(count))))


def _changed_settings(saved: dict, now: dict, limit: int = 8) -> list[str]:
    """`key: saved -> now` for the settings (dotted keys) that differ, the run's directory aside, and
    train.py's own records (the folder it ran in, the count of params kept in inherited/)."""
    a, b = flat_config(saved), flat_config(now)
    keys = [k for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not k.endswith("workdir") and k not in ("cwd", "inherited")]
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]] + (["…"] if len(keys) > limit else [])


def make_train_step(model_def: nnx.GraphDef, opt_def: nnx.GraphDef, trainable, train_key: jax.Array, *,
                    param_shardings, opt_shardings, mesh: jax.sharding.Mesh, grad_masks=None):
    """The jitted train step `(params, opt_state, frozen, batch, step) -> (params, opt_state, terms)`.

    `params` are the trainable variables (`trainable` filter), `frozen` the rest of the model,
    `opt_state` the split `nnx.Optimizer`; the step's rng is `fold_in(train_key, step)`. Params and
    optimizer state are donated and kept on `param_shardings` / `opt_shardings`; `terms` (the
    model's loss terms and `grad_norm`, the norm of the gradients after `grad_masks` as clipping sees
    it) are replicated. Call it, or `.lower()` it on
    `jax.ShapeDtypeStruct`s for an ahead-of-time compile, inside `jax.set_mesh(mesh)`.
    """

    def train_step(params, opt_state, frozen, batch, step):
        rng = jax.random.fold_in(train_key, step)

        def loss_fn(p):
            model = nnx.merge(model_def, p, frozen, copy=True)  # its own variables: dropout advances rng counts
            model.train()  # dropout on (LoRA's 0.05 in stage 2), as the original trains
            nnx.reseed(model, dropout=jax.random.fold_in(rng, 1))  # fresh masks every step, the same on resume
            terms = _check_terms(model.loss(batch, rng))
            return terms["loss"], terms

        (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        model = nnx.merge(model_def, params, frozen)
        optimizer = nnx.merge(opt_def, opt_state)
        optimizer.update(model, grads)
        terms = dict(terms, grad_norm=masked_global_norm(grads, grad_masks or {}))
        return nnx.state(model, trainable), nnx.state(optimizer), terms

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(param_shardings, opt_shardings, replicated))


def _check_terms(terms: Any) -> dict[str, jax.Array]:
    """The model's loss dict, validated at trace time: scalar floats including 'loss'."""
    if not isinstance(terms, Mapping) or "loss" not in terms:
        raise ValueError(f"model.loss(batch, rng) must return a dict with a 'loss' entry, got "
                         f"{sorted(terms) if isinstance(terms, Mapping) else type(terms).__name__}")
    for k, v in terms.items():
        if jnp.shape(v) != ():
            raise ValueError(f"model.loss(...)[{k!r}] must be a scalar, got shape {jnp.shape(v)}")
    return {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}
