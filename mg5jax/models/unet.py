"""Stable Diffusion's conditional U-Net (diffusers `UNet2DConditionModel`, SD 1.x and 2.x) in Flax NNX.

`sample [B, C, h, w]` (NCHW, as diffusers) + `timesteps [B] or scalar` + `encoder_hidden_states
[B, L, D]` -> ε-prediction `[B, C, h, w]`. Inside, activations are NHWC.

Layout (diffusers' names, which the checkpoint key map mirrors):
  conv_in -> time_embedding (sinusoidal -> linear_1 -> act -> linear_2)
  down_blocks[i]: resnets (+ attentions: Transformer2DModel after each resnet) (+ downsampler)
  mid_block: resnet, (attention, resnet)
  up_blocks[i]: layers_per_block + 1 resnets on [h ‖ skip] (+ attentions) (+ upsampler)
  conv_norm_out -> act -> conv_out
Note diffusers' naming quirk, kept here: a config's `attention_head_dim` is the number of heads of
each block (head size = block channels // heads) whenever `num_attention_heads` is null.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mg5jax.convert import keymap as km
from mg5jax.convert.diffusers import unet_keymap
from mg5jax.convert.sources import open_weights, write_sharded_safetensors, write_atomically
from mg5jax.models import layers

CROSS_ATTN_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID = "UNetMidBlock2DCrossAttn"
WEIGHTS_STEM = "diffusion_pytorch_model"

# diffusers config keys whose only supported value is the one given (SD 1.x / 2.x use these).
_UNET_FIXED = {
    "center_input_sample": False,
    "mid_block_type": MID,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "num_attention_heads": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "reverse_transformer_layers_per_block": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
    "dropout": 0.0,
}
# read by diffusers only when a feature rejected above is on
_UNET_IGNORED = ("addition_embed_type_num_heads",)


def check_fixed(config: dict, fixed: dict, where: str, what: str) -> None:
    """Reject config values mg5jax does not implement, naming the key and the file."""
    for key, supported in fixed.items():
        if key not in config:
            continue
        value = config[key]
        if isinstance(supported, bool) and isinstance(value, (list, tuple)):
            ok = all(v is supported for v in value)  # per-block flags, e.g. only_cross_attention
        elif supported is None or isinstance(supported, bool):
            ok = value is supported
        else:
            ok = value == supported
        if not ok:
            raise ValueError(
                f"{where}: unsupported {what} config {key}={value!r} (mg5jax supports only {supported!r})")


def check_known(config: dict, known, where: str, what: str) -> None:
    """Reject config keys mg5jax does not know (keys starting with "_" are metadata)."""
    for key in config:
        if not key.startswith("_") and key not in known:
            raise ValueError(f"{where}: unknown {what} config key {key!r}")


def per_block(config: dict, key: str, default, n: int, where: str) -> tuple:
    """An int-or-list config value as one entry per block."""
    value = config.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != n or not all(isinstance(v, int) for v in value):
            raise ValueError(f"{where}: {key}={value!r} must be an int or {n} ints (one per block)")
        return tuple(value)
    if not isinstance(value, int):
        raise ValueError(f"{where}: {key}={value!r} must be an int or {n} ints (one per block)")
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """A diffusers UNet2DConditionModel config (defaults: SD 2.1-base), with per-block values expanded."""

    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # ε channels out
    sample_size: int | tuple[int, ...] | None = 64  # latent size the model was trained at (informational)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per resolution level
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN,) * 3 + (DOWN,)
    up_block_types: tuple[str, ...] = (UP,) + (CROSS_ATTN_UP,) * 3
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)  # resnets per down block (up blocks have one more)
    num_attention_heads: tuple[int, ...] = (5, 10, 20, 20)  # heads per level (diffusers' attention_head_dim)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)  # BasicTransformerBlocks per attention
    cross_attention_dim: tuple[int, ...] = (1024,) * 4  # width of encoder_hidden_states, per level
    use_linear_projection: bool = True  # SD 2.x: linear proj_in/out; SD 1.x: 1x1 convs (same maths)
    upcast_attention: bool = False  # attention scores in fp32
    flip_sin_to_cos: bool = True  # timestep embedding order cos ‖ sin
    freq_shift: float = 0.0  # timestep embedding frequency denominator shift
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    time_embedding_dim: int | None = None  # default 4 * block_out_channels[0]
    time_embedding_act_fn: str | None = None  # activation after the time embedding MLP
    timestep_post_act: str | None = None  # activation at the end of the time embedding MLP
    remat: bool = False  # rematerialise each down/mid/up block in the backward pass
    attention_impl: layers.AttentionImpl = "reference"  # layers.attention implementation

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "layers_per_block", "num_attention_heads",
                     "transformer_layers_per_block", "cross_attention_dim"):  # fmt: skip
            if len(getattr(self, name)) != n:
                raise ValueError(f"UNetConfig.{name} needs {n} entries (one per block), got {getattr(self, name)!r}")
        for name, allowed in (("down_block_types", (CROSS_ATTN_DOWN, DOWN)), ("up_block_types", (CROSS_ATTN_UP, UP))):
            bad = [t for t in getattr(self, name) if t not in allowed]
            if bad:
                raise ValueError(f"UNetConfig.{name}: unsupported block type {bad[0]!r}; supported: {allowed}")
        if self.attention_impl not in ("reference", "fused"):
            raise ValueError(f"UNetConfig.attention_impl={self.attention_impl!r}: expected 'reference' or 'fused'")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_hf(cls, config: dict, where: str = "U-Net config") -> UNetConfig:
        """Parse a diffusers `unet/config.json` dict; unsupported values raise naming the key."""
        check_known(config, {f.name for f in dataclasses.fields(cls) if f.name not in ("remat", "attention_impl",
                             "num_attention_heads")} | set(_UNET_FIXED) | set(_UNET_IGNORED)
                    | {"attention_head_dim", "mid_block_only_cross_attention"}, where, "U-Net")  # fmt: skip
        check_fixed(config, _UNET_FIXED, where, "U-Net")
        if config.get("norm_num_groups", 32) is None:
            raise ValueError(f"{where}: unsupported U-Net config norm_num_groups=None (GroupNorm is required)")
        blocks = tuple(config.get("block_out_channels", cls.block_out_channels))
        n = len(blocks)
        down = tuple(config.get("down_block_types", cls.down_block_types))
        up = tuple(config.get("up_block_types", cls.up_block_types))
        if len(down) != n or len(up) != n:
            raise ValueError(f"{where}: down_block_types, up_block_types and block_out_channels differ in length")
        if config.get("mid_block_only_cross_attention") not in (None, False):
            raise ValueError(f"{where}: unsupported U-Net config mid_block_only_cross_attention="
                             f"{config['mid_block_only_cross_attention']!r} (mg5jax supports only None / False)")
        tlpb = config.get("transformer_layers_per_block", 1)
        if isinstance(tlpb, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in tlpb):
            raise ValueError(f"{where}: unsupported U-Net config transformer_layers_per_block={tlpb!r} (nested lists)")
        sample_size = config.get("sample_size", cls.sample_size)
        return cls(
            in_channels=config.get("in_channels", 4),
            out_channels=config.get("out_channels", 4),
            sample_size=tuple(sample_size) if isinstance(sample_size, list) else sample_size,
            block_out_channels=blocks,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=per_block(config, "layers_per_block", 2, n, where),
            num_attention_heads=per_block(config, "attention_head_dim", 8, n, where),
            transformer_layers_per_block=per_block(config, "transformer_layers_per_block", 1, n, where),
            cross_attention_dim=per_block(config, "cross_attention_dim", 1280, n, where),
            use_linear_projection=bool(config.get("use_linear_projection", False)),
            upcast_attention=bool(config.get("upcast_attention", False)),
            flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
            freq_shift=float(config.get("freq_shift", 0)),
            norm_num_groups=config.get("norm_num_groups", 32),
            norm_eps=float(config.get("norm_eps", 1e-5)),
            act_fn=config.get("act_fn", "silu"),
            downsample_padding=config.get("downsample_padding", 1),
            mid_block_scale_factor=float(config.get("mid_block_scale_factor", 1.0)),
            time_embedding_dim=config.get("time_embedding_dim"),
            time_embedding_act_fn=config.get("time_embedding_act_fn"),
            timestep_post_act=config.get("timestep_post_act"),
        )  # fmt: skip

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> UNetConfig:
        return cls.from_hf(json.loads(pathlib.Path(path).read_text()), where=str(path))

    def to_hf(self) -> dict:
        """The diffusers config dict (loads with diffusers' `UNet2DConditionModel.from_config`)."""
        cross = self.cross_attention_dim
        out = {"_class_name": "UNet2DConditionModel", **_UNET_FIXED}
        out.update(
            in_channels=self.in_channels, out_channels=self.out_channels,
            sample_size=list(self.sample_size) if isinstance(self.sample_size, tuple) else self.sample_size,
            block_out_channels=list(self.block_out_channels), down_block_types=list(self.down_block_types),
            up_block_types=list(self.up_block_types), layers_per_block=list(self.layers_per_block),
            attention_head_dim=list(self.num_attention_heads),
            transformer_layers_per_block=list(self.transformer_layers_per_block),
            cross_attention_dim=cross[0] if len(set(cross)) == 1 else list(cross),
            use_linear_projection=self.use_linear_projection, upcast_attention=self.upcast_attention,
            flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift, norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps, act_fn=self.act_fn, downsample_padding=self.downsample_padding,
            mid_block_scale_factor=self.mid_block_scale_factor, time_embedding_dim=self.time_embedding_dim,
            time_embedding_act_fn=self.time_embedding_act_fn, timestep_post_act=self.timestep_post_act,
        )  # fmt: skip
        return out


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps `[B] -> [B, dim]` in fp32, as diffusers."""
    half = dim // 2
    # torch's float32 exponent, then exp rounded once to float32 (constants, not traced)
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nnx.Module):
    """The time MLP: `[B, C0] -> linear_1 -> act -> linear_2 (-> post act) -> [B, 4*C0]`."""

    def __init__(self, in_dim: int, dim: int, act_fn: str, post_act: str | None, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.act_fn, self.post_act = act_fn, post_act
        self.linear_1 = layers.linear(in_dim, dim, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = layers.linear(dim, dim, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.linear_2(layers.activation(self.act_fn, "act_fn")(self.linear_1(x)))
        return layers.activation(self.post_act, "timestep_post_act")(x) if self.post_act else x


class ResnetBlock2D(nnx.Module):
    """GroupNorm-act-conv twice, plus the time embedding after the first conv and a 1x1 shortcut
    when channels change: `[B, H, W, Cin] (+ temb [B, T]) -> [B, H, W, Cout]`."""

    def __init__(self, in_ch: int, out_ch: int, *, temb_dim: int | None, groups: int, eps: float, act_fn: str,
                 output_scale_factor: float = 1.0, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act_fn, self.output_scale_factor = act_fn, output_scale_factor
        self.norm1 = layers.GroupNorm(in_ch, num_groups=groups, eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = layers.conv2d(in_ch, out_ch, 3, padding=1, **kw)
        self.time_emb_proj = layers.linear(temb_dim, out_ch, ("embed", "conv_out"), **kw) if temb_dim else None
        self.norm2 = layers.GroupNorm(out_ch, num_groups=groups, eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.conv2 = layers.conv2d(out_ch, out_ch, 3, padding=1, **kw)
        self.conv_shortcut = layers.conv2d(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = layers.activation(self.act_fn, "act_fn")
        h = self.conv1(act(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(act(temb))[:, None, None, :]
        h = self.conv2(act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv `[B, H, W, C] -> [B, H/2, W/2, C]`; padding 0 means diffusers' (0,1,0,1) pad."""

    def __init__(self, channels: int, *, padding: int, dtype, param_dtype, rngs: nnx.Rngs):
        self.padding = padding
        self.conv = layers.conv2d(channels, channels, 3, stride=2, padding=padding, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest ×2 then a 3x3 conv: `[B, H, W, C] -> [B, 2H, 2W, C]`."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = layers.conv2d(channels, channels, 3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


class Attention(nnx.Module):
    """diffusers `Attention`: `[B, T, D]` attending to itself or to a context `[B, S, Dc]` -> `[B, T, D]`."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, context_dim: int | None = None, qkv_bias: bool = False,
                 upcast: bool = False, impl: layers.AttentionImpl = "reference", dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.head_dim, self.upcast, self.impl = heads, head_dim, upcast, impl
        inner = heads * head_dim
        self.to_q = layers.linear(dim, inner, ("embed", "heads"), use_bias=qkv_bias, **kw)
        self.to_k = layers.linear(context_dim or dim, inner, ("embed", "heads"), use_bias=qkv_bias, **kw)
        self.to_v = layers.linear(context_dim or dim, inner, ("embed", "heads"), use_bias=qkv_bias, **kw)
        self.to_out = layers.linear(inner, dim, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, y.shape[1], self.heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = layers.attention(q, k, v, impl=self.impl, upcast=self.upcast)
        return self.to_out(out.reshape(b, t, self.heads * self.head_dim))


class GEGLUFeedForward(nnx.Module):
    """`[B, T, D] -> (value * gelu(gate)) [B, T, 4D] -> [B, T, D]` (diffusers FeedForward "geglu")."""

    def __init__(self, dim: int, *, mult: int = 4, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_value = layers.linear(dim, mult * dim, ("embed", "mlp"), **kw)
        self.proj_gate = layers.linear(dim, mult * dim, ("embed", "mlp"), **kw)
        self.proj_out = layers.linear(mult * dim, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(self.proj_value(x) * layers.gelu(self.proj_gate(x)))


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text, GEGLU MLP: `[B, T, D] -> [B, T, D]`."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, cfg: UNetConfig, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        attn = dict(upcast=cfg.upcast_attention, impl=cfg.attention_impl, **kw)
        self.norm1 = layers.LayerNorm(dim, eps=1e-5, dtype=dtype, param_dtype=param_dtype)
        self.attn1 = Attention(dim, heads, head_dim, **attn)
        self.norm2 = layers.LayerNorm(dim, eps=1e-5, dtype=dtype, param_dtype=param_dtype)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, **attn)
        self.norm3 = layers.LayerNorm(dim, eps=1e-5, dtype=dtype, param_dtype=param_dtype)
        self.ff = GEGLUFeedForward(dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """Spatial transformer: GroupNorm, proj_in, transformer blocks over the H*W tokens, proj_out,
    residual: `[B, H, W, C]` + context `[B, L, Dc]` -> `[B, H, W, C]`."""

    def __init__(self, channels: int, heads: int, num_layers: int, context_dim: int, cfg: UNetConfig, *, dtype,
                 param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = layers.GroupNorm(channels, num_groups=cfg.norm_num_groups, eps=1e-6, dtype=dtype,
                                     param_dtype=param_dtype)  # fmt: skip
        self.proj_in = layers.linear(channels, inner, (None, "embed"), **kw)
        self.transformer_blocks = nnx.List(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim, cfg, **kw) for _ in range(num_layers)])
        self.proj_out = layers.linear(inner, channels, ("embed", None), **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.proj_in(self.norm(x).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y).reshape(b, h, w, c)


class DownBlock(nnx.Module):
    """CrossAttnDownBlock2D (attentions non-empty) or DownBlock2D: resnets, each followed by a spatial
    transformer, then an optional stride-2 conv. Returns the output and the skip activations."""

    def __init__(self, index: int, in_ch: int, cfg: UNetConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        out_ch = cfg.block_out_channels[index]
        res = dict(temb_dim=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn, **kw)
        n = cfg.layers_per_block[index]
        self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, **res) for i in range(n)])
        cross = cfg.down_block_types[index] == CROSS_ATTN_DOWN
        self.attentions = nnx.List([
            Transformer2DModel(out_ch, cfg.num_attention_heads[index], cfg.transformer_layers_per_block[index],
                               cfg.cross_attention_dim[index], cfg, **kw)
            for _ in range(n if cross else 0)])  # fmt: skip
        last = index == len(cfg.block_out_channels) - 1
        self.downsampler = None if last else Downsample2D(out_ch, padding=cfg.downsample_padding, **kw)

    def __call__(self, h, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if len(self.attentions):
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsampler is not None:
            h = self.downsampler(h)
            skips.append(h)
        return h, tuple(skips)


class MidBlock(nnx.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (spatial transformer, resnet)."""

    def __init__(self, cfg: UNetConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch = cfg.block_out_channels[-1]
        res = dict(temb_dim=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn,
                   output_scale_factor=cfg.mid_block_scale_factor, **kw)  # fmt: skip
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, **res) for _ in range(2)])
        self.attentions = nnx.List([Transformer2DModel(
            ch, cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1], cfg.cross_attention_dim[-1], cfg,
            **kw)])  # fmt: skip

    def __call__(self, h, temb, context):
        h = self.resnets[0](h, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            h = resnet(attn(h, context), temb)
        return h


class UpBlock(nnx.Module):
    """CrossAttnUpBlock2D / UpBlock2D: resnets on [h ‖ skip] (each followed by a spatial transformer
    when cross-attention), then an optional nearest-×2 upsample + conv."""

    def __init__(self, index: int, cfg: UNetConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        level = len(cfg.block_out_channels) - 1 - index  # the down level this block mirrors
        chans = cfg.block_out_channels
        out_ch, prev_ch = chans[level], chans[min(level + 1, len(chans) - 1)]
        skip_in = chans[max(level - 1, 0)]  # the last resnet's skip: the previous down level's output
        n = cfg.layers_per_block[level] + 1
        res = dict(temb_dim=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn, **kw)
        self.resnets = nnx.List([
            ResnetBlock2D((prev_ch if i == 0 else out_ch) + (skip_in if i == n - 1 else out_ch), out_ch, **res)
            for i in range(n)])  # fmt: skip
        cross = cfg.up_block_types[index] == CROSS_ATTN_UP
        self.attentions = nnx.List([
            Transformer2DModel(out_ch, cfg.num_attention_heads[level], cfg.transformer_layers_per_block[level],
                               cfg.cross_attention_dim[level], cfg, **kw)
            for _ in range(n if cross else 0)])  # fmt: skip
        last = level == 0
        self.upsampler = None if last else Upsample2D(out_ch, **kw)

    def __call__(self, h, skips, temb, context):
        for i, resnet in enumerate(self.resnets):
            h = resnet(jnp.concatenate([h, skips[-1 - i]], axis=-1), temb)
            if len(self.attentions):
                h = self.attentions[i](h, context)
        if self.upsampler is not None:
            h = self.upsampler(h)
        return h


def _run(block: nnx.Module, *args):
    return block(*args)


class UNet2DConditionModel(nnx.Module):
    """ε-prediction U-Net: `sample [B, C, h, w]`, `timesteps [B] or scalar`, `encoder_hidden_states
    [B, L, D]` -> `[B, C, h, w]` (h, w multiples of 2**(levels-1))."""

    def __init__(self, cfg: UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config, self.dtype = cfg, dtype
        c0 = cfg.block_out_channels[0]
        self.conv_in = layers.conv2d(cfg.in_channels, c0, 3, padding=1, **kw)
        self.time_embedding = TimestepEmbedding(c0, cfg.time_embed_dim, cfg.act_fn, cfg.timestep_post_act, **kw)
        ins = (c0,) + cfg.block_out_channels[:-1]
        self.down_blocks = nnx.List([DownBlock(i, ins[i], cfg, **kw) for i in range(len(ins))])
        self.mid_block = MidBlock(cfg, **kw)
        self.up_blocks = nnx.List([UpBlock(i, cfg, **kw) for i in range(len(ins))])
        self.conv_norm_out = layers.GroupNorm(c0, num_groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype,
                                              param_dtype=param_dtype)  # fmt: skip
        self.conv_out = layers.conv2d(c0, cfg.out_channels, 3, padding=1, **kw)

    def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float,
                 encoder_hidden_states: jax.Array) -> jax.Array:
        cfg = self.config
        b, _, height, width = sample.shape
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if height % factor or width % factor:
            raise ValueError(f"U-Net sample size {height}x{width} must be a multiple of {factor}")
        # blocks hold only parameters, so remat has nothing to write back (and works under jax.grad
        # of a closure over the model)
        run = nnx.remat(_run, graph_updates=False) if cfg.remat else _run
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (b,))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(temb.astype(self.dtype))
        if cfg.time_embedding_act_fn:
            temb = layers.activation(cfg.time_embedding_act_fn, "time_embedding_act_fn")(temb)
        context = encoder_hidden_states.astype(self.dtype)
        h = self.conv_in(jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype))
        skips = (h,)
        for block in self.down_blocks:
            h, block_skips = run(block, h, temb, context)
            skips += block_skips
        h = run(self.mid_block, h, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            h = run(block, h, skips[-n:], temb, context)
            skips = skips[:-n]
        h = layers.activation(cfg.act_fn, "act_fn")(self.conv_norm_out(h))
        return jnp.transpose(self.conv_out(h), (0, 3, 1, 2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.bfloat16,
                        mesh: jax.sharding.Mesh | None = None, remat: bool = False,
                        attention_impl: layers.AttentionImpl = "reference") -> UNet2DConditionModel:
        """Load a diffusers `unet/` directory (config.json + diffusion_pytorch_model.safetensors or .bin),
        sharded over `mesh` by the parameters' logical names when given."""
        path = pathlib.Path(path)
        cfg = dataclasses.replace(UNetConfig.from_json(path / "config.json"), remat=remat,
                                  attention_impl=attention_impl)  # fmt: skip
        graphdef, abstract = km.abstract_model(lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype,
                                                           rngs=km.abstract_rngs()))
        source = open_weights(path, stems=(WEIGHTS_STEM,))
        state = km.load_params(abstract, source, unet_keymap(cfg.use_linear_projection), mesh=mesh,
                               what=f"U-Net {path}")  # fmt: skip
        return km.materialize(graphdef, state)

    def save_pretrained(self, path: str | os.PathLike, *, dtype=None) -> None:
        """Write a diffusers `unet/` directory (config.json + diffusion_pytorch_model.safetensors)."""
        save_diffusers(self, self.config.to_hf(), unet_keymap(self.config.use_linear_projection), path, dtype)


def save_diffusers(model: nnx.Module, config: dict, keymap: km.KeyMap, path: str | os.PathLike, dtype=None) -> None:
    """Write `config.json` and the parameters (diffusers names, optionally cast to `dtype`) to `path`."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_sharded_safetensors(path, km.export_params(nnx.state(model, nnx.Param), keymap, dtype), stem=WEIGHTS_STEM)
    write_atomically(path / "config.json", json.dumps(config, indent=2, sort_keys=True))  # after: a failed save changes nothing
