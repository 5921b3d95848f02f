"""Conversion as data: a declarative key map between a checkpoint's keys and our parameter paths.

A `Rule` pairs a checkpoint key pattern with one or more of our parameter path patterns and a small
reversible `Transform`. Patterns use `{name}` placeholders for integer indices, e.g.
`Rule("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.attn.q_proj.kernel", LINEAR)`.
A rule with several of our paths splits the checkpoint tensor evenly along `split_axis` (in the
checkpoint's layout) — a fused qkv projection — and concatenates them back on export.

Our parameter paths are the dotted `nnx.State` paths (`model.layers.0.attn.q_proj.kernel`).
Loading is strict: a parameter with no rule, a key the rules need but the file lacks, a key in
the file that no rule consumes, and a shape mismatch are all errors that name the key and file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from mg5jax import parallel
from mg5jax.convert.sources import CheckpointError, TensorSource

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Transform:
    """A pair of pure functions between the checkpoint layout and ours."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_theirs: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch Linear weight [out, in] <-> Dense kernel [in, out]
LINEAR = Transform("linear", lambda w: w.T, lambda w: w.T)
# torch Conv2d weight [O, I, kh, kw] <-> flax Conv kernel [kh, kw, I, O]
CONV = Transform("conv", lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))
def _squeeze(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """`np.squeeze`, refusing an axis that is not of size 1 (it would drop data silently)."""
    if any(x.ndim <= a or x.shape[a] != 1 for a in axes):
        raise ValueError(f"expected size 1 on axes {axes}, got shape {tuple(x.shape)}")
    return np.squeeze(x, axes)


# a leading singleton axis in the checkpoint ([1, N, D] <-> [N, D])
SQUEEZE0 = Transform("squeeze0", lambda x: _squeeze(x, (0,)), lambda x: x[None])
# a 1x1 torch conv used as a linear layer: [O, I, 1, 1] <-> kernel [I, O]
CONV1X1_AS_LINEAR = Transform("conv1x1_as_linear", lambda w: _squeeze(w, (2, 3)).T,
                              lambda w: w.T[:, :, None, None])


@dataclasses.dataclass(frozen=True)
class Rule:
    """Checkpoint key pattern <-> our path pattern(s), with a transform."""

    theirs: str
    ours: str | tuple[str, ...]
    transform: Transform = IDENTITY
    split_axis: int = 0

    @property
    def ours_patterns(self) -> tuple[str, ...]:
        return (self.ours,) if isinstance(self.ours, str) else tuple(self.ours)


@dataclasses.dataclass(frozen=True)
class BoundRule:
    """A rule with its placeholders filled: one checkpoint key, our concrete path(s)."""

    theirs: str
    ours: tuple[str, ...]
    transform: Transform
    split_axis: int

    def to_ours(self, tensor: np.ndarray) -> tuple[np.ndarray, ...]:
        parts = np.split(tensor, len(self.ours), axis=self.split_axis) if len(self.ours) > 1 else [tensor]
        return tuple(self.transform.to_ours(p) for p in parts)

    def to_theirs(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        parts = [self.transform.to_theirs(a) for a in arrays]
        return np.concatenate(parts, axis=self.split_axis) if len(parts) > 1 else parts[0]


def _pattern_regex(pattern: str) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


class KeyMap:
    """An ordered list of rules, plus checkpoint keys that may be present and are ignored."""

    def __init__(self, rules: Iterable[Rule], ignore: Iterable[str] = ()):
        self.rules = tuple(rules)
        self.ignore = tuple(re.compile(p) for p in ignore)
        self._regexes = [tuple(_pattern_regex(p) for p in r.ours_patterns) for r in self.rules]

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap(self.rules + other.rules, [p.pattern for p in self.ignore + other.ignore])

    def prefixed(self, theirs: str = "", ours: str = "") -> KeyMap:
        """The same map with prefixes added to the checkpoint keys and/or our paths (ignore patterns
        anchored at the key's start are anchored after the new prefix)."""
        rules = [
            dataclasses.replace(r, theirs=theirs + r.theirs,
                                ours=tuple(ours + p for p in r.ours_patterns))
            for r in self.rules
        ]
        ignore = [f"^{re.escape(theirs)}{p.pattern[1:]}" if p.pattern.startswith("^") else p.pattern
                  for p in self.ignore]
        return KeyMap(rules, ignore)

    def bind(self, our_paths: Iterable[str]) -> list[BoundRule]:
        """Concrete rules for exactly these parameter paths; a path no rule covers is an error."""
        our_paths = list(our_paths)
        covered: set[str] = set()
        bound: dict[str, BoundRule] = {}
        for path in our_paths:
            if path in covered:
                continue
            for rule, regexes in zip(self.rules, self._regexes):
                m = next((rx.match(path) for rx in regexes if rx.match(path)), None)
                if m is None:
                    continue
                groups = m.groupdict()
                ours = tuple(p.format(**groups) for p in rule.ours_patterns)
                b = BoundRule(rule.theirs.format(**groups), ours, rule.transform, rule.split_axis)
                if b.theirs in bound:
                    raise CheckpointError(f"two rules produce checkpoint key {b.theirs!r}")
                bound[b.theirs] = b
                covered.update(ours)
                break
            else:
                raise CheckpointError(f"no conversion rule for our parameter {path!r}")
        unknown = covered.difference(our_paths)
        if unknown:
            raise CheckpointError(f"conversion rules name parameters the model does not have: {sorted(unknown)[:5]}")
        return list(bound.values())

    def is_ignored(self, key: str) -> bool:
        return any(p.search(key) for p in self.ignore)


def keypath_str(keypath) -> str:
    """A pytree key path (`jax.tree_util.tree_flatten_with_path`) as our dotted parameter path."""
    return ".".join(str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k)) for k in keypath)


def flat_params(state: nnx.State) -> dict[str, nnx.Variable]:
    """`{dotted path: variable}` for every variable in `state`."""
    return {".".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


def load_params(
    abstract_state: nnx.State,
    source: TensorSource,
    keymap: KeyMap,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules=parallel.DEFAULT_RULES,
    what: str = "model",
) -> nnx.State:
    """Fill an abstract state (from `nnx.eval_shape`), or replace a live one's values, with converted
    tensors from `source`.

    Each tensor is read, transformed, cast to the state's dtype and put on device before the next one
    is read: sharded by its logical names when `mesh` is given, else where a live value already is.
    """
    flat = flat_params(abstract_state)
    bound = keymap.bind(flat)
    needed = {b.theirs for b in bound}
    missing = sorted(needed.difference(source.keys()))
    if missing:
        raise CheckpointError(
            f"{what}: missing key {missing[0]!r} in {source.description}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(k for k in source.keys() if k not in needed and not keymap.is_ignored(k))
    if unexpected:
        raise CheckpointError(
            f"{what}: unexpected key {unexpected[0]!r} in {source.where(unexpected[0])}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    shardings = parallel.state_shardings(abstract_state, mesh, rules) if mesh is not None else None
    flat_shardings = flat_params(shardings) if shardings is not None else {}
    values: dict[str, jax.Array] = {}
    # an explicit `disable` overrides tqdm's own reading of TQDM_DISABLE: honour it here
    quiet = len(bound) < 64 or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    for b in tqdm(bound, desc=f"loading {what}", unit="tensor", leave=False, disable=quiet):
        try:
            tensor = source[b.theirs]
        except CheckpointError:
            raise
        except Exception as e:  # an unreadable dtype or a broken file
            raise CheckpointError(f"{what}: key {b.theirs!r} in {source.where(b.theirs)}: cannot read it "
                                  f"({type(e).__name__}: {e})") from e
        try:
            converted = b.to_ours(tensor)
        except Exception as e:  # a transform or split the tensor does not fit
            raise CheckpointError(f"{what}: key {b.theirs!r} in {source.where(b.theirs)}: cannot convert it to "
                                  f"{', '.join(b.ours)} ({b.transform.name}: {type(e).__name__}: {e})") from e
        for path, arr in zip(b.ours, converted):
            var = flat[path]
            if tuple(arr.shape) != tuple(var.shape):
                raise CheckpointError(
                    f"{what}: key {b.theirs!r} in {source.where(b.theirs)}: expected shape "
                    f"{tuple(var.shape)} for {path!r} (after {b.transform.name}), got {tuple(arr.shape)}")
            value = np.asarray(arr).astype(var.dtype)
            sharding = flat_shardings.get(path)
            current = var.get_value()  # a live model's array keeps its placement
            target = sharding.get_value() if sharding is not None else \
                current.sharding if isinstance(current, jax.Array) else None
            values[path] = jax.device_put(value, target)
    log.info("loaded %s: %d tensors from %s", what, len(bound), source.description)
    return _replace_values(abstract_state, values)


def _replace_values(state: nnx.State, values: dict[str, jax.Array]) -> nnx.State:
    flat = nnx.to_flat_state(state)
    out = []
    for path, v in flat:
        key = ".".join(map(str, path))
        out.append((path, v.replace(values[key]) if key in values else v))
    return nnx.from_flat_state(out)


def export_params(state: nnx.State, keymap: KeyMap, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(checkpoint key, array)` for every parameter in `state`, inverse-transformed."""
    flat = flat_params(state)
    for b in keymap.bind(flat):
        arrays = []
        for p in b.ours:
            a = np.asarray(jax.device_get(flat[p].get_value()))
            arrays.append(a.astype(dtype) if dtype is not None else a)
        yield b.theirs, np.require(b.to_theirs(arrays), requirements="C")  # 0-d stays 0-d


def abstract_rngs(seed: int = 0) -> nnx.Rngs:
    """Rngs for building a model under `nnx.eval_shape` (weights loaded afterwards).

    The params stream counts in numpy, so each draw stays a constant: with a traced count, flax's
    update compares the tracer's sharding, whose error message walks the whole trace (a U-Net's
    abstract build then takes 10-15 s instead of 2 s).
    """
    rngs = nnx.Rngs(seed)
    rngs.params.count.set_value(np.zeros((), np.uint32))
    return rngs


def abstract_model(ctor: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and abstract state (ShapeDtypeStructs with metadata) of a model, without allocating.
    Build the model inside `ctor` with `rngs=abstract_rngs()` (fast under tracing)."""
    model = nnx.eval_shape(ctor)
    return nnx.split(model)


def materialize(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.Module:
    """Merge a filled state into a module; any variable still abstract is an error naming it."""
    for path, v in nnx.to_flat_state(state):
        if isinstance(v.get_value(), jax.ShapeDtypeStruct):
            raise CheckpointError(f"parameter {'.'.join(map(str, path))!r} was never loaded")
    return nnx.merge(graphdef, state)
