"""The official MiniGPT-5 Lightning checkpoints (`stage1_cc3m.ckpt`, `stage2_vist.ckpt`,
`stage2_mmdialog.ckpt`) <-> a `MiniGPT5` model (REFERENCE §8).

They hold only the trainable parameters, fp32, under `torch.load(f)['state_dict']`:
stage 1 — the full embed_tokens / lm_head matrices, fc, the mapper transformer, the decoder
prompt; stage 2 — peft's `modules_to_save` copies of embed_tokens / lm_head, LoRA A/B on q/v,
and the mapper transformer (no fc, no prompt: stage-2 inference also needs the stage-1 file).
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mg5jax.convert import keymap as km
from mg5jax.convert.llama import peft_keymap
from mg5jax.convert.mapper import mapper_keymap
from mg5jax.convert.sources import CheckpointError, TorchSource, write_atomically
from mg5jax.models.llama import prepared_for_decoding
from mg5jax.models.lora import LoraLinear
from mg5jax.models.quantize import Int8Linear

log = logging.getLogger(__name__)

LLM_PREFIX = "model.llama_model."
LIGHTNING_VERSION = "2.0.2"  # the original's pinned lightning>=2.0.2, written into exported files
_STAGE1_LLM = km.KeyMap([
    km.Rule("model.embed_tokens.weight", "model.embed_tokens.embedding"),
    km.Rule("lm_head.weight", "lm_head.kernel", km.LINEAR),
])
_STAGE1_PARAMS = r"^(llm\.model\.embed_tokens\.|llm\.lm_head\.|mapper\.)"
_STAGE2_PARAMS = r"^(llm\.model\.embed_tokens\.|llm\.lm_head\.|llm\..*\.lora_[ab]$|mapper\.(encoder|decoder)\.)"
_STAGE_HOLDS = {1: "embed_tokens, lm_head and the whole mapper", 2: "embed_tokens, lm_head, the LoRA adapters "
                "and the mapper's encoder and decoder"}


OFFICIAL_LORA_SCALING = 16 / 8  # the original's peft LoraConfig(r=8, lora_alpha=16)


def _has_lora(model) -> bool:
    return any(re.search(r"\.lora_[ab]$", p) for p in km.flat_params(nnx.state(model.llm, nnx.Param)))


def _check_lora_scaling(model) -> None:
    """The official adapters were trained at scale alpha / r = 2.0: at another scale they load (only r is
    in their shapes) but compute something else."""
    scalings = {m.scaling for _, m in nnx.iter_graph(model.llm) if isinstance(m, LoraLinear)}
    if scalings != {OFFICIAL_LORA_SCALING}:
        raise CheckpointError(f"the official stage-2 LoRA runs at alpha / r = {OFFICIAL_LORA_SCALING}; this model's "
                              f"LoRA scales by {sorted(scalings)} (model.lora.alpha=16 with rank 8)")


def stage_keymap(model, stage: int) -> km.KeyMap:
    """Key map of the official stage-1 or stage-2 checkpoint for `model` (stage 2 needs LoRA on it)."""
    if stage == 1:
        return _STAGE1_LLM.prefixed(theirs=LLM_PREFIX, ours="llm.") + mapper_keymap(ours_prefix="mapper.")
    if stage == 2:
        if not _has_lora(model):
            raise CheckpointError("a stage-2 checkpoint holds LoRA adapters: build the model with LoRA "
                                  "(model.lora.enabled=True)")
        _check_lora_scaling(model)
        llm = peft_keymap(model.llm, lora_only=True, modules_to_save=True)
        transformer = km.KeyMap([r for r in mapper_keymap(ours_prefix="mapper.").rules
                                 if r.theirs.startswith("llm_to_t2i_mapping.")])
        return llm.prefixed(theirs=LLM_PREFIX, ours="llm.") + transformer
    raise ValueError(f"stage must be 1 or 2, got {stage}")


def _stage_state(model, stage: int) -> nnx.State:
    pattern = _STAGE1_PARAMS if stage == 1 else _STAGE2_PARAMS
    flat = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if re.search(pattern, ".".join(map(str, p)))]
    return nnx.from_flat_state(flat)


def load_official(model, path: str | os.PathLike, stage: int) -> list[str]:
    """Load an official Lightning checkpoint of `stage` into `model` in place (strict key match); returns
    the param paths loaded."""
    source = TorchSource([path], subkey="state_dict")
    other = 2 if stage == 1 and any(".lora_" in k for k in source) else \
        1 if stage == 2 and not any(".lora_" in k for k in source) and "fc.0.weight" in source else None
    if other is not None:
        holds = "it holds LoRA adapters" if other == 2 else "fc, no LoRA"
        raise CheckpointError(f"{path}: a stage-{other} file ({holds}), given as the stage-{stage} one (stage-2 "
                              "inference takes the released "
                              "stage1_cc3m.ckpt as stage 1 and stage2_vist.ckpt or stage2_mmdialog.ckpt as stage 2)")
    state = km.load_params(_stage_state(model, stage), source, stage_keymap(model, stage),
                           what=f"MiniGPT-5 stage-{stage} checkpoint")
    nnx.update(model, state)
    return list(km.flat_params(state))


def import_official(model, stage1_path: str | os.PathLike, stage2_path: str | os.PathLike | None = None) -> None:
    """The original's inference loading: stage 1 (fc, queries, voken rows, mapper), then stage 2 on top."""
    load_official(model, stage1_path, stage=1)
    if stage2_path is not None:
        load_official(model, stage2_path, stage=2)


def export_official(model, path: str | os.PathLike, stage: int, *, trained: Iterable[str] | None = None) -> list[str]:
    """Write `model`'s trainable set as an official stage-`stage` checkpoint (a reader sees the old file
    or the new one); returns its keys. `trained`: the param paths a run trained (`build.load_trainable`
    returns them); one the file has no place for (the LLM's layers, LoRA in a stage-1 file) is an error,
    as the file would quietly lose it. Params held narrower than fp32 are written as they are held (a
    warning names them): build with `model.frozen_dtype="float32"` for the exact values
    (`python -m mg5jax.export_official` does)."""
    import torch

    if prepared_for_decoding(model.llm) or any(isinstance(m, Int8Linear) for _, m in nnx.iter_modules(model.llm)):
        raise CheckpointError("export_official: this model's LLM was re-laid for inference (prepare_for_decoding or "
                              "int8 weights), not the layout the official files hold: export before preparing it")
    state = _stage_state(model, stage)
    held = km.flat_params(state)
    if trained is not None and (lost := sorted(set(trained) - set(held))):
        raise CheckpointError(f"an official stage-{stage} file has no place for {len(lost)} of the params this run "
                              f"trained, e.g. {', '.join(lost[:3])}: it holds {_STAGE_HOLDS[stage]}")
    if narrow := sorted(p for p, v in held.items() if jnp.finfo(v.get_value().dtype).bits < 32):
        log.warning("export_official: %d params are held below fp32 (e.g. %s): the file gets their rounded values",
                    len(narrow), narrow[0])
    arrays = dict(km.export_params(state, stage_keymap(model, stage), dtype=np.float32))
    # the version key lets Lightning's own `load_from_checkpoint` (the original's loading) read the file
    buffer = io.BytesIO()
    torch.save({"state_dict": {k: torch.from_numpy(np.require(v, requirements="C")) for k, v in arrays.items()},
                "pytorch-lightning_version": LIGHTNING_VERSION, "epoch": 0, "global_step": 0}, buffer)
    write_atomically(path, buffer.getbuffer())
    return sorted(arrays)
