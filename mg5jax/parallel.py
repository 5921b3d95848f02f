"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter and sharded activation in mg5jax is annotated with *logical* axis names; this
module is the only place that decides which mesh axis each name lands on.

Glossary of logical names:
  batch      examples in a batch (activations)
  length     sequence / token positions (activations)
  embed      the residual width of a model (LLM 4096, ViT 1408, mapper 1024, U-Net channels of a linear)
  vocab      vocabulary rows of embedding tables and lm_head
  heads      query heads × head_dim, flattened (attention projections)
  kv_heads   key/value heads × head_dim, flattened (grouped-query attention)
  mlp        the hidden width of feed-forward layers
  conv_in    input channels of a convolution kernel
  conv_out   output channels of a convolution kernel
  norm       scales and biases of normalisation layers (always replicated)
  lora       the rank of a LoRA adapter (always replicated)
  queries    learned query tokens (Q-Former queries, mapper decoder prompt)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None for replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("norm", None),
    ("lora", None),
    ("queries", None),
)

def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be >= 1, one of them may be -1 (the remaining devices); got "
                         f"data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    return Mesh(
        np.asarray(devices).reshape(sizes),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


def logical_to_mesh(logical: Sequence[str | None] | None, rules=DEFAULT_RULES) -> PartitionSpec:
    """Resolve a tuple of logical axis names to a PartitionSpec; unknown names are errors."""
    if not logical:
        return PartitionSpec()
    table = dict(rules)
    out = []
    for name in logical:
        if name is None:
            out.append(None)
        elif name in table:
            out.append(table[name])
        else:
            raise KeyError(f"logical axis name {name!r} has no rule; known names: {sorted(table)}")
    return PartitionSpec(*out)


@contextlib.contextmanager
def axis_rules(rules=DEFAULT_RULES):
    """Make flax resolve parameters' logical `out_sharding` names with `rules`."""
    with core_spmd.logical_axis_rules(tuple(rules)):
        yield


def _fit_to_mesh(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes whose size does not divide the dimension they shard (tiny test models)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fitted.append((names if len(names) > 1 else names[0]) if names and dim % size == 0 else None)
    return PartitionSpec(*fitted)


_LARGE = 1 << 20  # elements: an array this big left unsplit on an axis is worth a warning


def _check_names(state: nnx.State, mesh: Mesh, rules) -> None:
    """Unknown logical names are errors (flax would pass them through and the array would end up
    replicated); a large array that keeps a dimension unsplit because the axis does not divide it is
    worth a warning (e.g. a vocabulary of 32009 rows over `tensor`)."""
    table = dict(rules)
    for path, v in nnx.to_flat_state(state):
        names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
        if not names:
            continue
        unknown = [n for n in names if n is not None and n not in table]
        if unknown:
            raise KeyError(f"{'.'.join(map(str, path))}: logical axis name(s) {unknown} have no rule; "
                           f"known names: {sorted(table)}")
        shape = getattr(v.get_value(), "shape", ())
        if int(np.prod(shape)) >= _LARGE:
            spec = logical_to_mesh(names, rules)
            fitted = _fit_to_mesh(spec, shape, mesh)
            lost = [(n, dim) for n, dim, want, got in zip(names, shape, spec, fitted)
                    if want is not None and got is None
                    and any(mesh.shape.get(a, 1) > 1 for a in (want if isinstance(want, tuple) else (want,)))]
            if lost:
                log.warning("%s %s: %s not split over the mesh (size not divisible)", ".".join(map(str, path)),
                            tuple(shape), ", ".join(f"{n}={dim}" for n, dim in lost))


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """NamedShardings for every variable of `state` from its logical names (fitted to the mesh)."""
    _check_names(state, mesh, rules)
    with axis_rules(rules):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(
        lambda v, s: NamedSharding(mesh, _fit_to_mesh(s, v.shape, mesh)),
        state,
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Place every variable of `model` on `mesh` as its logical names say (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch-major array with `ndim` dims: the batch dim over the batch axes."""
    spec = logical_to_mesh(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def describe(state: nnx.State) -> list[str]:
    """One line per variable: path, shape, dtype and sharding (for startup logs)."""
    lines = []
    for path, v in nnx.to_flat_state(state):
        value = v.get_value() if hasattr(v, "get_value") else v
        sharding = getattr(value, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else "-"
        lines.append(f"{'.'.join(map(str, path))} {tuple(value.shape)} {value.dtype} {spec}")
    return lines
