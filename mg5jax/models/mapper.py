"""The voken feature mapper: LLM hidden states of the 8 vokens -> Stable Diffusion text conditioning.

`fc` (Linear -> exact GELU -> Linear) lifts the LLM width to the SD text width, then a pre-LN
transformer encoder-decoder (torch `nn.Transformer(norm_first=True, batch_first=True, dropout=0)`)
encodes the vokens and decodes 77 learned queries against them. Nothing is masked; the decoder's
self-attention is not causal. See REFERENCE §2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mg5jax.models import layers


@dataclasses.dataclass(frozen=True)
class MapperConfig:
    """Sizes of the voken mapper (defaults: MiniGPT-5 with Vicuna-7B and SD 2.1-base)."""

    llm_dim: int = 4096  # LLM hidden size (input width)
    num_vokens: int = 8  # voken tokens per image (encoder length)
    hidden: int = 1024  # SD text-encoder width (d_model of the transformer)
    num_queries: int = 77  # learned decoder queries = CLIP max length
    enc_layers: int = 4  # transformer encoder layers
    dec_layers: int = 4  # transformer decoder layers
    heads: int = 8  # attention heads (torch's default nhead)
    ff: int = 4096  # feed-forward width
    layer_norm_eps: float = 1e-5  # every LayerNorm's epsilon

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MapperConfig.{f.name} must be a positive integer, got {value!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"MapperConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.hidden % self.heads:
            raise ValueError(f"MapperConfig.hidden={self.hidden} is not divisible by heads={self.heads}")

    @classmethod
    def from_dict(cls, d: Mapping) -> MapperConfig:
        """Build from a plain mapping; an unknown key is an error naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d).difference(names))
        if unknown:
            raise ValueError(f"MapperConfig: unknown key {unknown[0]!r}; known keys: {sorted(names)}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> MapperConfig:
        with open(path) as f:
            try:
                return cls.from_dict(json.load(f))
            except ValueError as e:
                raise ValueError(f"{os.fspath(path)}: {e}") from e


def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float, dtype) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _reinit(lin: nnx.Linear, kernel_bound: float, bias_bound: float, rngs: nnx.Rngs) -> nnx.Linear:
    """Give a Linear torch's init: kernel U(±kernel_bound), bias U(±bias_bound) (0 means zeros)."""
    kernel, bias = lin.kernel, lin.bias
    kernel.set_value(_uniform(rngs.params(), kernel.shape, kernel_bound, kernel.dtype))
    bias.set_value(_uniform(rngs.params(), bias.shape, bias_bound, bias.dtype) if bias_bound
                   else jnp.zeros(bias.shape, bias.dtype))
    return lin


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def _torch_linear(in_features: int, out_features: int, axes, *, dtype, param_dtype, rngs) -> nnx.Linear:
    """A Linear with torch's default init (kaiming_uniform(a=√5) = U(±1/√fan_in), same for the bias)."""
    lin = layers.linear(in_features, out_features, axes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    bound = 1.0 / math.sqrt(in_features)
    return _reinit(lin, bound, bound, rngs)


class MultiHeadAttention(nnx.Module):
    """torch `nn.MultiheadAttention` (batch_first, no masks) with separate q/k/v projections.

    Init as nn.Transformer leaves it: xavier_uniform over the fused [3·D, D] in_proj (so each of
    q/k/v gets the fused fan-out), xavier_uniform out_proj, zero biases.
    """

    def __init__(self, dim: int, heads: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.heads = heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        in_bound = _xavier_bound(dim, 3 * dim)
        self.q_proj = _reinit(layers.linear(dim, dim, ("embed", "heads"), **kw), in_bound, 0.0, rngs)
        self.k_proj = _reinit(layers.linear(dim, dim, ("embed", "heads"), **kw), in_bound, 0.0, rngs)
        self.v_proj = _reinit(layers.linear(dim, dim, ("embed", "heads"), **kw), in_bound, 0.0, rngs)
        self.out_proj = _reinit(layers.linear(dim, dim, ("heads", "embed"), **kw), _xavier_bound(dim, dim), 0.0, rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x `[B, T, D]` attends to context `[B, S, D]` -> `[B, T, D]`."""
        b, t, d = x.shape
        s = context.shape[1]
        q = self.q_proj(x).reshape(b, t, self.heads, d // self.heads)
        k = self.k_proj(context).reshape(b, s, self.heads, d // self.heads)
        v = self.v_proj(context).reshape(b, s, self.heads, d // self.heads)
        return self.out_proj(layers.attention(q, k, v).reshape(b, t, d))


def _feed_forward_linears(cfg: MapperConfig, *, dtype, param_dtype, rngs) -> tuple[nnx.Linear, nnx.Linear]:
    """linear1 `D -> ff`, linear2 `ff -> D`: xavier_uniform kernels, torch-default biases."""
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    bound = _xavier_bound(cfg.hidden, cfg.ff)
    linear1 = _reinit(layers.linear(cfg.hidden, cfg.ff, ("embed", "mlp"), **kw), bound, 1 / math.sqrt(cfg.hidden), rngs)
    linear2 = _reinit(layers.linear(cfg.ff, cfg.hidden, ("mlp", "embed"), **kw), bound, 1 / math.sqrt(cfg.ff), rngs)
    return linear1, linear2


class EncoderLayer(nnx.Module):
    """Pre-LN encoder layer: x += SelfAttn(LN1 x); x += W2 relu(W1 LN2 x). `[B, S, D] -> [B, S, D]`."""

    def __init__(self, cfg: MapperConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **kw)
        self.self_attn = MultiHeadAttention(cfg.hidden, cfg.heads, rngs=rngs, **kw)
        self.norm2 = layers.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **kw)
        self.linear1, self.linear2 = _feed_forward_linears(cfg, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        return x + self.linear2(jax.nn.relu(self.linear1(self.norm2(x))))


class DecoderLayer(nnx.Module):
    """Pre-LN decoder layer: self-attention (not causal), cross-attention to memory, ReLU FF.
    `[B, T, D]`, memory `[B, S, D]` -> `[B, T, D]`."""

    def __init__(self, cfg: MapperConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **kw)
        self.self_attn = MultiHeadAttention(cfg.hidden, cfg.heads, rngs=rngs, **kw)
        self.norm2 = layers.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **kw)
        self.cross_attn = MultiHeadAttention(cfg.hidden, cfg.heads, rngs=rngs, **kw)
        self.norm3 = layers.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **kw)
        self.linear1, self.linear2 = _feed_forward_linears(cfg, rngs=rngs, **kw)

    def __call__(self, y: jax.Array, memory: jax.Array) -> jax.Array:
        h = self.norm1(y)
        y = y + self.self_attn(h, h)
        y = y + self.cross_attn(self.norm2(y), memory)
        return y + self.linear2(jax.nn.relu(self.linear1(self.norm3(y))))


class Encoder(nnx.Module):
    """A stack of encoder layers followed by a final LayerNorm. `[B, S, D] -> [B, S, D]`."""

    def __init__(self, cfg: MapperConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.enc_layers)])
        self.norm = layers.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class Decoder(nnx.Module):
    """A stack of decoder layers followed by a final LayerNorm. `[B, T, D]`, `[B, S, D]` -> `[B, T, D]`."""

    def __init__(self, cfg: MapperConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.dec_layers)])
        self.norm = layers.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, **kw)

    def __call__(self, y: jax.Array, memory: jax.Array) -> jax.Array:
        for layer in self.layers:
            y = layer(y, memory)
        return self.norm(y)


class VokenMapper(nnx.Module):
    """Voken hidden states `[G, num_vokens, llm_dim]` -> SD conditioning `[G, num_queries, hidden]`.

    Parameter groups (as the original's): `fc_in`/`fc_out` (its `fc`), `encoder`/`decoder` (its
    `llm_to_t2i_mapping`), `decoder_queries` (its `t2i_decoder_prompt`).
    """

    def __init__(self, cfg: MapperConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.fc_in = _torch_linear(cfg.llm_dim, cfg.hidden, ("embed", "mlp"), rngs=rngs, **kw)
        self.fc_out = _torch_linear(cfg.hidden, cfg.hidden, ("mlp", "embed"), rngs=rngs, **kw)
        self.encoder = Encoder(cfg, rngs=rngs, **kw)
        self.decoder = Decoder(cfg, rngs=rngs, **kw)
        self.decoder_queries = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.num_queries, cfg.hidden), param_dtype),
            out_sharding=("queries", "embed"))

    def __call__(self, voken_hidden_states: jax.Array) -> jax.Array:
        if voken_hidden_states.ndim != 3 or voken_hidden_states.shape[-1] != self.cfg.llm_dim:
            raise ValueError(f"VokenMapper expects voken_hidden_states [G, T, {self.cfg.llm_dim}], "
                             f"got {voken_hidden_states.shape}")
        x = voken_hidden_states.astype(self.dtype)
        src = self.fc_out(layers.gelu(self.fc_in(x)))
        memory = self.encoder(src)
        queries = self.decoder_queries[...].astype(self.dtype)
        tgt = jnp.broadcast_to(queries[None], (x.shape[0],) + queries.shape)
        return self.decoder(tgt, memory)
