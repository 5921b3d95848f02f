"""Train MiniGPT-5: `python train.py --config configs/stage2_vist.py [--config.a.b=value ...]`.

Reads the config, builds the model and the data, and runs the trainer; resumes from the newest
checkpoint in `trainer.workdir` automatically. Every `trainer.sample_every` steps the current
weights write stories for the first `sample_prompts` validation prompts to
`<workdir>/samples/step_<NNNNNN>/index.html`. Errors in the config, paths or data end the run with one
line that names the culprit.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mg5jax.cli import check_config_fields, flags_parser, logs_above_progress_bars

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (ml_collections).",
                                          lock_config=True)
log = logging.getLogger("mg5jax.train")


def check_step_counts(cfg, num_steps: int | None, opt: dict) -> None:
    """Refuse step counts that would train for nothing: micro-steps that never make a whole update, steps
    past the learning-rate schedule's end (its rate is 0 there), a validation of no batches."""
    accum, total = opt["grad_accum_steps"], opt["total_steps"]
    if num_steps and num_steps % accum:
        raise ValueError(f"trainer.num_steps={num_steps} is not a whole number of updates of {accum} micro-batches: "
                         f"the last {num_steps % accum} would be computed and never applied "
                         f"(use {num_steps - num_steps % accum} or {num_steps + accum - num_steps % accum})")
    if num_steps and total is not None and num_steps > total * accum:
        raise ValueError(f"trainer.num_steps={num_steps} runs past the learning-rate schedule, which ends after "
                         f"trainer.optimizer.total_steps={total} updates of {accum} micro-batches ({total * accum} "
                         "micro-steps): the learning rate is 0 after it, so those steps would not move the weights. "
                         "Raise total_steps with it in a new trainer.workdir, or train on from this run's weights "
                         "with model.init_from")
    if cfg.val_batches is not None and cfg.val_batches < 1:
        raise ValueError(f"val_batches={cfg.val_batches}: expected at least 1 (or None for the whole validation "
                         "set); trainer.eval_every=0 turns validation off")


def run(cfg) -> int:
    import itertools

    import jax

    from mg5jax import build, parallel
    from mg5jax.convert.sources import CheckpointError
    from mg5jax.data import pipeline
    from mg5jax.data.datasets import DataError
    from mg5jax.training.checkpoint import has_checkpoint, recorded_config
    from mg5jax.training.optimizer import check_trainable
    from mg5jax.training.trainer import (Trainer, TrainerConfig, check_schedule, check_training_mesh,
                                         request_deterministic_ops)

    if cfg.trainer.deterministic:  # before JAX starts: XLA reads its flags once
        request_deterministic_ops()
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("MG5JAX_DISTRIBUTED"):
        jax.distributed.initialize()
    build.enable_compile_cache()
    if "://" in str(cfg.trainer.workdir):
        raise ValueError(f"trainer.workdir {cfg.trainer.workdir}: a URL; checkpoints go to a local or mounted "
                         "directory (e.g. a gcsfuse mount of the bucket)")
    workdir = pathlib.Path(cfg.trainer.workdir)
    existing = next(p for p in (workdir, *workdir.absolute().parents) if p.exists())
    if existing == workdir and not workdir.is_dir():
        raise ValueError(f"trainer.workdir {workdir}: exists and is not a directory")
    if not existing.is_dir() or not os.access(existing, os.W_OK):  # e.g. a read-only mount: before any weights load
        raise ValueError(f"trainer.workdir {workdir}: not writable" + ("" if existing == workdir else
                                                                       f" ({existing} is not a writable directory)"))
    d = cfg.data
    pipeline.check_length_buckets(d.length_buckets)
    rows = cfg.loss.group_rows
    if rows < 0 or (rows and d.per_device_batch_size * jax.device_count() % rows):
        raise ValueError(f"loss.group_rows={rows} must divide the batch of data.per_device_batch_size "
                         f"{d.per_device_batch_size} × {jax.device_count()} devices (or be 0)")
    check_trainable(cfg.trainer.optimizer.trainable, "trainer.optimizer.trainable")
    build.check_model_paths(cfg)  # every path before any weights load
    build.check_precomputed_encoders(cfg)
    build.check_frozen_mapper_is_loaded(cfg)
    for field in ("train_path", "val_path"):
        if field == "train_path" or d[field]:
            build.require_file(d[field], f"data.{field}")
    per_process = d.per_device_batch_size * jax.local_device_count()
    global_batch = d.per_device_batch_size * jax.device_count()
    t = cfg.trainer.to_dict()
    opt = t["optimizer"]
    opt["grad_accum_steps"] = build.grad_accum_steps(cfg, global_batch)
    # a resume under another batch schedule is refused by the trainer too, but only once the weights are in
    try:
        saved = recorded_config(cfg.trainer.workdir)
    except CheckpointError:  # unreadable: the trainer's restore names it, with what to do
        saved = None
    check_schedule(f"{cfg.trainer.workdir} (its newest checkpoint)", (saved or {}).get("schedule"),
                   {"global_batch": global_batch, "grad_accum_steps": opt["grad_accum_steps"]})
    mesh = parallel.make_mesh(**cfg.trainer.mesh.to_dict())
    check_training_mesh(mesh)
    # the data before any weights: a malformed row or a missing image costs seconds, not a model load
    tokenizer = build.load_tokenizer(cfg)
    train_samples = build.read_samples(d.kind, d.train_path, test=False, seed=cfg.seed, strict=d.strict,
                                       tokenizer=tokenizer, field="data.train_path", required=True)
    val_samples = []
    if d.val_path:
        val_samples = build.read_samples(d.kind, d.val_path, test=False, seed=cfg.seed, strict=d.strict,
                                         tokenizer=tokenizer, field="data.val_path")
    t["eval_every"] = build.eval_every(cfg, len(train_samples), global_batch)
    check_step_counts(cfg, t["num_steps"], opt)
    if opt["total_steps"] is None and t["num_steps"]:  # the schedule ends where the run does
        opt["total_steps"] = max(1, t["num_steps"] // opt["grad_accum_steps"])
    elif opt["total_steps"] is None:
        per_epoch = build.steps_per_epoch(len(train_samples), global_batch)
        opt["total_steps"] = max(1, cfg.num_epochs * per_epoch // opt["grad_accum_steps"])
    if opt["warmup_steps"] >= opt["total_steps"]:
        log.warning("trainer.optimizer.warmup_steps=%d ≥ its %d updates: the learning rate never reaches its peak",
                    opt["warmup_steps"], opt["total_steps"])
    trainer_cfg = TrainerConfig.from_dict(t)  # its own fields checked before the weights load
    built = build.build_model(cfg, train=True, mesh=mesh, tokenizer=tokenizer)  # straight into their shardings
    log.info("batch: %d per device × %d devices × %d accumulation = %d per update; %d updates",
             d.per_device_batch_size, jax.device_count(), opt["grad_accum_steps"],
             global_batch * opt["grad_accum_steps"], opt["total_steps"])

    pad_id = built.tokenizer.ids.pad_id
    train_builder = build.make_builder(cfg, built, per_process, train=True)
    train_ds = pipeline.make_dataset(train_samples, train_builder, seed=cfg.seed, shuffle=d.shuffle, num_epochs=None)
    eval_data = None
    if d.val_path:
        if not val_samples:
            log.warning("data.val_path %s gives no samples: no validation", d.val_path)
        elif len(val_samples) < global_batch:
            log.warning("data.val_path %s: %d samples, fewer than one batch of %d: no validation", d.val_path,
                        len(val_samples), global_batch)
            val_samples = []
        elif len(val_samples) % global_batch:
            log.info("validation: whole batches of %d (the last %d samples are not used)", global_batch,
                     len(val_samples) % global_batch)
    if val_samples:  # whole batches only: a short one would not split over the devices
        val_ds = pipeline.make_dataset(val_samples, build.make_builder(cfg, built, per_process, train=False),
                                       seed=cfg.seed, shuffle=False, num_epochs=1)

        def eval_data():
            """The validation batches; a sample that stops a strict run is named with its file."""
            try:
                yield from itertools.islice(pipeline.host_batches(val_ds, pad_id), cfg.val_batches)
            except DataError as e:
                raise DataError(f"data.val_path {d.val_path}: {e}") from e

        # found now, not at the first validation: no batch at all, or (strict, a bounded validation) a bad sample
        checked = cfg.val_batches if d.strict and cfg.val_batches is not None else 1
        if t["eval_every"] and sum(1 for _ in itertools.islice(eval_data(), checked)) == 0:
            buckets = tuple(d.length_buckets)
            precomputed = (", or images missing from the precomputed folders validation reads: "
                           "data.val_input_features_dir / data.val_output_moments_dir"
                           if d.input_features_dir or d.output_moments_dir else "")
            raise DataError(f"data.val_path {d.val_path}: no validation batch can be built (see the skipped samples "
                            f"logged above, e.g. longer than the largest of data.length_buckets {buckets}{precomputed})")

    masks = (build.voken_row_masks(built.model, built.num_new_rows, cfg.trainer.optimizer.trainable)
             if cfg.model.train_new_rows_only else None)
    schedule = {"global_batch": global_batch, "grad_accum_steps": opt["grad_accum_steps"],
                "total_steps": opt["total_steps"]}
    workdir.mkdir(parents=True, exist_ok=True)  # once the config and the data are found good: an OSError names it
    # what model.init_from gave and this run does not train, as it started (that run may train on meanwhile)
    inherited = build.keep_inherited(cfg, built, cfg.trainer.workdir, resumed=has_checkpoint(cfg.trainer.workdir),
                                     mesh=mesh)
    trainer = Trainer(built.model, trainer_cfg, update_masks=masks,
                      run_config={**cfg.to_dict(), "schedule": schedule, "inherited": inherited, "cwd": os.getcwd()})
    try:
        on_sample = build.sample_hook(cfg, built, trainer) if trainer_cfg.sample_every else None
        result = trainer.fit(pipeline.host_batches(train_ds, pad_id), eval_data=eval_data, on_sample=on_sample,
                             skipped_samples=lambda: train_builder.dropped)
    finally:
        trainer.close()
    if result.preempted:
        if result.stop_signal == signal.SIGINT:  # 130, as an interrupted program: `train.py && next` stops here
            print(f"stopped by Ctrl-C at step {result.step}: checkpoint saved in {trainer_cfg.workdir}/checkpoints")
            return 130
        print(f"preempted at step {result.step}: checkpoint saved in {trainer_cfg.workdir}/checkpoints")
        return 0
    summary = ", ".join(f"{k}={v:.4g}" for k, v in result.train_metrics.items())
    print(f"finished at step {result.step}: {summary}" if summary else
          f"nothing to train: {trainer_cfg.workdir} is already at step {result.step}")
    if result.skipped_samples:
        print(f"skipped {result.skipped_samples} training samples that could not be built since this start (the "
              "warnings above say why; metrics.jsonl has skipped_samples per line)"
              + (": on all hosts; each logs its own" if jax.process_count() > 1 else ""))
    print(f"checkpoints: {trainer_cfg.workdir}/checkpoints  metrics: {trainer_cfg.workdir}/metrics.jsonl"
          + (f"  tensorboard: {trainer_cfg.workdir}/tensorboard" if trainer_cfg.tensorboard else ""))
    if trainer.best.val_loss is not None:
        print(f"best validation loss {trainer.best.val_loss:.4g}: {trainer.best.directory} "
              "(what stage 2 and infer.py load from this run)")
    return 0


def main(argv) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/jax chatter
    logging.getLogger("mg5jax").setLevel(logging.INFO)  # what was loaded, with shapes and shardings
    logs_above_progress_bars()
    cfg = _CONFIG.value
    if cfg is None:
        sys.exit("train.py: --config is required, e.g. --config configs/stage2_vist.py")
    check_config_fields("train.py", cfg, flags.FLAGS["config"].config_filename)
    from mg5jax.convert.sources import CheckpointError
    from mg5jax.data.datasets import DataError
    from mg5jax.training.trainer import NonFiniteLossError

    try:
        sys.exit(run(cfg))
    except (OSError, CheckpointError, DataError, ValueError, NonFiniteLossError) as e:
        sys.exit(f"train.py: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser("train.py"))
