"""HF LLaMA / Vicuna checkpoint keys <-> `mg5jax.models.llama` parameter paths, and peft LoRA keys.

HF keeps the half-split ("rotate_half") RoPE layout and we implement the same layout, so q/k
projections convert with a plain transpose (no head permutation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
from flax import nnx

from mg5jax.convert import keymap as km
from mg5jax.convert.sources import CheckpointError, TensorSource
from mg5jax.models import lora

_LAYER_RULES = (
    km.Rule("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.kernel", km.LINEAR),
    km.Rule("model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.kernel", km.LINEAR),
    km.Rule("model.layers.{i}.self_attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.kernel", km.LINEAR),
    km.Rule("model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.kernel", km.LINEAR),
    km.Rule("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.kernel", km.LINEAR),
    km.Rule("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.kernel", km.LINEAR),
    km.Rule("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.kernel", km.LINEAR),
    km.Rule("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.scale"),
    km.Rule("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.scale"),
)
_ROTARY_BUFFERS = r"rotary_emb\.inv_freq$"

_VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")

# peft's wrapper prefix around a causal LM (`PeftModelForCausalLM.base_model.model`)
PEFT_PREFIX = "base_model.model."


def keymap(tie_word_embeddings: bool) -> km.KeyMap:
    """The HF `LlamaForCausalLM` state-dict layout. Tied models have no `lm_head.weight` (a copy of
    the embedding that some checkpoints still carry is ignored)."""
    rules = [
        km.Rule("model.embed_tokens.weight", "model.embed_tokens.embedding"),
        *_LAYER_RULES,
        km.Rule("model.norm.weight", "model.norm.scale"),
    ]
    if tie_word_embeddings:
        return km.KeyMap(rules, ignore=[_ROTARY_BUFFERS, r"^lm_head\.weight$"])
    return km.KeyMap([*rules, km.Rule("lm_head.weight", "lm_head.kernel", km.LINEAR)], ignore=[_ROTARY_BUFFERS])


def peft_keymap(
    model: nnx.Module, *, adapter_name: str | None = "default", lora_only: bool = False,
    modules_to_save: bool = False,
) -> km.KeyMap:
    """peft's `get_peft_model(LlamaForCausalLM)` state-dict layout for a model wrapped by `lora.apply_lora`.

    A wrapped projection `q_proj` maps to `...q_proj.base_layer.weight` (peft >= 0.7 naming) plus
    `...q_proj.lora_A.<adapter>.weight` [r, in] and `...lora_B.<adapter>.weight` [out, r]; everything
    else keeps its HF key under the `base_model.model.` prefix. `adapter_name=None` gives the keys of
    a saved `adapter_model.safetensors` (no adapter segment).

    `modules_to_save=True` is MiniGPT-5's stage 2 (`modules_to_save=["lm_head", "embed_tokens"]`):
    embed_tokens / lm_head come from `...embed_tokens.modules_to_save.<adapter>.weight` (the trained
    copies) and the frozen `...original_module.weight` copies are ignored. `lora_only=True` maps only
    the trainable set, the adapters (plus the saved modules): use it with `peft_params(...)`'s state.
    """
    tied = model.config.tie_word_embeddings
    if modules_to_save and tied:
        raise ValueError("peft modules_to_save with tie_word_embeddings=True is not supported")
    base = keymap(tied)
    segment = f".{adapter_name}" if adapter_name else ""
    rules, ignore = [], []
    for path in lora.lora_paths(model):
        (bound,) = base.bind([f"{path}.kernel"])
        stem = PEFT_PREFIX + bound.theirs.removesuffix(".weight")
        if not lora_only:
            rules.append(km.Rule(f"{stem}.base_layer.weight", f"{path}.kernel", km.LINEAR))
        rules.append(km.Rule(f"{stem}.lora_A{segment}.weight", f"{path}.lora_a", km.LINEAR))
        rules.append(km.Rule(f"{stem}.lora_B{segment}.weight", f"{path}.lora_b", km.LINEAR))
    rest = list(base.rules)
    if modules_to_save:
        for rule in [r for r in rest if r.theirs in _VOCAB_KEYS]:
            theirs = PEFT_PREFIX + rule.theirs
            if adapter_name:
                theirs = theirs.removesuffix(".weight") + f".modules_to_save.{adapter_name}.weight"
            rules.append(dataclasses.replace(rule, theirs=theirs))
            rest.remove(rule)
        if adapter_name:
            ignore.append(r"\.original_module\.weight$")
    if lora_only:
        return km.KeyMap(rules, ignore)
    return km.KeyMap(rules, ignore) + km.KeyMap(rest, [p.pattern for p in base.ignore]).prefixed(theirs=PEFT_PREFIX)


def check_tied(source: TensorSource, tied: bool) -> None:
    """A tied model's file may hold a copy of the embedding as `lm_head.weight` (which the key map then
    ignores); a different matrix there means the config's tie_word_embeddings is wrong."""
    head, embed = _VOCAB_KEYS[1], _VOCAB_KEYS[0]
    if tied and head in source and embed in source and not np.array_equal(source[head], source[embed]):
        raise CheckpointError(f"{source.where(head)}: config.json says tie_word_embeddings=true, but "
                              f"{head!r} is not a copy of {embed!r}")


def peft_params(lora_only: bool = False, modules_to_save: bool = False) -> nnx.filterlib.Filter:
    """The state filter matching `peft_keymap(..., lora_only, modules_to_save)`."""
    if not lora_only:
        return nnx.Param
    if modules_to_save:
        return nnx.All(nnx.Param, nnx.Any(lora.LoraParam, nnx.PathContains("embed_tokens"),
                                          nnx.PathContains("lm_head")))
    return lora.LoraParam


def load_peft(
    model: nnx.Module, source: TensorSource, *, adapter_name: str | None = "default", lora_only: bool = False,
    modules_to_save: bool = False,
) -> None:
    """Fill a LoRA-wrapped model in place from a peft state dict (or only its trainable set)."""
    keys = peft_keymap(model, adapter_name=adapter_name, lora_only=lora_only, modules_to_save=modules_to_save)
    state = km.load_params(nnx.state(model, peft_params(lora_only, modules_to_save)), source, keys,
                           what="peft LLaMA")
    nnx.update(model, state)


def export_peft(
    model: nnx.Module, *, adapter_name: str | None = "default", lora_only: bool = False,
    modules_to_save: bool = False,
) -> Iterator[tuple[str, np.ndarray]]:
    """`(peft key, array)` for the parameters of a LoRA-wrapped model (or only its trainable set)."""
    keys = peft_keymap(model, adapter_name=adapter_name, lora_only=lora_only, modules_to_save=modules_to_save)
    return km.export_params(nnx.state(model, peft_params(lora_only, modules_to_save)), keys)
