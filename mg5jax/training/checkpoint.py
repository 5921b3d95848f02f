"""Training checkpoints with orbax: trainable params, optimizer state, data-iterator state, config.

Layout: `<directory>/<step>/{params, opt_state, data_state, meta}` (data_state: every process's
iterator position). Frozen parameters are never saved (they come from the pretrained weights).
Beside them a run keeps the trainable params of its best validation step (`BestCheckpoint`,
`<workdir>/best/<step>/{params, meta}`), which is what a later stage or inference loads
(`trained_params_dir`). Saves are asynchronous (the device-to-host copy happens before `save`
returns, so the arrays may be donated right after) and atomic: orbax writes into a temporary
directory and renames it when complete, so a crash mid-save leaves the previous checkpoint as the
latest good one.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mg5jax.convert.keymap import keypath_str
from mg5jax.convert.sources import CheckpointError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Restored:
    """What a checkpoint holds; `params`/`opt_state` are placed like the targets they were restored into."""

    step: int
    params: nnx.State
    opt_state: nnx.State
    data_state: Any
    config: dict | None
    metrics_window: list  # the steps since the last metrics line (their loss terms and timings)
    validation_pending: bool = False  # a stop signal cut this step's validation short: a resume does it first


def abstract_like(state: nnx.State) -> nnx.State:
    """The same tree with every array replaced by a `ShapeDtypeStruct` carrying its sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _encode_data_state(state: Any) -> dict:
    if isinstance(state, bytes):  # grain's classic DataLoader state is JSON bytes
        return {"bytes": base64.b64encode(state).decode("ascii")}
    return {"json": state}


def _decode_data_state(stored: dict) -> Any:
    if "bytes" in stored:
        return base64.b64decode(stored["bytes"])
    return stored["json"]


def _every_process(state: Any) -> dict[str, dict]:
    """`{process index: encoded state}` of every process. Orbax writes JSON items from the primary
    process only, and the hosts' iterator positions differ once their filters drop different samples."""
    mine = json.dumps(_encode_data_state(state)).encode()
    if jax.process_count() == 1:
        return {"0": json.loads(mine)}
    from jax.experimental import multihost_utils

    lengths = np.asarray(multihost_utils.process_allgather(np.asarray(len(mine), np.int64))).reshape(-1)
    buffer = np.zeros(int(lengths.max()), np.uint8)
    buffer[: len(mine)] = np.frombuffer(mine, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(buffer))
    return {str(i): json.loads(every[i, : int(n)].tobytes()) for i, n in enumerate(lengths)}


def _this_process(stored: Any, path: pathlib.Path) -> Any:
    """This process's data-iterator state from a checkpoint (one saved before per-process states holds
    a single one); a malformed one is an error naming the checkpoint."""
    where = path / "data_state"
    if not isinstance(stored, dict):
        raise CheckpointError(f"{where}: no data-iterator state (found {type(stored).__name__})")
    every = stored.get("per_process")
    if every is None:  # saved before per-process states: every process takes the one
        mine = stored
    elif not isinstance(every, dict):
        raise CheckpointError(f"{where}: per_process must map process indices to states, found {type(every).__name__}")
    elif (mine := every.get(str(jax.process_index()))) is None:
        raise CheckpointError(f"{where}: no data-iterator state for process {jax.process_index()} (it was saved "
                              f"by {len(every)} processes)")
    if not isinstance(mine, dict) or not ("bytes" in mine or "json" in mine):
        raise CheckpointError(f"{where}: process {jax.process_index()}'s state is not an encoded iterator state")
    try:
        return _decode_data_state(mine)
    except (ValueError, TypeError) as e:  # binascii.Error is a ValueError
        raise CheckpointError(f"{where}: process {jax.process_index()}'s state does not decode ({e})") from e


class Checkpointer:
    """Keeps the newest `max_to_keep` training checkpoints under `directory`."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, *, params: nnx.State, opt_state: nnx.State, data_state: Any = None,
             config: dict | None = None, metrics_window: list | None = None, validation_pending: bool = False) -> None:
        """Start saving checkpoint `step` (JSON-serialisable `data_state`, `config` and `metrics_window`;
        `validation_pending`: the step's validation is still to do)."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data_state=ocp.args.JsonSave({"per_process": _every_process(data_state)}),
            # copies: orbax serialises the JSON items later, in the background, while training goes on
            meta=ocp.args.JsonSave({"step": int(step), "config": config,
                                    "metrics_window": [dict(w) for w in metrics_window or []],
                                    "validation_pending": bool(validation_pending)}),
        )
        self._manager.save(int(step), args=args, force=True)
        log.info("checkpoint: saving step %d to %s", step, self.directory)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def restore(self, params: nnx.State, opt_state: nnx.State, step: int | None = None) -> Restored:
        """Restore checkpoint `step` (default: the latest) into targets shaped and sharded like
        `params` / `opt_state` (live states or `abstract_like` of them)."""
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no training checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(f"no training checkpoint for step {step} in {self.directory} "
                                  f"(have steps {self.all_steps()})")
        path = self.directory / str(step)
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_like(params)),
            opt_state=ocp.args.StandardRestore(abstract_like(opt_state)),
            data_state=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        # checked first: orbax's own error gives both shapes but not the array
        if mismatch := _shape_mismatch(path / "params", params) or _shape_mismatch(path / "opt_state", opt_state):
            raise CheckpointLayoutError(f"{path}: cannot restore training checkpoint ({mismatch})")
        try:
            restored = self._manager.restore(step, args=args)
            meta, data_state = restored["meta"], restored["data_state"]
            if not isinstance(meta, dict) or meta.get("step") != step:
                found = meta.get("step") if isinstance(meta, dict) else type(meta).__name__
                raise ValueError(f"its metadata is missing or names another step ({found!r})")
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds for a bad directory
            raise CheckpointError(f"{path}: cannot restore training checkpoint ({_reason(e)})") from e
        log.info("checkpoint: restored step %d from %s", step, path)
        window = meta.get("metrics_window") or []
        if not (isinstance(window, list) and all(isinstance(w, dict) for w in window)):
            log.warning("%s: ignoring its malformed metrics window (the next metrics line averages fewer steps)", path)
            window = []
        return Restored(step, restored["params"], restored["opt_state"], _this_process(data_state, path),
                        meta.get("config"), window, meta.get("validation_pending") is True)

    def recorded_config(self, step: int) -> dict | None:
        """The config recorded with checkpoint `step` (None if it recorded none)."""
        return _recorded_config(self.directory / str(step))

    def wait(self) -> None:
        """Block until pending asynchronous saves are written and committed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the background writer's error, whatever its kind
            raise CheckpointError(f"{self.directory}: writing a checkpoint failed ({type(e).__name__}: {e})") from e

    def close(self) -> None:
        self.wait()
        self._manager.close()


class BestCheckpoint:
    """The trainable params of the step with the lowest validation loss so far, under `directory`.

    What the original keeps with `ModelCheckpoint(monitor="val_loss", save_top_k=1)`, and what
    stage 2 and inference load from a run. Layout `<directory>/<step>/{params, meta}`; meta holds
    `step` and `val_loss`. Only the newest save is kept, and a save happens only on improvement.
    """

    def __init__(self, directory: str | os.PathLike, *, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self._options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=async_save, create=True)
        self._manager = None  # made on the first save: a run without validation leaves no best/
        self.val_loss = _read_best_meta(self.directory).get("val_loss")  # a resumed run keeps its bar

    def forget(self) -> None:
        """Start a fresh run's record: an earlier run's best is moved aside to `<directory>.earlier_<n>`
        (kept, but neither a bar for this run nor what stage 2 or inference load from it, even when this
        run never validates); by process 0, on the shared workdir."""
        if _complete_steps(self.directory) and jax.process_index() == 0:
            aside = set_aside(self.directory)
            log.warning("%s held an earlier run's best (val loss %s): moved to %s, this run keeps its own",
                        self.directory, "unknown" if self.val_loss is None else f"{self.val_loss:.6g}", aside)
        self.val_loss = None

    def offer(self, step: int, val_loss: float, params: nnx.State) -> bool:
        """Save `params` as step `step` if `val_loss` is lower than the best so far (a NaN never is)."""
        if not math.isfinite(val_loss) or (self.val_loss is not None and not val_loss < self.val_loss):
            return False
        if self._manager is None:
            self._manager = ocp.CheckpointManager(self.directory, options=self._options)
        if step in self._manager.all_steps():  # a resumed run that went past this step before
            self._manager.wait_until_finished()
            self._manager.delete(step)
        args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                                  meta=ocp.args.JsonSave({"step": int(step), "val_loss": float(val_loss)}))
        self._manager.save(int(step), args=args, force=True)
        log.info("best checkpoint: step %d (val loss %.6g, was %s) to %s", step, val_loss,
                 "none" if self.val_loss is None else f"{self.val_loss:.6g}", self.directory)
        self.val_loss = float(val_loss)
        return True

    def wait(self) -> None:
        if self._manager is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the background writer's error, whatever its kind
            raise CheckpointError(f"{self.directory}: writing the best checkpoint failed "
                                  f"({type(e).__name__}: {e})") from e

    def close(self) -> None:
        self.wait()
        if self._manager is not None:
            self._manager.close()


def _complete_steps(directory: pathlib.Path) -> list[int]:
    """Steps orbax finished writing under `directory` (unfinished saves live in temporary names)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _read_best_meta(directory: pathlib.Path, step: int | None = None) -> dict:
    """The metadata of best checkpoint `step` (default: the newest one; {} when there is none)."""
    if step is None:
        steps = _complete_steps(directory)
        if not steps:
            return {}
        step = steps[-1]
    path = directory / str(step) / "meta" / "metadata"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the best checkpoint's metadata ({e})") from e


class CheckpointLayoutError(CheckpointError):
    """A checkpoint whose arrays have other shapes than this run's: another model or optimizer layout,
    which the run's older checkpoints share."""


def set_aside(path: pathlib.Path) -> pathlib.Path:
    """Rename an earlier run's `path` (a file or folder in a workdir) to the first free
    `<stem>.earlier_<n><suffix>`, kept but out of this run's way; returns the new path."""
    n = 1
    while (aside := path.with_name(f"{path.stem}.earlier_{n}{path.suffix}")).exists():
        n += 1
    return path.rename(aside)


INHERITED = "inherited"  # in a run's workdir: the frozen params it started from, `<INHERITED>/params`


def save_inherited(workdir: str | os.PathLike, params: nnx.State) -> pathlib.Path:
    """Keep the params a run took from its `model.init_from` and does not train (a stage-2 run's fc and
    decoder queries) in `<workdir>/inherited/params`, so the run loads as it trained even once that
    earlier run trains on (its best step changes). Every process calls it (orbax saves collectively:
    `params` on a mesh, e.g. replicated). Returns the folder."""
    directory = pathlib.Path(workdir).absolute() / INHERITED / "params"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, params, force=True)
    checkpointer.wait_until_finished()
    return directory


def read_inherited(run_dir: str | os.PathLike) -> Any | None:
    """What `save_inherited` kept for a run (a tree of host arrays), or None for a run without it."""
    directory = pathlib.Path(run_dir) / INHERITED / "params"
    return read_params(directory) if directory.is_dir() else None


def read_params(params_dir: pathlib.Path) -> Any:
    """The params saved under `params_dir` as a tree of host arrays, whatever mesh or device count
    wrote them (orbax, left to itself, rebuilds the saving topology and refuses another one)."""
    try:
        tree = _item_metadata(params_dir)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(params_dir, target))
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a bad directory
        raise CheckpointError(f"{params_dir}: cannot read checkpoint params ({_reason(e)})") from e


def _item_metadata(item_dir: pathlib.Path) -> Any:
    """The tree of array metadata (name, shape, dtype) that a checkpoint item records."""
    absl_log = logging.getLogger("absl")
    absl_log.addFilter(_no_item_metadata_warning)
    try:
        meta = ocp.StandardCheckpointer().metadata(item_dir)
    finally:
        absl_log.removeFilter(_no_item_metadata_warning)
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)


def _shape_mismatch(item_dir: pathlib.Path, target: Any) -> str | None:
    """The first array of `target` that the checkpoint item holds with another shape, in words; None when
    there is none or the item's metadata is unreadable (the restore then says what is wrong)."""
    try:
        leaves = jax.tree_util.tree_flatten_with_path(_item_metadata(item_dir))[0]
        stored = {keypath_str(path): tuple(m.shape) for path, m in leaves}
    except Exception:  # noqa: BLE001 - a missing or corrupt item: orbax's own error says it
        return None
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = keypath_str(keypath)
        if name in stored and stored[name] != tuple(leaf.shape):
            return (f"{name} was saved with shape {stored[name]}, and this run's is {tuple(leaf.shape)}: the "
                    "checkpoint comes from another model or another optimizer layout")
    return None


def _reason(e: BaseException) -> str:
    """An orbax error in a line. TensorStore appends its whole spec (tens of lines) to its message, and only
    the error that caused it names the array that failed (e.g. `Error reading "opt.mu.value/0"` for a
    truncated file), so that one is added."""
    def line(x: BaseException) -> str:
        lines = str(x).split(" See full TensorStore details")[0].strip().splitlines() or [""]
        cut = len(lines) > 1 or len(lines[0]) > 300
        return f"{type(x).__name__}: {lines[0][:300]}{' …' if cut else ''}"

    root, seen = e, {id(e)}
    while (inner := root.__cause__ or root.__context__) is not None and id(inner) not in seen:
        root = inner
        seen.add(id(inner))
    return line(e) if root is e else f"{line(e)}; caused by {line(root)}"


def _no_item_metadata_warning(record: logging.LogRecord) -> bool:
    """Orbax warns that a checkpoint item's folder has no _CHECKPOINT_METADATA: only a step's folder has one."""
    return not record.getMessage().startswith("Metadata file does not exist")


def trained_params_dir(run_dir: str | os.PathLike, field: str) -> tuple[pathlib.Path, str]:
    """The params an earlier run of ours leaves for the next stage or inference, and how they were
    chosen: its best validation step (`best/`), else its newest training checkpoint (a run without
    validation). `field` names the setting that gave `run_dir` in errors."""
    run = pathlib.Path(run_dir).absolute()
    if run.is_file():
        raise FileNotFoundError(f"{field}: {run_dir} is a file; expected a run's directory (the trainer.workdir "
                                "that holds checkpoints/ and best/). An official MiniGPT-5 .ckpt goes to infer.py's "
                                "--official_stage1 / --official_stage2, or to model.init_from as a file named *.ckpt")
    if not run.is_dir():
        raise FileNotFoundError(f"{field}: no such directory: {run_dir}")
    best = _complete_steps(run / "best")
    if best:
        meta = _read_best_meta(run / "best", best[-1])
        return run / "best" / str(best[-1]) / "params", f"best validation step {best[-1]} " \
            f"(val loss {meta.get('val_loss', float('nan')):.6g})"
    if not (run / "checkpoints").is_dir():
        raise FileNotFoundError(f"{field}: no checkpoints/ directory in {run_dir} (give a run's directory: the "
                                "trainer.workdir that holds checkpoints/ and best/)")
    steps = _complete_steps(run / "checkpoints")
    if not steps:
        raise CheckpointError(f"{field}: no complete checkpoint in {run / 'checkpoints'}")
    return run / "checkpoints" / str(steps[-1]) / "params", f"newest checkpoint, step {steps[-1]} (no validation)"


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether a run's workdir holds a complete training checkpoint (a run there resumes from it)."""
    return bool(_complete_steps(pathlib.Path(run_dir) / "checkpoints"))


def recorded_config(run_dir: str | os.PathLike) -> dict | None:
    """The config an earlier run of ours recorded with its newest training checkpoint (what `train.py`
    ran with), or None when it has no checkpoint or recorded none."""
    checkpoints = pathlib.Path(run_dir) / "checkpoints"
    steps = _complete_steps(checkpoints)
    return _recorded_config(checkpoints / str(steps[-1])) if steps else None


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A recorded (nested) config as `{dotted key: value}`."""
    out = {}
    for k, v in tree.items():
        out.update(flat_config(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _recorded_config(step_dir: pathlib.Path) -> dict | None:
    path = step_dir / "meta" / "metadata"
    try:
        config = json.loads(path.read_text()).get("config")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint's metadata ({e})") from e
    return config if isinstance(config, dict) else None
