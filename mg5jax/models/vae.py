"""Stable Diffusion's KL autoencoder (diffusers `AutoencoderKL`) in Flax NNX.

`encode(x [B, 3, H, W] in [-1, 1]) -> DiagonalGaussian` over latents `[B, C, H/f, W/f]`;
`decode(z [B, C, h, w]) -> x [B, 3, h*f, w*f]` with f = 2**(levels-1). NCHW at the boundary,
NHWC inside. Latents fed to the U-Net are `sample * config.scaling_factor` (0.18215 for SD).

Encoder: conv_in, DownEncoderBlock2D per level (resnets + stride-2 conv after (0,1,0,1) padding),
mid block (resnet, single-head self-attention over H*W, resnet), GroupNorm, SiLU, conv_out to
2C moments, quant_conv. Decoder: post_quant_conv, conv_in, mid block, UpDecoderBlock2D per level
(layers_per_block + 1 resnets, nearest ×2 + conv), GroupNorm, SiLU, conv_out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from mg5jax.convert import keymap as km
from mg5jax.convert.diffusers import VAE_DEPRECATED_ATTENTION_NAMES, vae_keymap
from mg5jax.convert.sources import open_weights
from mg5jax.models import layers
from mg5jax.models.unet import (
    WEIGHTS_STEM, Attention, Downsample2D, ResnetBlock2D, Upsample2D, check_fixed, check_known,
    save_diffusers,
)  # fmt: skip

DOWN, UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
RESNET_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code it

# diffusers config keys whose only supported value is the one given (used by pipelines, not the model)
_VAE_FIXED = {"shift_factor": None, "latents_mean": None, "latents_std": None}


@flax.struct.dataclass
class DiagonalGaussian:
    """The VAE posterior N(mean, exp(logvar)) from moments `[B, 2C, h, w]` (mean ‖ logvar), as
    diffusers' DiagonalGaussianDistribution (logvar clamped to [-30, 20])."""

    moments: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Wrap precomputed moments `[B, 2C, h, w]` (e.g. stored encoder outputs)."""
        moments = jnp.asarray(moments)
        if moments.ndim != 4 or moments.shape[1] % 2:
            raise ValueError(f"VAE moments must be [B, 2C, h, w], got shape {moments.shape}")
        return cls(moments)

    @property
    def mean(self) -> jax.Array:
        return self.moments[:, : self.moments.shape[1] // 2]

    @property
    def logvar(self) -> jax.Array:
        return jnp.clip(self.moments[:, self.moments.shape[1] // 2 :], -30.0, 20.0)

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * ε with ε ~ N(0, I) from `key`: `[B, C, h, w]` fp32 (ε drawn in fp32 whatever the
        moments' dtype: a bf16 normal has coarse values and clipped tails)."""
        mean, std = self.mean.astype(jnp.float32), self.std.astype(jnp.float32)
        return mean + std * jax.random.normal(key, mean.shape, jnp.float32)

    def mode(self) -> jax.Array:
        return self.mean


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """A diffusers AutoencoderKL config (defaults: SD 2.1-base)."""

    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # channels per level
    down_block_types: tuple[str, ...] = (DOWN,) * 4
    up_block_types: tuple[str, ...] = (UP,) * 4
    layers_per_block: int = 2  # resnets per encoder level (decoder levels have one more)
    act_fn: str = "silu"
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 512  # image size the model was trained at (informational)
    scaling_factor: float = 0.18215  # latents for the U-Net are sample * scaling_factor
    force_upcast: bool = True  # diffusers runs the VAE in fp32 under fp16 pipelines (informational)
    use_quant_conv: bool = True  # 1x1 conv on the moments
    use_post_quant_conv: bool = True  # 1x1 conv on the latents before decoding
    mid_block_add_attention: bool = True  # self-attention in the encoder/decoder mid blocks

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name, allowed in (("down_block_types", DOWN), ("up_block_types", UP)):
            types = getattr(self, name)
            if len(types) != n or any(t != allowed for t in types):
                raise ValueError(f"VAEConfig.{name}={types!r}: mg5jax supports {n} x {allowed!r}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_hf(cls, config: dict, where: str = "VAE config") -> VAEConfig:
        """Parse a diffusers `vae/config.json` dict; unsupported values raise naming the key."""
        check_known(config, {f.name for f in dataclasses.fields(cls)} | set(_VAE_FIXED), where, "VAE")
        check_fixed(config, _VAE_FIXED, where, "VAE")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in config:
                value = config[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> VAEConfig:
        return cls.from_hf(json.loads(pathlib.Path(path).read_text()), where=str(path))

    def to_hf(self) -> dict:
        """The diffusers config dict (loads with diffusers' `AutoencoderKL.from_config`)."""
        out = {"_class_name": "AutoencoderKL", **_VAE_FIXED}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


class SpatialSelfAttention(nnx.Module):
    """GroupNorm + single-head self-attention over the H*W positions + residual: `[B, H, W, C] -> same`."""

    def __init__(self, channels: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.group_norm = layers.GroupNorm(channels, num_groups=groups, eps=RESNET_EPS, dtype=dtype,
                                           param_dtype=param_dtype)  # fmt: skip
        self.attention = Attention(channels, 1, channels, qkv_bias=True, upcast=True, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        return x + self.attention(self.group_norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """UNetMidBlock2D without time embedding: resnet, (self-attention,) resnet."""

    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch = cfg.block_out_channels[-1]
        self.resnets = nnx.List([
            ResnetBlock2D(ch, ch, temb_dim=None, groups=cfg.norm_num_groups, eps=RESNET_EPS, act_fn=cfg.act_fn, **kw)
            for _ in range(2)])  # fmt: skip
        self.attentions = nnx.List(
            [SpatialSelfAttention(ch, cfg.norm_num_groups, **kw)] if cfg.mid_block_add_attention else [])

    def __call__(self, h: jax.Array) -> jax.Array:
        h = self.resnets[0](h)
        if len(self.attentions):
            h = self.attentions[0](h)
        return self.resnets[1](h)


class EncoderBlock(nnx.Module):
    """DownEncoderBlock2D: resnets, then an optional stride-2 conv with diffusers' (0,1,0,1) padding."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, add_downsample: bool, cfg: VAEConfig, *, dtype,
                 param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_dim=None, groups=cfg.norm_num_groups,
                          eps=RESNET_EPS, act_fn=cfg.act_fn, **kw)
            for i in range(num_layers)])  # fmt: skip
        self.downsampler = Downsample2D(out_ch, padding=0, **kw) if add_downsample else None

    def __call__(self, h: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            h = resnet(h)
        return self.downsampler(h) if self.downsampler is not None else h


class DecoderBlock(nnx.Module):
    """UpDecoderBlock2D: resnets, then an optional nearest-×2 upsample + conv."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, add_upsample: bool, cfg: VAEConfig, *, dtype,
                 param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_dim=None, groups=cfg.norm_num_groups,
                          eps=RESNET_EPS, act_fn=cfg.act_fn, **kw)
            for i in range(num_layers)])  # fmt: skip
        self.upsampler = Upsample2D(out_ch, **kw) if add_upsample else None

    def __call__(self, h: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            h = resnet(h)
        return self.upsampler(h) if self.upsampler is not None else h


class Encoder(nnx.Module):
    """Image `[B, H, W, Cin]` -> moments `[B, H/f, W/f, 2*latent_channels]` (before quant_conv)."""

    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chans = cfg.block_out_channels
        self.act_fn = cfg.act_fn
        self.conv_in = layers.conv2d(cfg.in_channels, chans[0], 3, padding=1, **kw)
        self.down_blocks = nnx.List([
            EncoderBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, i < len(chans) - 1, cfg, **kw)
            for i in range(len(chans))])  # fmt: skip
        self.mid_block = MidBlock(cfg, **kw)
        self.conv_norm_out = layers.GroupNorm(chans[-1], num_groups=cfg.norm_num_groups, eps=RESNET_EPS, dtype=dtype,
                                              param_dtype=param_dtype)  # fmt: skip
        self.conv_out = layers.conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(layers.activation(self.act_fn, "act_fn")(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """Latents `[B, h, w, latent_channels]` -> image `[B, h*f, w*f, Cout]`."""

    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chans = tuple(reversed(cfg.block_out_channels))
        self.act_fn = cfg.act_fn
        self.conv_in = layers.conv2d(cfg.latent_channels, chans[0], 3, padding=1, **kw)
        self.mid_block = MidBlock(cfg, **kw)
        self.up_blocks = nnx.List([
            DecoderBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block + 1, i < len(chans) - 1, cfg, **kw)
            for i in range(len(chans))])  # fmt: skip
        self.conv_norm_out = layers.GroupNorm(chans[-1], num_groups=cfg.norm_num_groups, eps=RESNET_EPS, dtype=dtype,
                                              param_dtype=param_dtype)  # fmt: skip
        self.conv_out = layers.conv2d(chans[-1], cfg.out_channels, 3, padding=1, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(layers.activation(self.act_fn, "act_fn")(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
    """SD's VAE: `encode(x [B, 3, H, W]) -> DiagonalGaussian`, `decode(z [B, C, h, w]) -> [B, 3, H, W]`."""

    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config, self.dtype = cfg, dtype
        c = cfg.latent_channels
        self.encoder = Encoder(cfg, **kw)
        self.quant_conv = layers.conv2d(2 * c, 2 * c, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = layers.conv2d(c, c, 1, **kw) if cfg.use_post_quant_conv else None
        self.decoder = Decoder(cfg, **kw)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images `[B, 3, H, W]` in [-1, 1] (H, W multiples of the downsample factor) -> posterior."""
        _, _, height, width = x.shape
        f = self.config.downsample_factor
        if height % f or width % f:
            raise ValueError(f"VAE input size {height}x{width} must be a multiple of {f}")
        moments = self.encoder(jnp.transpose(x, (0, 2, 3, 1)).astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(jnp.transpose(moments, (0, 3, 1, 2)))

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents `[B, C, h, w]` (unscaled: divide U-Net latents by scaling_factor first) -> images."""
        z = jnp.transpose(z, (0, 2, 3, 1)).astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return jnp.transpose(self.decoder(z), (0, 3, 1, 2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.bfloat16,
                        mesh: jax.sharding.Mesh | None = None) -> AutoencoderKL:
        """Load a diffusers `vae/` directory (config.json + diffusion_pytorch_model.safetensors or .bin);
        both the current and the pre-0.15 (query/key/value/proj_attn) attention names load."""
        path = pathlib.Path(path)
        cfg = VAEConfig.from_json(path / "config.json")
        graphdef, abstract = km.abstract_model(lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype,
                                                           rngs=km.abstract_rngs()))  # fmt: skip
        source = open_weights(path, stems=(WEIGHTS_STEM,))
        deprecated = any(k.endswith(f".attentions.0.{VAE_DEPRECATED_ATTENTION_NAMES[0]}.weight") for k in source)
        state = km.load_params(abstract, source, vae_keymap(deprecated), mesh=mesh, what=f"VAE {path}")
        return km.materialize(graphdef, state)

    def save_pretrained(self, path: str | os.PathLike, *, dtype=None) -> None:
        """Write a diffusers `vae/` directory (config.json + diffusion_pytorch_model.safetensors)."""
        save_diffusers(self, self.config.to_hf(), vae_keymap(), path, dtype)
