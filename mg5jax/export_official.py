"""Write a run of ours as the original's Lightning checkpoint, for the original's code (REFERENCE §8):

    python -m mg5jax.export_official --config configs/stage1_cc3m.py --checkpoint runs/stage1_cc3m \\
        --stage 1 --out stage1_cc3m.ckpt
    python -m mg5jax.export_official --config configs/stage2_vist.py --checkpoint runs/stage2_vist \\
        --stage 2 --out stage2_vist.ckpt

The run's config (and its `--config.…` overrides; checked against the one the run recorded, as infer.py
does), or without `--config` the one the run recorded, builds the model; the run's trained params are
loaded (its best validation step, as infer.py does).
Every weight is held in float32 here, frozen ones included: a stage-1 file holds the whole embed_tokens /
lm_head matrices, whose old rows must be the LLM's own values, not bf16-rounded ones (with
`model.train_new_rows_only`, the run moved only the new rows, and the old ones come from the LLM file).
So the whole model sits in host memory in fp32 (about 35 GB at full size; `JAX_PLATFORMS=cpu` keeps it
off the accelerator). A run that trained params the stage's file has no place for (the LLM's layers, LoRA
in a stage-1 file) is refused; an existing `--out` needs `--overwrite`.
"""

from __future__ import annotations

import logging
import pathlib
import sys
from collections.abc import Sequence

from mg5jax.cli import check_config_fields, parse_flags, run_module


def _flags(argv: Sequence[str]):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    # `--config.a.b=value` overrides are defined from the config file named in `argv`
    config_flags.DEFINE_config_file("config", None, "the run's Python config file (ml_collections; default: the "
                                    "one the run recorded)", flag_values=fv,
                                    sys_argv=list(argv))
    flags.DEFINE_string("checkpoint", None, "the run's trainer.workdir (its best/ or newest checkpoint)",
                        flag_values=fv)
    flags.DEFINE_enum("stage", None, ["1", "2"], "the official layout: 1 (stage1_cc3m.ckpt) or 2 (stage2_*.ckpt)",
                      flag_values=fv)
    flags.DEFINE_string("out", None, "the .ckpt file to write", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace an existing --out file", flag_values=fv)
    return fv


def cli(argv: Sequence[str]) -> list[str]:
    """`python -m mg5jax.export_official` with `argv` (program name first): returns the keys written."""
    from mg5jax import build
    from mg5jax.convert.minigpt5 import export_official

    fv = _flags(argv)
    parse_flags("mg5jax.export_official", list(argv), fv)
    for name in ("checkpoint", "stage", "out"):
        if fv[name].value is None:
            raise ValueError(f"--{name} is required (python -m mg5jax.export_official --help)")
    if fv.config is not None:
        check_config_fields("mg5jax.export_official", fv.config, fv["config"].config_filename)
    out = pathlib.Path(fv.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give the .ckpt file to write")
    if out.exists() and not fv.overwrite:
        raise ValueError(f"--out {out} exists: give --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: no folder {out.parent}")
    build.trained_params_dir(fv.checkpoint, "--checkpoint")  # a wrong run is named before any model loads
    if fv.config is None:
        cfg = build.run_config(fv.checkpoint)
    else:
        cfg = fv.config
        build.check_run_config(cfg, fv.checkpoint)  # the run's LLM, LoRA, mapper and stage-1 weights, as infer.py
    cfg.model.frozen_dtype = "float32"  # exact values, the old vocab rows included (see the docstring)
    model = build.build_model(cfg, train=False).model
    # (a run with model.train_new_rows_only gives its new vocab rows only: the old ones are the LLM file's)
    trained, _ = build.load_run(model, fv.checkpoint, "--checkpoint", strict=True)  # and the fc, queries it kept
    keys = export_official(model, out, int(fv.stage), trained=trained)
    print(f"wrote {len(keys)} tensors of an official stage-{fv.stage} checkpoint to {out}")
    return keys


if __name__ == "__main__":
    from mg5jax.convert.sources import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        run_module("mg5jax.export_official", f"usage: python -m mg5jax.export_official [--config CONFIG "
                   f"[--config.a.b=value …]] --checkpoint RUN --stage 1|2 --out FILE [--overwrite]\n\n{__doc__}",
                   _flags, cli, (CheckpointError,))
    except KeyboardInterrupt:
        sys.exit("mg5jax.export_official: interrupted (--out is written whole or not at all)")
