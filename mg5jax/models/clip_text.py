"""CLIP text encoder: Stable Diffusion's prompt encoder (`text_encoder/`).

SD 2.1-base uses the OpenCLIP ViT-H text tower without its last layer (23 layers, width 1024,
`gelu`); SD 1.x uses OpenAI CLIP ViT-L (12 layers, width 768, `quick_gelu`). Both are pre-LN
transformers with learned absolute positions, a causal mask and a final LayerNorm; the output that
conditions the U-Net is `last_hidden_state [B, 77, D]`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mg5jax.convert import keymap as km
from mg5jax.convert.clip import clip_text_keymap
from mg5jax.convert.sources import open_weights
from mg5jax.models import layers


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers `CLIPTextConfig` that shape the text tower."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict, where: str = "text_encoder config") -> CLIPTextConfig:
        """From a transformers `config.json` dict (a `clip_text_model`, or a `clip` model's `text_config`)."""
        if d.get("model_type") == "clip":
            d = d.get("text_config") or {}
        elif d.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"{where}: model_type={d['model_type']!r}, expected 'clip_text_model'")
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        layers.activation(cfg.hidden_act, where=f"{where}: hidden_act")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"{where}: hidden_size={cfg.hidden_size} is not a multiple of "
                f"num_attention_heads={cfg.num_attention_heads}")
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CLIPTextConfig:
        return cls.from_hf(json.loads(pathlib.Path(path).read_text()), where=str(path))


class CLIPTextEmbeddings(nnx.Module):
    """Token plus learned absolute position embeddings: ids `[B, T]` -> `[B, T, D]`."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.dtype = dtype
        self.token_embedding = nnx.Param(
            init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype), out_sharding=("vocab", "embed"))
        self.position_embedding = nnx.Param(
            init(rngs.params(), (cfg.max_position_embeddings, cfg.hidden_size), param_dtype),
            out_sharding=("length", "embed"))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        t = input_ids.shape[-1]
        tokens = jnp.take(self.token_embedding[...], input_ids, axis=0)
        return (tokens + self.position_embedding[...][:t]).astype(self.dtype)


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with biases: `[B, T, D] -> [B, T, D]`."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = cfg.num_attention_heads
        self.q_proj = layers.linear(d, d, ("embed", "heads"), **kw)
        self.k_proj = layers.linear(d, d, ("embed", "heads"), **kw)
        self.v_proj = layers.linear(d, d, ("embed", "heads"), **kw)
        self.out_proj = layers.linear(d, d, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, d = x.shape
        heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)  # noqa: E731
        out = layers.attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), mask=mask)
        return self.out_proj(out.reshape(b, t, d))


class CLIPMLP(nnx.Module):
    """fc1 -> activation -> fc2: `[B, T, D] -> [B, T, D]`."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = layers.activation(cfg.hidden_act)
        self.fc1 = layers.linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = layers.linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer layer: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.self_attn = CLIPAttention(cfg, **kw)
        self.layer_norm2 = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(cfg, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nnx.Module):
    """CLIP text tower: ids `[B, T]` (+ optional padding mask `[B, T]`) -> `last_hidden_state [B, T, D]`."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg, **kw)
        self.layers = nnx.List([CLIPEncoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
        self.final_layer_norm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """`attention_mask` (1 = token, 0 = padding) stops every query from attending to padded keys,
        as transformers does when a mask is passed; without it only the causal mask applies."""
        t = input_ids.shape[-1]
        mask = jnp.tril(jnp.ones((t, t), jnp.bool_))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(jnp.bool_)[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_layer_norm(x)

    @classmethod
    def from_pretrained(cls, text_encoder_dir: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                        mesh: jax.sharding.Mesh | None = None) -> CLIPTextModel:
        """Load a transformers `CLIPTextModel` directory (`config.json` + safetensors or `.bin`)."""
        directory = pathlib.Path(text_encoder_dir)
        cfg = CLIPTextConfig.from_json(directory / "config.json")
        graphdef, abstract = km.abstract_model(
            lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=km.abstract_rngs()))
        source = open_weights(directory)
        state = km.load_params(abstract, source, clip_text_keymap(source.keys()), mesh=mesh,
                               what=f"CLIP text encoder {directory}")
        return km.materialize(graphdef, state)


def encode_prompts(tokenizer, texts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize prompts as Stable Diffusion does (pad to `model_max_length`, truncate):
    ids `[B, 77]` int32 and attention mask `[B, 77]` int32."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    enc = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
