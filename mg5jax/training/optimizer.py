"""What is trained and how: ordered `(regex, lr multiplier | None)` rules -> trainable set + AdamW.

The rules are matched (`re.fullmatch`, first match wins) against every `nnx.Param`'s dotted path
(`mapper.encoder.layers.0.self_attn.q_proj.kernel`); a multiplier scales the base learning rate
for that parameter, `None` freezes it, and a parameter no rule matches is frozen. Frozen
parameters are not in the optimizer at all, so neither gradients nor weight decay reach them.

The update is torch's AdamW (betas 0.9/0.999, eps 1e-8, decoupled weight decay 0.01) with each
parameter's lr = base lr × multiplier × the HF linear warmup/decay factor of the optimizer-update
count (REFERENCE §5.2-5.3). Gradient accumulation uses `optax.MultiSteps`: every call is one
micro-batch, the accumulated mean gradient is applied every `grad_accum_steps` calls, and the
schedule counts applied updates only.

An update mask that lets whole rows through (the new voken rows of embed_tokens / lm_head) keeps
optimizer state for those rows only: AdamW's moments (and MultiSteps' accumulator) of a
[32009, 4096] embedding shrink to [9, 4096], and the update touches 9 rows instead of all.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mg5jax.convert.keymap import keypath_str

log = logging.getLogger(__name__)

TrainableRules = Sequence[tuple[str, float | None]]
# exact dotted path -> multiplicative mask broadcastable to the param, or a callable
# (dotted path, param value) -> mask | None
UpdateMasks = Mapping[str, "np.ndarray | jax.Array"] | Callable[[str, jax.Array], "np.ndarray | jax.Array | None"]


def check_trainable(rules, where: str = "OptimizerConfig.trainable") -> tuple[tuple[str, float | None], ...]:
    """The trainable rules as a tuple of `(regex, lr multiplier >= 0 | None)` pairs; anything else is an
    error naming `where` and the entry."""
    if isinstance(rules, str) or not isinstance(rules, (list, tuple)):
        raise ValueError(f"{where} must be a sequence of (regex, lr multiplier | None) pairs, got {rules!r}")
    out = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str) or not (
                rule[1] is None or (isinstance(rule[1], (int, float)) and rule[1] >= 0)):
            raise ValueError(f"{where}[{i}] must be (regex, multiplier >= 0 | None), got {rule!r}")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"{where}[{i}]: bad regex {rule[0]!r}: {e}") from e
        out.append(tuple(rule))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + linear warmup/decay; defaults are the original's (REFERENCE §5)."""

    learning_rate: float = 2e-5  # base lr; each group uses learning_rate × its multiplier
    b1: float = 0.9  # Adam beta1
    b2: float = 0.999  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.01  # decoupled (AdamW) weight decay on trainable params
    warmup_steps: int = 1000  # optimizer updates of linear warmup from 0
    total_steps: int = 10_000  # optimizer updates at which the lr reaches 0
    grad_clip_norm: float | None = None  # global-norm gradient clipping; None = off (as the original)
    grad_accum_steps: int = 1  # micro-batches per optimizer update (optax.MultiSteps)
    trainable: tuple[tuple[str, float | None], ...] = ()  # ordered (regex, lr multiplier | None)

    def __post_init__(self):
        if self.total_steps < 1 or self.warmup_steps < 0 or self.grad_accum_steps < 1:
            raise ValueError(f"OptimizerConfig: need total_steps >= 1, warmup_steps >= 0, grad_accum_steps >= 1; "
                             f"got {self.total_steps}, {self.warmup_steps}, {self.grad_accum_steps}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError(f"OptimizerConfig.grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}")
        object.__setattr__(self, "trainable", check_trainable(self.trainable))

    @classmethod
    def from_dict(cls, d: Mapping) -> OptimizerConfig:
        """Build from a plain mapping (e.g. `ConfigDict.to_dict()`); an unknown key is an error naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d).difference(names))
        if unknown:
            raise ValueError(f"OptimizerConfig: unknown key {unknown[0]!r}; known keys: {sorted(names)}")
        return cls(**dict(d))


def _dotted(path: Sequence) -> str:
    return ".".join(map(str, path))


def resolve_trainable(model: nnx.Module | nnx.State, rules: TrainableRules, *,
                      warn_unused: bool = True) -> dict[str, float | None]:
    """`{dotted path: lr multiplier or None (frozen)}` for every `nnx.Param` of `model` (a rule that
    matches none is logged when `warn_unused`)."""
    state = model if isinstance(model, nnx.State) else nnx.state(model, nnx.Param)
    compiled = [(re.compile(pattern), mult) for pattern, mult in rules]
    used = [False] * len(compiled)
    labels: dict[str, float | None] = {}
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, nnx.Param):
            continue
        name = _dotted(path)
        labels[name] = None
        for i, (rx, mult) in enumerate(compiled):
            if rx.fullmatch(name):
                labels[name] = None if mult is None else float(mult)
                used[i] = True
                break
    for (pattern, _), hit in zip(rules, used):
        if warn_unused and not hit:
            log.warning("trainable rule %r matches no parameter", pattern)
    return labels


@dataclasses.dataclass(frozen=True)
class TrainableFilter:
    """An nnx filter selecting exactly the trainable `nnx.Param`s; holds their lr multipliers."""

    multipliers: tuple[tuple[str, float], ...]  # (dotted path, lr multiplier) of each trainable param
    paths: frozenset[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "paths", frozenset(p for p, _ in self.multipliers))

    def __call__(self, path: Sequence, value) -> bool:
        return isinstance(value, nnx.Param) and _dotted(path) in self.paths


def linear_warmup_decay(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """HF `get_linear_schedule_with_warmup`: lr(n) for the n-th optimizer update (0-based), so the
    first update has lr 0, the (warmup+1)-th has `peak`, and lr reaches 0 at `total_steps`."""

    def schedule(count):
        n = jnp.asarray(count, jnp.float32)
        warm = n / max(1, warmup_steps)
        decay = jnp.maximum(0.0, (total_steps - n) / max(1, total_steps - warmup_steps))
        return peak * jnp.where(n < warmup_steps, warm, decay)

    return schedule


def masked_global_norm(grads: nnx.State, masks: Mapping[str, np.ndarray]) -> jax.Array:
    """The global norm of `grads` times `resolve_masks`' masks: what clipping sees, since the optimizer
    applies the masks first."""
    total = jnp.zeros((), jnp.float32)
    for path, v in nnx.to_flat_state(grads):
        g = v.get_value().astype(jnp.float32)
        mask = masks.get(_dotted(path))
        total += jnp.sum(jnp.square(g if mask is None else g * jnp.asarray(mask, jnp.float32)))
    return jnp.sqrt(total)


def _scale_by_path(factors: Mapping[str, np.ndarray | float]) -> optax.GradientTransformation:
    """Multiply the update of each listed path by its factor (scalar or broadcastable array)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params

        def scale(keypath, u):
            factor = factors.get(keypath_str(keypath))
            return u if factor is None else u * jnp.asarray(factor, u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(init, update)


def resolve_masks(masks: UpdateMasks | None, state: nnx.State) -> dict[str, np.ndarray]:
    """`{param path: mask}` for the trainable `state` (a callable `masks` asked per path); a path that
    is not trainable or a mask that does not broadcast to its param is an error."""
    if masks is None:
        return {}
    values = {_dotted(p): v.get_value() for p, v in nnx.to_flat_state(state)}
    if callable(masks):
        resolved = {p: masks(p, v) for p, v in values.items()}
        resolved = {p: m for p, m in resolved.items() if m is not None}
    else:
        resolved = dict(masks)
    out = {}
    for path, mask in resolved.items():
        if path not in values:
            raise ValueError(f"update mask for {path!r}: not a trainable parameter "
                             f"(trainable: {sorted(values)[:8]}{'...' if len(values) > 8 else ''})")
        mask = np.asarray(mask, np.float32)
        shape = tuple(values[path].shape)
        if np.broadcast_shapes(mask.shape, shape) != shape:
            raise ValueError(f"update mask for {path!r}: shape {mask.shape} does not broadcast to {shape}")
        out[path] = mask
    return out


RowSelection = tuple[int, "slice | np.ndarray"]  # (axis, the indices along it that may move)


def _row_selection(mask: np.ndarray, shape: tuple[int, ...]) -> RowSelection | None:
    """`(axis, indices)` when `mask` is 0/1 and varies along one axis of `shape` only (it lets whole rows
    through), with a contiguous run of indices as a slice; None for any other mask."""
    varying = [i for i, n in enumerate(mask.shape) if n != 1]
    if len(varying) != 1 or not np.isin(mask, (0.0, 1.0)).all():
        return None
    rows = np.flatnonzero(mask.reshape(-1))
    if rows.size == 0:
        return None
    axis = len(shape) - mask.ndim + varying[0]  # masks broadcast from the right
    contiguous = rows[-1] - rows[0] + 1 == rows.size
    return axis, slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows


def _on_rows(inner: optax.GradientTransformation, selections: Mapping[str, RowSelection]
             ) -> optax.GradientTransformation:
    """`inner` applied to the selected rows of the listed params only: its state holds those rows alone
    (their logical sharding name dropped on the row axis, the rows being few), and every other row's
    update is exactly zero."""

    def take(tree):
        def one(keypath, x):
            selection = selections.get(keypath_str(keypath))
            if selection is None:
                return x
            axis, rows = selection
            if isinstance(x, nnx.Variable):  # init sees Variables: keep their metadata, minus the row axis' name
                names = x.get_metadata().get("out_sharding")
                extra = {"out_sharding": tuple(None if i == axis else n for i, n in enumerate(names))} if names else {}
                return x.replace(x.get_value()[_index(axis, rows)], **extra)
            return x[_index(axis, rows)]

        return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def init(params):
        return inner.init(take(params))

    def update(updates, state, params=None):
        small, state = inner.update(take(updates), state, None if params is None else take(params))

        def put(keypath, full, u):
            selection = selections.get(keypath_str(keypath))
            return u if selection is None else jnp.zeros_like(full).at[_index(*selection)].set(u)

        return jax.tree_util.tree_map_with_path(put, updates, small), state

    return optax.GradientTransformation(init, update)


def _index(axis: int, rows) -> tuple:
    """The index taking `rows` along `axis`."""
    return (slice(None),) * axis + (rows,)


def build_optimizer(
    model: nnx.Module, cfg: OptimizerConfig, *, update_masks: UpdateMasks | None = None
) -> tuple[optax.GradientTransformation, TrainableFilter]:
    """The AdamW transformation for `model`'s trainable params and the filter selecting them.

    `update_masks` multiply the gradients before anything else (a masked entry, e.g. an embedding row
    that is not a voken, counts toward no clipping norm) and the *final* updates (after weight decay
    and the lr), so it never moves. A 0/1 mask that selects whole rows does this by keeping only
    those rows in the optimizer (`_on_rows`). Use with `nnx.Optimizer(model, tx, wrt=filter)`.
    """
    labels = resolve_trainable(model, cfg.trainable)
    multipliers = tuple((p, m) for p, m in labels.items() if m is not None)
    if not multipliers:
        raise ValueError(f"no trainable parameters: the rules {list(cfg.trainable)} match none of "
                         f"{len(labels)} params (first: {list(labels)[:3]})")
    wrt = TrainableFilter(multipliers)
    state = nnx.state(model, wrt)
    masks = resolve_masks(update_masks, state)
    shapes = {_dotted(p): tuple(v.shape) for p, v in nnx.to_flat_state(state)}
    selections = {p: sel for p, m in masks.items() if (sel := _row_selection(m, shapes[p])) is not None}
    masks = {p: m for p, m in masks.items() if p not in selections}
    schedule = linear_warmup_decay(cfg.learning_rate, cfg.warmup_steps, cfg.total_steps)
    tx = optax.chain(
        _scale_by_path(masks),
        optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm else optax.identity(),
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(schedule),
        _scale_by_path({p: m for p, m in multipliers if m != 1.0}),
        _scale_by_path(masks),
    )
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    if selections:
        tx = _on_rows(tx, selections)
    groups: dict[float, int] = {}
    for _, m in multipliers:
        groups[m] = groups.get(m, 0) + 1
    notes = [f"{len(masks)} elementwise update masks"] if masks else []
    notes += [f"state for {p}'s selected rows only: {shapes[p]} -> {np.broadcast_to(0, shapes[p])[_index(*s)].shape}"
              for p, s in selections.items()]
    log.info("optimizer: %d trainable / %d params; lr multiplier groups %s%s", len(multipliers), len(labels), groups,
             "".join(f"; {n}" for n in notes))
    return tx, wrt
