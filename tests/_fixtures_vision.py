"""Tiny random transformers BLIP-2 parts (the parity references for tests/test_vision.py) and the
LAVIS / MiniGPT-4 torch pickles derived from them."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2QFormerModel,
                          Blip2VisionConfig, Blip2VisionModel, OPTConfig)

# width 32 / 4 heads, and an odd split: width 36 / 3 heads (head 12), patch 7, image 28
VIT_CONFIGS = {
    "w32": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, layer_norm_eps=1e-6),
    "w36": dict(hidden_size=36, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3, image_size=28,
                patch_size=7, layer_norm_eps=1e-5),
}
QFORMER_ENCODER_WIDTH = 24


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with random values (norm scales near 1, biases and embeddings nonzero),
    so that no zero-initialised bias or unit norm can hide a conversion error."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and re.search(r"(layer_?norm\w*|LayerNorm)\.weight$", name, re.I):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            elif p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif p.ndim == 4:
                p.copy_(noise / (p.shape[1] * p.shape[2] * p.shape[3]) ** 0.5)
            else:
                p.copy_(0.5 * noise)
    return model.eval()


def vision_model(name: str) -> Blip2VisionModel:
    return randomize_(Blip2VisionModel(Blip2VisionConfig(hidden_act="gelu", qkv_bias=True, **VIT_CONFIGS[name])), 0)


def qformer_model(freq: int) -> Blip2QFormerModel:
    cfg = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                             cross_attention_frequency=freq, encoder_hidden_size=QFORMER_ENCODER_WIDTH,
                             max_position_embeddings=64, vocab_size=100)
    return randomize_(Blip2QFormerModel(cfg), freq)


def blip2_model() -> Blip2ForConditionalGeneration:
    """Vision w36 (3 blocks), Q-Former 3 layers (cross-attention every 2nd), 8 queries, tiny OPT (width 16)."""
    vcfg = Blip2VisionConfig(hidden_act="gelu", qkv_bias=True, **dict(VIT_CONFIGS["w36"], num_hidden_layers=3))
    qcfg = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                              cross_attention_frequency=2, encoder_hidden_size=36, max_position_embeddings=64,
                              vocab_size=100)
    tcfg = OPTConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                     max_position_embeddings=64, word_embed_proj_dim=16)
    cfg = Blip2Config(vision_config=vcfg.to_dict(), qformer_config=qcfg.to_dict(), text_config=tcfg.to_dict(),
                      num_query_tokens=8)
    return randomize_(Blip2ForConditionalGeneration(cfg), 7)


@torch.no_grad()
def blip2_image_embeddings(model: Blip2ForConditionalGeneration, pixels: np.ndarray) -> np.ndarray:
    """`language_projection(qformer(vision(pixels)))` `[N, Q, D_llm]`."""
    image = model.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
    queries = model.query_tokens.expand(image.shape[0], -1, -1)
    q = model.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    return model.language_projection(q).numpy()


# The documented LAVIS <- transformers renames, applied in this order (first match wins per key).
_VIT_RENAMES = [
    (r"^vision_model\.embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^vision_model\.embeddings\.class_embedding$", "cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "pos_embed"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
]
_QFORMER_RENAMES = [
    (r"^vision_model\.post_layernorm\.", "ln_vision."),
    (r"^query_tokens$", "query_tokens"),
    (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.",
     r"Qformer.bert.encoder.layer.\1.\2.self."),
    (r"^qformer\.", "Qformer.bert."),
]


def _rename(key: str, renames) -> str | None:
    for pattern, repl in renames:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def write_lavis_checkpoints(model: Blip2ForConditionalGeneration, directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """eva_vit_g.pth (flat), blip2.pth and minigpt4.pth (`{'model': ...}`) holding the same weights as
    `model`, plus ignorable extras: a ViT block beyond the kept depth, BLIP-2 text-path keys, other MiniGPT-4 keys."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    depth = model.config.vision_config.num_hidden_layers
    width = model.config.vision_config.hidden_size
    vit, blip2 = {}, {}
    for key, value in sd.items():
        fused = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", key)
        if fused:  # LAVIS keeps q and v biases; the key bias is fixed at zero
            vit[f"blocks.{fused.group(1)}.attn.q_bias"] = value[:width].clone()
            vit[f"blocks.{fused.group(1)}.attn.v_bias"] = value[2 * width:].clone()
        elif (name := _rename(key, _VIT_RENAMES)) is not None:
            vit[name] = value
        elif (name := _rename(key, _QFORMER_RENAMES)) is not None:
            blip2[name] = value
    for key in [k for k in vit if k.startswith("blocks.0.")]:  # EVA-CLIP-g's dropped last block
        vit[key.replace("blocks.0.", f"blocks.{depth}.", 1)] = vit[key] + 1
    blip2["Qformer.cls.predictions.bias"] = torch.zeros(100)
    blip2["Qformer.bert.embeddings.word_embeddings.weight"] = torch.zeros(100, 32)
    blip2["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(64, 32)
    blip2["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]
    minigpt4 = {"llama_proj.weight": sd["language_projection.weight"],
                "llama_proj.bias": sd["language_projection.bias"],
                "llama_model.embed_tokens.weight": torch.zeros(4, 16)}
    paths = {"vit": directory / "eva_vit_g.pth", "qformer": directory / "blip2.pth", "proj": directory / "minigpt4.pth"}
    torch.save(vit, paths["vit"])
    torch.save({"model": blip2, "epoch": 3}, paths["qformer"])
    torch.save({"model": minigpt4, "optimizer": {}, "epoch": 9}, paths["proj"])
    return paths
