"""The input-image path of MiniGPT-4/5: EVA ViT-g -> ln_vision -> Q-Former -> llama_proj.

pixels `[N, 3, H, W]` (CLIP-normalised) -> ViT tokens `[N, 1+P, D_vit]` -> Q-Former queries
`[N, Q, D_q]` -> LLM input embeddings `[N, Q, D_llm]`. The ViT matches LAVIS `create_eva_vit_g`
(39 of EVA-CLIP-g's 40 blocks, no final norm) followed by BLIP-2's `ln_vision`, which is exactly
transformers' `Blip2VisionModel.last_hidden_state` (its `post_layernorm` is `ln_vision`). The
Q-Former is BLIP-2's query path only (no text path); the projection is MiniGPT-4's `llama_proj`
(or transformers' `language_projection`). The whole encoder is frozen in MiniGPT-5, so bf16 is the
default for both storage and compute.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mg5jax.models import layers


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """EVA ViT (+ ln_vision). Defaults: ViT-g as MiniGPT-4 uses it."""

    image_size: int = 224  # the checkpoint's native size: the stored position grid is image_size // patch_size
    patch_size: int = 14
    width: int = 1408
    depth: int = 39  # blocks kept; EVA-CLIP-g has 40 and MiniGPT-4 drops the last
    heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6  # the blocks' LayerNorms
    ln_vision_eps: float = 1e-5  # LAVIS ln_vision (transformers' post_layernorm uses layer_norm_eps)
    hidden_act: str = "gelu"  # exact-erf GELU

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"VisionConfig: width={self.width} is not a multiple of heads={self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        layers.activation(self.hidden_act, where="VisionConfig.hidden_act")

    @property
    def grid(self) -> int:
        """Side of the stored position-embedding grid."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, d: Mapping, where: str = "vision_config") -> VisionConfig:
        """From a transformers `Blip2VisionConfig` dict (missing keys take transformers' defaults)."""
        if not d.get("qkv_bias", True):
            raise ValueError(f"{where}.qkv_bias=False is unsupported: the EVA ViT has learned q and v biases")
        eps = d.get("layer_norm_eps", cls.layer_norm_eps)
        return cls(
            image_size=d.get("image_size", cls.image_size),
            patch_size=d.get("patch_size", cls.patch_size),
            width=d.get("hidden_size", cls.width),
            depth=d.get("num_hidden_layers", cls.depth),
            heads=d.get("num_attention_heads", cls.heads),
            mlp_dim=d.get("intermediate_size", cls.mlp_dim),
            layer_norm_eps=eps,
            ln_vision_eps=eps,
            hidden_act=d.get("hidden_act", cls.hidden_act),
        )


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """BLIP-2 Q-Former (query path). Defaults: bert-base with cross-attention every 2nd layer."""

    hidden_size: int = 768
    num_layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2  # layer i cross-attends to the image iff i % freq == 0
    encoder_width: int = 1408  # width of the image features (the ViT width)
    num_query_tokens: int = 32
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"QFormerConfig: hidden_size={self.hidden_size} is not a multiple of heads={self.heads}")
        if self.cross_attention_freq < 1:
            raise ValueError(f"QFormerConfig: cross_attention_freq={self.cross_attention_freq} must be >= 1")
        layers.activation(self.hidden_act, where="QFormerConfig.hidden_act")

    @classmethod
    def from_hf(cls, d: Mapping, num_query_tokens: int = 32) -> QFormerConfig:
        """From a transformers `Blip2QFormerConfig` dict plus `Blip2Config.num_query_tokens`."""
        return cls(
            hidden_size=d.get("hidden_size", cls.hidden_size),
            num_layers=d.get("num_hidden_layers", cls.num_layers),
            heads=d.get("num_attention_heads", cls.heads),
            intermediate_size=d.get("intermediate_size", cls.intermediate_size),
            cross_attention_freq=d.get("cross_attention_frequency", cls.cross_attention_freq),
            encoder_width=d.get("encoder_hidden_size", cls.encoder_width),
            num_query_tokens=num_query_tokens,
            layer_norm_eps=d.get("layer_norm_eps", cls.layer_norm_eps),
            hidden_act=d.get("hidden_act", cls.hidden_act),
        )


@dataclasses.dataclass(frozen=True)
class VisionEncoderConfig:
    """ViT + Q-Former + projection to the LLM width (`proj_dim`, 4096 for Vicuna-7B)."""

    vision: VisionConfig = VisionConfig()
    qformer: QFormerConfig = QFormerConfig()
    proj_dim: int = 4096

    def __post_init__(self):
        if self.qformer.encoder_width != self.vision.width:
            raise ValueError(f"VisionEncoderConfig: qformer.encoder_width={self.qformer.encoder_width} "
                             f"!= vision.width={self.vision.width}")

    @classmethod
    def from_hf(cls, d: Mapping, proj_dim: int | None = None, where: str = "BLIP-2 config") -> VisionEncoderConfig:
        """From a transformers `Blip2Config` dict; `proj_dim` defaults to the language model's width,
        `text_config.hidden_size` (OPT, LLaMA) or `text_config.d_model` (Flan-T5): the width of
        `language_projection`."""
        if d.get("model_type", "blip-2") != "blip-2":
            raise ValueError(f"{where}: model_type={d['model_type']!r}, expected 'blip-2'")
        if proj_dim is None:
            text = d.get("text_config")
            width = (text.get("hidden_size") or text.get("d_model")) if isinstance(text, Mapping) else None
            if width is None:
                raise ValueError(f"{where}: needs text_config.hidden_size or text_config.d_model (the width of "
                                 "language_projection), or a MiniGPT-4 projection file (model.vision.proj_path)")
            proj_dim = int(width)
        return cls(
            vision=VisionConfig.from_hf(d.get("vision_config") or {}, where=f"{where}: vision_config"),
            qformer=QFormerConfig.from_hf(d.get("qformer_config") or {}, d.get("num_query_tokens", 32)),
            proj_dim=proj_dim,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike, proj_dim: int | None = None) -> VisionEncoderConfig:
        return cls.from_hf(json.loads(pathlib.Path(path).read_text()), proj_dim=proj_dim, where=str(path))


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out_size, in_size]` weights of torch's 1-D bicubic resize (`F.interpolate(mode='bicubic',
    align_corners=False)`: cubic convolution with A=-0.75, edge samples clamped). Identity when the
    sizes are equal."""
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = (i + 0.5) * in_size / out_size - 0.5
        x0 = int(np.floor(src))
        t = src - x0
        for k, w in zip(range(-1, 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            weights[i, min(max(x0 + k, 0), in_size - 1)] += w
    return weights


def _apply(module: nnx.Module, *args):
    return module(*args)


_apply_remat = nnx.remat(_apply)


class EvaAttention(nnx.Module):
    """EVA self-attention: one fused qkv kernel, learned q and v biases (the key bias is zero).
    `[B, T, D] -> [B, T, D]`."""

    def __init__(self, width: int, heads: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = heads
        self.qkv = layers.linear(width, 3 * width, ("embed", "heads"), use_bias=False, **kw)
        self.q_bias = nnx.Param(jnp.zeros((width,), param_dtype), out_sharding=("heads",))
        self.v_bias = nnx.Param(jnp.zeros((width,), param_dtype), out_sharding=("heads",))
        self.proj = layers.linear(width, width, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q_bias = self.q_bias[...]
        bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), self.v_bias[...]])
        qkv = (self.qkv(x) + bias.astype(x.dtype)).reshape(b, t, 3, self.heads, d // self.heads)
        out = layers.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return self.proj(out.reshape(b, t, d))


class EvaBlock(nnx.Module):
    """Pre-LN ViT block without layer-scale: x + attn(norm1(x)), then + fc2(gelu(fc1(norm2(x))))."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = layers.activation(cfg.hidden_act)
        self.norm1 = layers.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **kw)
        self.attn = EvaAttention(cfg.width, cfg.heads, **kw)
        self.norm2 = layers.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **kw)
        self.fc1 = layers.linear(cfg.width, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.fc2 = layers.linear(cfg.mlp_dim, cfg.width, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class EvaViT(nnx.Module):
    """EVA ViT followed by `ln_vision`: pixels `[N, 3, H, W]` -> features `[N, 1 + (H/p)(W/p), D]`.

    Images of another size than `cfg.image_size` get the stored position grid bicubically resized
    (as LAVIS `interpolate_pos_embed` / transformers `interpolate_pos_encoding`); H and W must be
    multiples of the patch size.
    """

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.truncated_normal(0.02)
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.patch_embed = layers.conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, **kw)
        self.cls_token = nnx.Param(init(rngs.params(), (1, cfg.width), param_dtype), out_sharding=(None, "embed"))
        self.pos_embed = nnx.Param(init(rngs.params(), (1 + cfg.grid**2, cfg.width), param_dtype),
                                   out_sharding=("length", "embed"))
        self.blocks = nnx.List([EvaBlock(cfg, **kw) for _ in range(cfg.depth)])
        self.ln_vision = layers.LayerNorm(cfg.width, eps=cfg.ln_vision_eps, **kw)

    def position_embedding(self, grid_h: int, grid_w: int) -> jax.Array:
        """`[1 + grid_h * grid_w, D]` in fp32: the stored table, resized when the grid differs."""
        pos = self.pos_embed[...].astype(jnp.float32)
        g = self.config.grid
        if (grid_h, grid_w) == (g, g):
            return pos
        rows = jnp.asarray(bicubic_resize_matrix(g, grid_h), jnp.float32)
        cols = jnp.asarray(bicubic_resize_matrix(g, grid_w), jnp.float32)
        patches = jnp.einsum("Hh,hwd,Ww->HWd", rows, pos[1:].reshape(g, g, -1), cols,
                             precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([pos[:1], patches.reshape(grid_h * grid_w, -1)], axis=0)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        p = self.config.patch_size
        n, _, h, w = pixels.shape
        if h % p or w % p:
            raise ValueError(f"EvaViT: image size {h}x{w} is not a multiple of the patch size {p}")
        x = self.patch_embed(pixels.transpose(0, 2, 3, 1).astype(self.dtype))  # [N, h/p, w/p, D]
        _, gh, gw, d = x.shape
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype)[None], (n, 1, d))
        x = jnp.concatenate([cls, x.reshape(n, gh * gw, d)], axis=1)
        x = x + self.position_embedding(gh, gw).astype(x.dtype)
        apply = _apply_remat if self.remat else _apply
        for block in self.blocks:
            x = apply(block, x)
        return self.ln_vision(x)


class QFormerAttention(nnx.Module):
    """BERT attention with a post-LN residual: `norm(x + out(attn(query(x), key(c), value(c))))`, where the
    context `c` is `x` (self-attention) or the image features (cross-attention). `[N, Q, D] -> [N, Q, D]`."""

    def __init__(self, cfg: QFormerConfig, context_width: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.hidden_size
        self.heads = cfg.heads
        self.query = layers.linear(d, d, ("embed", "heads"), **kw)
        self.key = layers.linear(context_width, d, ("embed", "heads"), **kw)
        self.value = layers.linear(context_width, d, ("embed", "heads"), **kw)
        self.out = layers.linear(d, d, ("heads", "embed"), **kw)
        self.norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        n, t, d = x.shape
        s = context.shape[1]
        hd = d // self.heads
        q = self.query(x).reshape(n, t, self.heads, hd)
        k = self.key(context).reshape(n, s, self.heads, hd)
        v = self.value(context).reshape(n, s, self.heads, hd)
        out = layers.attention(q, k, v).reshape(n, t, d)
        return self.norm(x + self.out(out))


class QFormerLayer(nnx.Module):
    """Self-attention, cross-attention to the image (when `has_cross_attention`), then the query FFN
    (`intermediate_query` / `output_query`), each with a post-LN residual."""

    def __init__(self, cfg: QFormerConfig, has_cross_attention: bool, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = layers.activation(cfg.hidden_act)
        self.self_attn = QFormerAttention(cfg, cfg.hidden_size, **kw)
        self.cross_attn = QFormerAttention(cfg, cfg.encoder_width, **kw) if has_cross_attention else None
        self.ffn_in = layers.linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.ffn_out = layers.linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.ffn_norm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

    def __call__(self, x: jax.Array, image_features: jax.Array) -> jax.Array:
        x = self.self_attn(x, x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, image_features)
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))


class QFormer(nnx.Module):
    """Learned queries read the image: features `[N, S, D_vit]` -> `[N, num_query_tokens, D_q]`.

    The queries pass the embeddings LayerNorm, then every layer; attention masks are all-ones.
    """

    def __init__(self, cfg: QFormerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.query_tokens = nnx.Param(
            nnx.initializers.truncated_normal(0.02)(rngs.params(), (cfg.num_query_tokens, cfg.hidden_size),
                                                    param_dtype),
            out_sharding=("queries", "embed"))
        self.ln = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.layers = nnx.List([
            QFormerLayer(cfg, i % cfg.cross_attention_freq == 0, **kw) for i in range(cfg.num_layers)])

    def __call__(self, image_features: jax.Array) -> jax.Array:
        n = image_features.shape[0]
        queries = self.query_tokens[...]
        x = self.ln(jnp.broadcast_to(queries[None], (n, *queries.shape)))
        context = image_features.astype(self.dtype)
        apply = _apply_remat if self.remat else _apply
        for layer in self.layers:
            x = apply(layer, x, context)
        return x


class VisionEncoder(nnx.Module):
    """MiniGPT-4's image encoder: pixels `[N, 3, H, W]` (CLIP-normalised, NCHW) -> `[N, Q, D_llm]`.

    `vit` (EVA ViT + ln_vision) -> `qformer` -> `proj` (llama_proj). `remat` recomputes each block /
    layer in the backward pass (only useful if gradients ever flow through the frozen encoder).
    """

    def __init__(self, cfg: VisionEncoderConfig = VisionEncoderConfig(), *, dtype=jnp.bfloat16,
                 param_dtype=jnp.bfloat16, remat: bool = False, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.vit = EvaViT(cfg.vision, remat=remat, **kw)
        self.qformer = QFormer(cfg.qformer, remat=remat, **kw)
        self.proj = layers.linear(cfg.qformer.hidden_size, cfg.proj_dim, (None, "embed"), **kw)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.proj(self.qformer(self.vit(pixels)))

    @classmethod
    def from_lavis(cls, vit_path: str | os.PathLike, qformer_path: str | os.PathLike,
                   proj_path: str | os.PathLike, *, config: VisionEncoderConfig | None = None,
                   dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat: bool = False,
                   mesh: jax.sharding.Mesh | None = None) -> VisionEncoder:
        """Load the three torch pickles MiniGPT-4/5 use: LAVIS `eva_vit_g.pth` (flat ViT state dict),
        the BLIP-2 stage checkpoint (`['model']`: ln_vision, query_tokens, Qformer) and the MiniGPT-4
        checkpoint (`['model']`: llama_proj). Keys ignored in each are listed in
        `mg5jax.convert.vision`. `config` defaults to the real MiniGPT-4 sizes with the projection width
        read from the MiniGPT-4 checkpoint."""
        from mg5jax.convert import keymap as km
        from mg5jax.convert import vision as convert

        cfg = config or VisionEncoderConfig(proj_dim=convert.minigpt4_proj_dim(proj_path))
        graphdef, abstract = km.abstract_model(
            lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=km.abstract_rngs()))
        state = convert.load_lavis(abstract, vit_path, qformer_path, proj_path, depth=cfg.vision.depth, mesh=mesh)
        return km.materialize(graphdef, state)

    @classmethod
    def from_pretrained(cls, blip2_dir: str | os.PathLike, *, proj: str | os.PathLike | None = None,
                        dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat: bool = False,
                        mesh: jax.sharding.Mesh | None = None) -> VisionEncoder:
        """Load a transformers BLIP-2 directory (`Blip2Model` / `Blip2ForConditionalGeneration`: `config.json`
        + weights). The projection is its `language_projection`, or, when `proj` names a MiniGPT-4
        checkpoint, that file's `llama_proj` (width read from the file). Language-model keys are ignored."""
        from mg5jax.convert import keymap as km
        from mg5jax.convert import vision as convert

        directory = pathlib.Path(blip2_dir)
        proj_dim = convert.minigpt4_proj_dim(proj) if proj is not None else None
        cfg = VisionEncoderConfig.from_json(directory / "config.json", proj_dim=proj_dim)
        graphdef, abstract = km.abstract_model(
            lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=km.abstract_rngs()))
        state = convert.load_hf(abstract, directory, proj_path=proj, mesh=mesh)
        return km.materialize(graphdef, state)
