"""Key map for the CLIP text tower (Stable Diffusion's `text_encoder/`).

Hub checkpoints (SD 2.1-base, transformers ≤ 4.x) prefix every key with `text_model.`;
transformers 5 saves a `CLIPTextModel` without it. Both layouts load; `position_ids` buffers
that older files carry are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

from mg5jax.convert.keymap import LINEAR, KeyMap, Rule

_LAYER = "encoder.layers.{i}."
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")

CLIP_TEXT_KEYMAP = KeyMap(
    [
        Rule("embeddings.token_embedding.weight", "embeddings.token_embedding"),
        Rule("embeddings.position_embedding.weight", "embeddings.position_embedding"),
        *(Rule(f"{_LAYER}self_attn.{p}.weight", f"layers.{{i}}.self_attn.{p}.kernel", LINEAR) for p in _PROJECTIONS),
        *(Rule(f"{_LAYER}self_attn.{p}.bias", f"layers.{{i}}.self_attn.{p}.bias") for p in _PROJECTIONS),
        Rule(f"{_LAYER}mlp.fc1.weight", "layers.{i}.mlp.fc1.kernel", LINEAR),
        Rule(f"{_LAYER}mlp.fc1.bias", "layers.{i}.mlp.fc1.bias"),
        Rule(f"{_LAYER}mlp.fc2.weight", "layers.{i}.mlp.fc2.kernel", LINEAR),
        Rule(f"{_LAYER}mlp.fc2.bias", "layers.{i}.mlp.fc2.bias"),
        Rule(f"{_LAYER}layer_norm1.weight", "layers.{i}.layer_norm1.scale"),
        Rule(f"{_LAYER}layer_norm1.bias", "layers.{i}.layer_norm1.bias"),
        Rule(f"{_LAYER}layer_norm2.weight", "layers.{i}.layer_norm2.scale"),
        Rule(f"{_LAYER}layer_norm2.bias", "layers.{i}.layer_norm2.bias"),
        Rule("final_layer_norm.weight", "final_layer_norm.scale"),
        Rule("final_layer_norm.bias", "final_layer_norm.bias"),
    ],
    ignore=[r"(^|\.)embeddings\.position_ids$"],
)

# the hub layout of SD's text_encoder/model.safetensors (`text_model.embeddings.token_embedding.weight`, ...)
CLIP_TEXT_HUB_KEYMAP = CLIP_TEXT_KEYMAP.prefixed(theirs="text_model.")


def clip_text_keymap(checkpoint_keys: Iterable[str]) -> KeyMap:
    """The key map matching a checkpoint's layout: hub (`text_model.` prefix) or transformers 5."""
    return CLIP_TEXT_HUB_KEYMAP if any(k.startswith("text_model.") for k in checkpoint_keys) else CLIP_TEXT_KEYMAP
