"""LLaMA / Vicuna causal LM (the MiniGPT-5 language model) with a slot-indexed KV cache.

Numerics follow the original's LLaMA copy (REFERENCE §1.5): RMSNorm variance in fp32, cast back to
the weight dtype before the scale; RoPE in the HF half-split layout, cos/sin computed in fp32 from
`position_ids` and cast to the activation dtype; softmax in fp32; causal mask AND padding mask.
`LlamaOutput.hidden_states` is the final post-norm hidden state (the tensor fed to `lm_head`), the one
MiniGPT-5 reads at the voken positions.

Also here: growing the vocabulary for the vokens with mean-initialised rows (REFERENCE §1.6) and an
optax wrapper that lets only those new rows change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mg5jax import parallel
from mg5jax.convert import keymap as km
from mg5jax.convert import llama as convert_llama
from mg5jax.convert.sources import open_weights, write_sharded_safetensors, write_atomically
from mg5jax.models import cpu_decode, layers
from mg5jax.models.lora import LoraLinear


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """LLaMA architecture hyper-parameters (defaults: Vicuna-7B v0)."""

    vocab_size: int = 32001
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                                 f"num_attention_heads={self.num_attention_heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, d: Mapping) -> LlamaConfig:
        """From a transformers `config.json` dict (4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type={d['model_type']!r}: only 'llama' is supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={d['hidden_act']!r}: only 'silu' is supported")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ValueError(f"{key}={d[key]!r}: biased LLaMA projections are not supported")
        if d.get("attention_dropout"):
            raise ValueError(f"attention_dropout={d['attention_dropout']!r}: only 0.0 is supported")
        rope_theta = d.get("rope_theta", 10000.0)
        for key in ("rope_scaling", "rope_parameters"):
            rope = d.get(key)
            if rope is None:
                continue
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                raise ValueError(f"{key}={rope!r}: only the default (unscaled) RoPE is supported")
            rope_theta = rope.get("rope_theta", rope_theta)
        eos = d.get("eos_token_id", 2)
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or 0,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LlamaConfig:
        """From a `config.json` file (or a directory holding one)."""
        p = pathlib.Path(path)
        p = p / "config.json" if p.is_dir() else p
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not a readable config.json ({e})") from e
        try:
            return cls.from_hf(d)
        except KeyError as e:
            raise ValueError(f"{p}: missing required key {e.args[0]!r}") from e
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from e

    def to_hf(self, dtype=None) -> dict:
        """A transformers `config.json` dict (loadable by 4.31 and 5.x `LlamaForCausalLM`)."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if dtype is not None:
            d["torch_dtype"] = jnp.dtype(dtype).name
        return d


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer by slot; slot index == position id.

    k, v: one `[B, Hkv, S, hd]` array per layer (keys after RoPE; head-major, the layout attention
    reads, and a layer's update touches its own array only); valid: `[B, S]` bool, slot s holds a
    real token.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array


@flax.struct.dataclass
class LlamaOutput:
    """logits `[B, T, V]` float32; hidden_states `[B, T, D]`, the post-norm state fed to lm_head;
    cache: the updated `KVCache`, or None when called without one."""

    logits: jax.Array
    hidden_states: jax.Array
    cache: KVCache | None = None


class RMSNorm(nnx.Module):
    """`x * rsqrt(mean(x^2) + eps) * scale` over the last axis: `[..., D] -> [..., D]`.

    The variance is computed in fp32; the normalised value is cast to the weight dtype before the
    scale multiplies it (the original's half-precision behaviour), then to `dtype`.
    """

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...]
        return (scale * normed.astype(scale.dtype)).astype(self.dtype)


def rope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """RoPE tables for `position_ids` `[B, T]` -> cos, sin `[B, T, hd]` (computed in fp32, cast to dtype)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / np.power(np.float64(theta), exponent.astype(np.float64))).astype(np.float32)
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `[B, T, H, hd]` by the half-split ("rotate_half") convention of HF LLaMA."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with RoPE: `[B, T, D] -> [B, T, D]`."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, attn_impl: layers.AttentionImpl,
                 rngs: nnx.Rngs):
        d, h, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = layers.linear(d, h * hd, ("embed", "heads"), **kw)
        self.k_proj = layers.linear(d, hkv * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = layers.linear(d, hkv * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = layers.linear(h * hd, d, ("heads", "embed"), **kw)
        self.qkv_proj = nnx.data(None)  # q|k|v in one matmul, after `prepare_for_decoding`
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, hd
        self.attn_impl = attn_impl
        self.decode_kernel = False  # one-token cached steps through cpu_decode.decode_attention

    def __call__(self, x, cos, sin, mask, kv=None, slots=None):
        """x `[B, T, D]`; mask `[B, 1, T, S]` bool; kv: this layer's cache (k, v) `[B, Hkv, S, hd]` and
        slots `[B, T]` (out-of-range slots are not written). Returns (out, updated kv or None)."""
        b, t, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q_end, k_end = self.num_heads * self.head_dim, (self.num_heads + self.num_kv_heads) * self.head_dim
            q, k, v = jnp.split(self.qkv_proj(x), [q_end, k_end], axis=-1)
        q = apply_rope(q.reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if kv is None:
            out = layers.attention(q, k, v, mask=mask, impl=self.attn_impl)
        else:
            at = (jnp.arange(b)[:, None, None], jnp.arange(self.num_kv_heads)[None, :, None], slots[:, None, :])
            kv = tuple(c.at[at].set(new.transpose(0, 2, 1, 3).astype(c.dtype), mode="drop")
                       for c, new in zip(kv, (k, v)))
            if self.decode_kernel and t == 1 and kv[0].dtype == q.dtype == jnp.float32:
                out = cpu_decode.decode_attention(q, kv[0], kv[1], mask, self.head_dim**-0.5)
            else:
                out = layers.attention(q, kv[0].astype(q.dtype), kv[1].astype(q.dtype), mask=mask,
                                       impl=self.attn_impl, kv_heads_first=True)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), kv


class LlamaMLP(nnx.Module):
    """SiLU-gated feed-forward `down(silu(gate(x)) * up(x))`: `[B, T, D] -> [B, T, D]`."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = layers.linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = layers.linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = layers.linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.gate_up_proj = nnx.data(None)  # gate|up in one matmul, after `prepare_for_decoding`

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(jax.nn.silu(gate) * up)


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: `h = x + attn(norm(x)); out = h + mlp(norm(h))`; the sums in `x`'s (the residual) dtype."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, attn_impl, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, param_dtype=param_dtype, attn_impl=attn_impl, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = LlamaMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv=None, slots=None):
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, slots)
        h = x + attn.astype(x.dtype)
        return h + self.mlp(self.post_attention_layernorm(h)).astype(x.dtype), kv


def _call_layer(layer, x, cos, sin, mask, kv, slots):
    return layer(x, cos, sin, mask, kv, slots)


def _remat_policy(remat: bool | str):
    """`True` = recompute everything; a string names a `jax.checkpoint_policies` policy."""
    name = "nothing_saveable" if remat is True else remat
    policy = getattr(jax.checkpoint_policies, name, None)
    if not isinstance(name, str) or policy is None:
        raise ValueError(f"remat={remat!r}: expected a bool or a jax.checkpoint_policies name "
                         "such as 'nothing_saveable' or 'dots_with_no_batch_dims_saveable'")
    return policy


class LlamaModel(nnx.Module):
    """Embedding, decoder stack and final RMSNorm (HF `LlamaModel`)."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, residual_dtype, attn_impl, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=residual_dtype, param_dtype=param_dtype,
                                      embedding_metadata={"out_sharding": ("vocab", "embed")}, rngs=rngs)
        self.layers = nnx.List([
            LlamaDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, attn_impl=attn_impl, rngs=rngs)
            for _ in range(cfg.num_hidden_layers)
        ])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)


class LlamaForCausalLM(nnx.Module):
    """HF-compatible LLaMA causal LM.

    `dtype` is the activation/matmul dtype, `param_dtype` the storage dtype of the weights,
    `residual_dtype` that of the residual stream (embeddings and the sums between blocks): fp32 by
    default, as in the original, whose fp32 embed_tokens output plus bf16 block outputs promote to fp32
    under autocast (bf16 halves the activations a remat checkpoint keeps).
    `attn_impl` picks `layers.attention`'s implementation; `remat` wraps every decoder layer in
    `nnx.remat` (True, or a `jax.checkpoint_policies` name).
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 residual_dtype=jnp.float32, attn_impl: layers.AttentionImpl = "reference",
                 remat: bool | str = False, rngs: nnx.Rngs):
        if attn_impl not in ("reference", "fused"):
            raise ValueError(f"attn_impl={attn_impl!r}: expected 'reference' or 'fused'")
        self.config = config
        self.dtype = dtype
        self.residual_dtype = residual_dtype
        if remat:
            _remat_policy(remat)
        self.remat = remat
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, residual_dtype=residual_dtype,
                                attn_impl=attn_impl, rngs=rngs)
        self.lm_head = None if config.tie_word_embeddings else layers.linear(
            config.hidden_size, config.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Input embeddings `[B, T] -> [B, T, D]` in `residual_dtype` (to splice image embeddings into)."""
        return self.model.embed_tokens(input_ids)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache of `max_length` slots per row (all invalid)."""
        c = self.config
        shape = (batch_size, c.num_key_value_heads, max_length, c.head_dim)
        dtype = dtype or self.dtype
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(c.num_hidden_layers))
        return KVCache(k=zeros, v=zeros, valid=jnp.zeros((batch_size, max_length), jnp.bool_))

    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, position_ids: jax.Array | None = None,
                 cache: KVCache | None = None) -> LlamaOutput:
        """Causal LM forward over `input_ids` `[B, T]` or `inputs_embeds` `[B, T, D]`.

        attention_mask `[B, T]` (1 = real token, default all ones). Without `cache`: causal + padding
        mask over the T tokens, position_ids default `arange(T)` for every row. With `cache`: the new
        keys/values are written to slots `position_ids` (default: each row's count of valid slots +
        arange(T)), the slots of real tokens become valid, and a query at position p attends to the
        valid slots s <= p. Positions >= the cache length are silently not stored.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = (self.embed(input_ids) if inputs_embeds is None else inputs_embeds).astype(self.residual_dtype)
        b, t, _ = x.shape
        real = jnp.ones((b, t), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
        steps = jnp.arange(t)
        new_k, new_v, slots = [], [], None
        if cache is None:
            if position_ids is None:
                position_ids = jnp.broadcast_to(steps, (b, t))
            mask = (steps[None, :] <= steps[:, None])[None] & real[:, None, :]
        else:
            if position_ids is None:
                position_ids = jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)[:, None] + steps[None, :]
            s = cache.valid.shape[1]
            slots = jnp.where(real, position_ids, s)
            valid = cache.valid.at[jnp.arange(b)[:, None], slots].set(True, mode="drop")
            mask = valid[:, None, :] & (jnp.arange(s)[None, None, :] <= position_ids[:, :, None])
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, self.dtype)
        mask = mask[:, None]
        # layers hold only parameters, so remat has nothing to write back (and works under jax.grad of
        # a closure over the model, as the trainer's step takes it)
        call = (nnx.remat(_call_layer, policy=_remat_policy(self.remat), graph_updates=False) if self.remat
                else _call_layer)
        for i, layer in enumerate(self.model.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv = call(layer, x, cos, sin, mask, kv, slots)
            if cache is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        hidden = self.model.norm(x)
        if self.lm_head is None:  # tied: the embedding matrix in the compute dtype (its lookups give the residual's)
            logits = jnp.dot(hidden, self.model.embed_tokens.embedding[...].astype(self.dtype).T)
        else:
            logits = self.lm_head(hidden)
        new_cache = None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v), valid=valid)
        return LlamaOutput(logits=logits.astype(jnp.float32), hidden_states=hidden, cache=new_cache)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.bfloat16,
                        residual_dtype=jnp.float32,
                        mesh: jax.sharding.Mesh | None = None, rules=parallel.DEFAULT_RULES,
                        attn_impl: layers.AttentionImpl = "reference", remat: bool | str = False
                        ) -> LlamaForCausalLM:
        """Load a hub-layout directory (config.json + model.safetensors | sharded index |
        pytorch_model*.bin) without eager init; tensors go one at a time straight to their shardings
        on `mesh` when given."""
        config = LlamaConfig.from_json(path)
        graphdef, abstract = km.abstract_model(lambda: cls(
            config, dtype=dtype, param_dtype=param_dtype, residual_dtype=residual_dtype, attn_impl=attn_impl,
            remat=remat, rngs=nnx.Rngs(0)))
        source = open_weights(path)
        convert_llama.check_tied(source, config.tie_word_embeddings)
        state = km.load_params(abstract, source, convert_llama.keymap(config.tie_word_embeddings),
                               mesh=mesh, rules=rules, what=f"LLaMA {path}")
        return km.materialize(graphdef, state)

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int | None = None) -> list[str]:
        """Write config.json + model.safetensors (or shards + index) in the HF layout; returns the
        weight file names. Merge LoRA adapters first (`lora.merge`), or export them with
        `convert.llama.export_peft`."""
        if prepared_for_decoding(self):
            raise ValueError("save_pretrained: this model's projections were re-laid by prepare_for_decoding "
                             "(fused or packed for inference); save before preparing it")
        d = pathlib.Path(path)
        d.mkdir(parents=True, exist_ok=True)
        tensors = km.export_params(nnx.state(self, nnx.Param), convert_llama.keymap(self.config.tie_word_embeddings))
        files = write_sharded_safetensors(d, tensors, max_shard_bytes=max_shard_bytes)  # a tensor at a time
        # after the weights: a save that fails midway leaves an earlier one whole
        write_atomically(d / "config.json",
                              json.dumps(self.config.to_hf(self.model.embed_tokens.embedding.dtype), indent=2))
        return files


def add_voken_rows(model: LlamaForCausalLM, num_new: int, *, vocab_size: int | None = None,
                   param_dtype=None) -> None:
    """Grow (in place) embed_tokens and lm_head for `num_new` new tokens, as MiniGPT-5 does.

    Both matrices are resized to `vocab_size` rows (default: old size + num_new; truncated or
    extended like transformers' `resize_token_embeddings`), then their LAST `num_new` rows are set
    to the mean of all rows before them (REFERENCE §1.6: Vicuna v0 has 32001 rows, resized to 32009;
    rows 32000..32008 take the mean of rows 0..31999). The mean is computed in fp32 and rounded to
    the weights' dtype; then both matrices are cast to `param_dtype` when given (the original keeps
    them in fp32 for training). Re-place the model on a mesh afterwards (`parallel.shard_model`).
    """
    old = model.config.vocab_size
    vocab_size = old + num_new if vocab_size is None else vocab_size
    if not 0 < num_new < vocab_size or vocab_size > old + num_new:
        raise ValueError(f"add_voken_rows: vocab_size={vocab_size} must keep rows before the {num_new} "
                         f"new ones and may grow the {old}-row vocabulary by at most num_new")

    def resized(w: jax.Array, axis: int) -> jax.Array:
        w = jnp.moveaxis(w, axis, 0)
        keep = w[: min(old, vocab_size - num_new)]
        mean = jnp.mean(keep.astype(jnp.float32), axis=0, keepdims=True).astype(w.dtype)
        w = jnp.concatenate([keep, jnp.broadcast_to(mean, (vocab_size - keep.shape[0], w.shape[1]))])
        w = jnp.moveaxis(w, 0, axis)
        return w if param_dtype is None else w.astype(param_dtype)

    embed = model.model.embed_tokens
    embed.embedding.set_value(resized(embed.embedding[...], 0))
    embed.num_embeddings = vocab_size
    if model.lm_head is not None:
        model.lm_head.kernel.set_value(resized(model.lm_head.kernel[...], 1))
        model.lm_head.out_features = vocab_size
    model.config = dataclasses.replace(model.config, vocab_size=vocab_size)


VOCAB_PARAMS = r"(^|\.)(embed_tokens|lm_head)\."


def keep_new_rows(model: nnx.Module, num_new: int, *, params: str = VOCAB_PARAMS) -> optax.GradientTransformation:
    """A stateless transform zeroing everything outside the last `num_new` vocab rows of the
    parameters whose dotted path matches `params` (embed_tokens and lm_head); other leaves pass.

    The vocab axis of each matched parameter is read from its logical names. Leaves are matched by
    their path in the optimizer's tree (`nnx.state(model, wrt)` paths).
    """
    axes = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = ".".join(map(str, path))
        if re.search(params, key):
            names = tuple(var.get_metadata().get("out_sharding") or ())
            if "vocab" not in names:
                raise ValueError(f"keep_new_rows: parameter {key!r} has no 'vocab' axis (logical names {names})")
            axes[key] = names.index("vocab")
    if not axes:
        raise ValueError(f"keep_new_rows: no parameter path matches params={params!r}")

    def mask(updates, params=None):
        matched = []

        def one(path, u):
            axis = axes.get(km.keypath_str(path))
            if axis is None or u is None:
                return u
            matched.append(path)
            n = u.shape[axis]
            rows = (jnp.arange(n) >= n - num_new).reshape([n if i == axis else 1 for i in range(u.ndim)])
            return jnp.where(rows, u, jnp.zeros_like(u))

        out = jax.tree_util.tree_map_with_path(one, updates)
        if not matched:
            raise ValueError(f"keep_new_rows: none of {sorted(axes)} is in the updates tree")
        return out

    return optax.stateless(mask)


def train_new_rows_only(tx: optax.GradientTransformation, model: nnx.Module, num_new: int, *,
                        params: str = VOCAB_PARAMS) -> optax.GradientTransformation:
    """Wrap `tx` so that only the last `num_new` rows of embed_tokens / lm_head can change.

    The gradients are masked before `tx` (as the original masks `.grad`) and the final updates after
    it, so decoupled weight decay cannot move the old rows either: they stay bit-identical. This
    deliberately differs from the original, whose AdamW (weight_decay 0.01) decays every row.
    """
    keep = keep_new_rows(model, num_new, params=params)
    return optax.chain(keep, tx, keep)


def _fused_linear(parts: list[nnx.Module], axes: tuple[str, str]) -> nnx.Linear:
    """One bias-free `nnx.Linear` whose kernel is `parts`' kernels side by side (LoRA adapters folded in).
    Its output axis takes one logical name: under tensor parallelism the split that follows the matmul
    may then move data between devices, but the result is the same."""
    kernel = jnp.concatenate([m.merged_kernel() if isinstance(m, LoraLinear) else m.kernel[...] for m in parts],
                             axis=1)
    fused = nnx.eval_shape(lambda: layers.linear(kernel.shape[0], kernel.shape[1], axes, use_bias=False,
                                                 dtype=parts[0].dtype, param_dtype=kernel.dtype, rngs=nnx.Rngs(0)))
    fused.kernel.set_value(kernel)
    return fused


def _fusable(parts: list[nnx.Module]) -> bool:
    return all((type(m) is nnx.Linear or isinstance(m, LoraLinear)) and m.bias is None for m in parts) \
        and len({m.kernel.dtype for m in parts}) == 1


def _on_one_cpu(model: nnx.Module) -> bool:
    devices = {d for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)) for d in leaf.sharding.device_set}
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def prepare_for_decoding(model: LlamaForCausalLM) -> dict:
    """Re-lay (in place) the projections for inference speed; the model computes the same function.

    * Each layer's q/k/v projections become one `qkv_proj` and gate/up one `gate_up_proj` (LoRA
      adapters folded in): one wide matmul where there were three, and two.
    * On a CPU where `cpu_decode.available()`, with the model on that one device, every fp32 projection
      and the untied lm_head become `cpu_decode.PackedLinear`s: a decode step's few rows no longer pay
      for Eigen's per-call weight packing (about 2x faster at batch 8 on the benchmark's LLaMA), and a
      prefill's many rows run as fast as with XLA's dot or faster (2-3x for a 31-token prompt); and
      one-token steps attend over an fp32 cache with `cpu_decode.decode_attention`.

    Int8 layers (`quantize_int8`; quantize first) are left as they are. Afterwards the model is for
    inference only: it cannot be trained or saved in the HF layout (save first). Returns what was done:
    `{"fused_layers": n, "packed_layers": n, "not_packed": reason or None}` (without packing, attention
    is left as it is too).
    """
    fused = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None and _fusable([attn.q_proj, attn.k_proj, attn.v_proj]):
            attn.qkv_proj = _fused_linear([attn.q_proj, attn.k_proj, attn.v_proj], ("embed", "heads"))
            attn.q_proj = attn.k_proj = attn.v_proj = None
            fused += 1
        if mlp.gate_up_proj is None and _fusable([mlp.gate_proj, mlp.up_proj]):
            mlp.gate_up_proj = _fused_linear([mlp.gate_proj, mlp.up_proj], ("embed", "mlp"))
            mlp.gate_proj = mlp.up_proj = None
    reason = cpu_decode.unavailable_reason() if _on_one_cpu(model) else "the model is not on one CPU device"
    packed = 0
    if reason is None:
        owners = [(model, ("lm_head",))]
        for layer in model.model.layers:
            owners += [(layer.self_attn, ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj")),
                       (layer.mlp, ("gate_up_proj", "gate_proj", "up_proj", "down_proj"))]
            layer.self_attn.decode_kernel = True
        for owner, names in owners:
            for name in names:
                if cpu_decode.PackedLinear.accepts(m := getattr(owner, name)):
                    setattr(owner, name, cpu_decode.PackedLinear(m))
                    packed += 1
    return {"fused_layers": fused, "packed_layers": packed, "not_packed": reason}


def prepared_for_decoding(model: LlamaForCausalLM) -> bool:
    """Whether `prepare_for_decoding` changed the model's layout."""
    return any(layer.self_attn.qkv_proj is not None or layer.mlp.gate_up_proj is not None
               or layer.self_attn.decode_kernel for layer in model.model.layers) or any(
        isinstance(m, cpu_decode.PackedLinear) for _, m in nnx.iter_modules(model))
