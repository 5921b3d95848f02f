"""The official MiniGPT-5 Lightning checkpoints (`stage1_cc3m.ckpt`, `stage2_vist.ckpt`,
`stage2_mmdialog.ckpt`) <-> a `MiniGPT5` model (REFERENCE §8).

They hold only the trainable parameters, fp32, under `torch.load(f)['state_dict']`:
stage 1 — the full embed_tokens / lm_head matrices, fc, the mapper transformer, the decoder
prompt; stage 2 — peft's `modules_to_save` copies of embed_tokens / lm_head, LoRA A/B on q/v,
and the mapper transformer (no fc, no prompt: stage-2 inference also needs the stage-1 file).
"""

from __future__ import annotations

import os
import re

import numpy as np
from flax import nnx

from mg5jax.convert import keymap as km
from mg5jax.convert.llama import peft_keymap
from mg5jax.convert.mapper import mapper_keymap
from mg5jax.convert.sources import CheckpointError, TorchSource
from mg5jax.models.lora import LoraLinear

LLM_PREFIX = "model.llama_model."
LIGHTNING_VERSION = "2.0.2"  # the original's pinned lightning>=2.0.2, written into exported files
_STAGE1_LLM = km.KeyMap([
    km.Rule("model.embed_tokens.weight", "model.embed_tokens.embedding"),
    km.Rule("lm_head.weight", "lm_head.kernel", km.LINEAR),
])
_STAGE1_PARAMS = r"^(llm\.model\.embed_tokens\.|llm\.lm_head\.|mapper\.)"
_STAGE2_PARAMS = r"^(llm\.model\.embed_tokens\.|llm\.lm_head\.|llm\..*\.lora_[ab]$|mapper\.(encoder|decoder)\.)"


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


def load_official(model, path: str | os.PathLike, stage: int) -> None:
    """Load an official Lightning checkpoint of `stage` into `model` in place (strict key match)."""
    source = TorchSource([path], subkey="state_dict")
    state = km.load_params(_stage_state(model, stage), source, stage_keymap(model, stage),
                           what=f"MiniGPT-5 stage-{stage} checkpoint")
    nnx.update(model, state)


def import_official(model, stage1_path: str | os.PathLike, stage2_path: str | os.PathLike | None = None) -> None:
    """The original's inference loading: stage 1 (fc, queries, voken rows, mapper), then stage 2 on top."""
    load_official(model, stage1_path, stage=1)
    if stage2_path is not None:
        load_official(model, stage2_path, stage=2)


def export_official(model, path: str | os.PathLike, stage: int) -> list[str]:
    """Write `model`'s trainable set as an official stage-`stage` checkpoint; returns its keys."""
    import torch

    arrays = dict(km.export_params(_stage_state(model, stage), stage_keymap(model, stage), dtype=np.float32))
    # the version key lets Lightning's own `load_from_checkpoint` (the original's loading) read the file
    torch.save({"state_dict": {k: torch.from_numpy(np.require(v, requirements="C")) for k, v in arrays.items()},
                "pytorch-lightning_version": LIGHTNING_VERSION, "epoch": 0, "global_step": 0}, path)
    return sorted(arrays)
