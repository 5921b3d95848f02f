"""LoRA adapters on chosen linear projections, as peft's `LoraConfig` does (MiniGPT-5 stage 2).

`apply_lora(model, targets=regex)` replaces every `nnx.Linear` whose dotted module path matches
`targets` by a `LoraLinear` that keeps the base `kernel` (same parameter path, so the base checkpoint
map still applies) and adds `lora_a` [in, r] and `lora_b` [r, out]:

    y = x @ kernel + (dropout(x) @ lora_a @ lora_b) * alpha / r

The adapters are `LoraParam`s (flax's `nnx.LoRAParam`, a `Param` subclass), so
`nnx.Optimizer(model, tx, wrt=LoraParam)` and `nnx.DiffState(0, LoraParam)` select exactly them.
Dropout is off by default; `model.train()` (or `nnx.view(model, deterministic=False)`) turns it on and
draws masks from the `dropout` stream of the `rngs` given to `apply_lora`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from mg5jax.models import layers

LoraParam = nnx.LoRAParam

# peft's lora_A init: kaiming_uniform_(a=sqrt(5)) on the torch weight [r, in], i.e. U(-1/sqrt(in), 1/sqrt(in))
lora_a_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

DEFAULT_TARGETS = r"(^|\.)(q_proj|v_proj)$"


class LoraLinear(nnx.Module):
    """A linear layer `[..., in] -> [..., out]` with a low-rank update; owns the base layer's variables."""

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, dropout: float,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.dtype = base.dtype
        self.precision = base.precision
        self.kernel = base.kernel
        self.bias = base.bias
        self.rank = rank
        self.scaling = alpha / rank
        in_axis, out_axis = self.kernel.get_metadata().get("out_sharding") or (None, None)
        self.lora_a = LoraParam(lora_a_init(rngs.params(), (self.in_features, rank), param_dtype),
                                out_sharding=(in_axis, "lora"))
        self.lora_b = LoraParam(jnp.zeros((rank, self.out_features), param_dtype), out_sharding=("lora", out_axis))
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype), precision=self.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        h = self.dropout(x) if self.dropout is not None else x
        a = self.lora_a[...]
        delta = jnp.dot(jnp.dot(h.astype(a.dtype), a), self.lora_b[...]) * self.scaling
        return y + delta.astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """`kernel + lora_a @ lora_b * scaling` (computed in fp32, stored in the kernel dtype)."""
        delta = self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32) * self.scaling
        return (self.kernel[...].astype(jnp.float32) + delta).astype(self.kernel.dtype)


def dotted_path(path) -> str:
    """`("model", "layers", 0, "q_proj")` -> "model.layers.0.q_proj"."""
    return ".".join(map(str, path))


def set_submodule(root: nnx.Module, path: tuple, new: nnx.Module) -> None:
    """Put `new` at `path` (attribute names and list indices) under `root`, replacing what is there."""
    parent = root
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def apply_lora(
    model: nnx.Module,
    *,
    targets: str = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> list[str]:
    """Wrap (in place) every `nnx.Linear` whose dotted module path matches `targets` (re.search).

    Defaults are MiniGPT-5's stage-2 peft config: q_proj and v_proj of every layer, r=8, alpha=16,
    dropout 0.05; adapters in fp32, lora_b zero so the wrapped model starts equal to the base.
    Returns the wrapped paths.
    """
    pattern = re.compile(targets)
    found = [(path, m) for path, m in nnx.iter_modules(model)
             if type(m) is nnx.Linear and pattern.search(dotted_path(path))]
    if not found:
        raise ValueError(f"apply_lora: no nnx.Linear module path matches targets={targets!r}")
    for path, base in found:
        set_submodule(model, path, LoraLinear(base, rank=rank, alpha=alpha, dropout=dropout,
                                               param_dtype=param_dtype, rngs=rngs))
    return [dotted_path(p) for p, _ in found]


def lora_paths(model: nnx.Module) -> list[str]:
    """Dotted paths of the `LoraLinear` modules in `model`, in module order."""
    return [dotted_path(p) for p, m in nnx.iter_modules(model) if isinstance(m, LoraLinear)]


def merge(model: nnx.Module) -> list[str]:
    """Fold every adapter into its base kernel and put plain `nnx.Linear`s back (in place).

    The merged layer keeps the base kernel's dtype, metadata and sharding. Returns the merged paths.
    """
    found = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, LoraLinear)]
    for path, lm in found:
        axes = lm.kernel.get_metadata().get("out_sharding") or (None, None)
        plain = nnx.eval_shape(lambda lm=lm, axes=axes: layers.linear(
            lm.in_features, lm.out_features, axes, use_bias=lm.bias is not None, dtype=lm.dtype,
            param_dtype=lm.kernel.dtype, rngs=nnx.Rngs(0)))
        lm.kernel.set_value(lm.merged_kernel())
        plain.kernel = lm.kernel
        plain.bias = lm.bias
        plain.precision = lm.precision
        set_submodule(model, path, plain)
    return [dotted_path(p) for p, _ in found]
