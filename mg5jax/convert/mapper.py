"""Key map between the original MiniGPT-5 checkpoints and `VokenMapper` (REFERENCE §8.2).

The original stores the mapper at the top level of its Lightning state dict: `fc.{0,2}.*`,
`llm_to_t2i_mapping.{encoder,decoder}.…` (torch `nn.Transformer`, fused in_proj) and
`t2i_decoder_prompt` [1, 77, D]. Stage-2 checkpoints hold only `llm_to_t2i_mapping`, so loading
works per *part*: the parts named `required` must be complete in the file, any other part is
loaded when the file has it, and other keys (the LLM's) are left for their own loaders.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from mg5jax.convert.keymap import LINEAR, SQUEEZE0, KeyMap, Rule, export_params, load_params
from mg5jax.convert.sources import CheckpointError, TensorSource

log = logging.getLogger(__name__)


def _attention_rules(theirs: str, ours: str) -> list[Rule]:
    qkv = tuple(f"{ours}.{p}_proj" for p in "qkv")
    return [
        Rule(f"{theirs}.in_proj_weight", tuple(f"{p}.kernel" for p in qkv), LINEAR),
        Rule(f"{theirs}.in_proj_bias", tuple(f"{p}.bias" for p in qkv)),
        Rule(f"{theirs}.out_proj.weight", f"{ours}.out_proj.kernel", LINEAR),
        Rule(f"{theirs}.out_proj.bias", f"{ours}.out_proj.bias"),
    ]


def _linear_rules(theirs: str, ours: str) -> list[Rule]:
    return [Rule(f"{theirs}.weight", f"{ours}.kernel", LINEAR), Rule(f"{theirs}.bias", f"{ours}.bias")]


def _norm_rules(theirs: str, ours: str) -> list[Rule]:
    return [Rule(f"{theirs}.weight", f"{ours}.scale"), Rule(f"{theirs}.bias", f"{ours}.bias")]


def _build_keymap() -> KeyMap:
    rules = _linear_rules("fc.0", "fc_in") + _linear_rules("fc.2", "fc_out")
    rules.append(Rule("t2i_decoder_prompt", "decoder_queries", SQUEEZE0))
    enc, dec = "llm_to_t2i_mapping.encoder", "llm_to_t2i_mapping.decoder"
    rules += _attention_rules(f"{enc}.layers.{{i}}.self_attn", "encoder.layers.{i}.self_attn")
    rules += _attention_rules(f"{dec}.layers.{{i}}.self_attn", "decoder.layers.{i}.self_attn")
    rules += _attention_rules(f"{dec}.layers.{{i}}.multihead_attn", "decoder.layers.{i}.cross_attn")
    for theirs, ours, norms in ((enc, "encoder", (1, 2)), (dec, "decoder", (1, 2, 3))):
        for n in ("linear1", "linear2"):
            rules += _linear_rules(f"{theirs}.layers.{{i}}.{n}", f"{ours}.layers.{{i}}.{n}")
        for n in norms:
            rules += _norm_rules(f"{theirs}.layers.{{i}}.norm{n}", f"{ours}.layers.{{i}}.norm{n}")
        rules += _norm_rules(f"{theirs}.norm", f"{ours}.norm")
    return KeyMap(rules)


MAPPER_KEYMAP = _build_keymap()

# part -> (our top-level attribute names, the original's top-level key names)
PARTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fc": (("fc_in", "fc_out"), ("fc",)),
    "transformer": (("encoder", "decoder"), ("llm_to_t2i_mapping",)),
    "queries": (("decoder_queries",), ("t2i_decoder_prompt",)),
}
STAGE1_PARTS = ("fc", "transformer", "queries")  # a stage-1 checkpoint holds all of the mapper
STAGE2_PARTS = ("transformer",)  # a stage-2 checkpoint holds only llm_to_t2i_mapping


def mapper_keymap(theirs_prefix: str = "", ours_prefix: str = "") -> KeyMap:
    """The mapper's key map, with a prefix on the checkpoint keys and/or on our parameter paths."""
    return MAPPER_KEYMAP.prefixed(theirs=theirs_prefix, ours=ours_prefix)


def _in_namespace(name: str, prefix: str, names: Iterable[str]) -> bool:
    return any(name == prefix + n or name.startswith(prefix + n + ".") for n in names)


def _check_parts(parts: Sequence[str], what: str) -> None:
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"{what}: unknown mapper part {unknown[0]!r}; parts are {sorted(PARTS)}")


def _part_state(state: nnx.State, part: str, ours_prefix: str) -> nnx.State:
    ours = PARTS[part][0]
    return nnx.from_flat_state(
        [(p, v) for p, v in nnx.to_flat_state(state) if _in_namespace(".".join(map(str, p)), ours_prefix, ours)])


class _KeySubset(TensorSource):
    """A view of `source` restricted to some of its keys (errors still name the original file)."""

    def __init__(self, source: TensorSource, keys: Sequence[str]):
        self._source = source
        self._keys = list(keys)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        return self._source[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def where(self, key: str) -> str:
        return self._source.where(key)

    @property
    def description(self) -> str:
        return self._source.description


def load_mapper_params(
    state: nnx.State,
    source: TensorSource,
    *,
    required: Sequence[str] = STAGE1_PARTS,
    theirs_prefix: str = "",
    ours_prefix: str = "",
    mesh: jax.sharding.Mesh | None = None,
) -> nnx.State:
    """Load the mapper parts found in `source` into `state` (abstract or concrete); return the new state.

    Every part in `required` must be complete in `source` (else a `CheckpointError` names the first
    missing key and the file); parts not required are loaded only when the file has them, and keep
    their values in `state` otherwise (an abstract one stays abstract: `materialize` then names it).
    A key inside a part's namespace that no rule consumes (e.g. a layer the config lacks) is an
    error; keys outside the mapper's namespaces (the LLM's) are ignored.
    """
    _check_parts(required, "load_mapper_params(required=...)")
    keymap = mapper_keymap(theirs_prefix, ours_prefix)
    loaded: dict[tuple, nnx.Variable] = {}
    for part, (_, theirs) in PARTS.items():
        keys = [k for k in source if _in_namespace(k, theirs_prefix, theirs)]
        if not keys and part not in required:
            continue
        sub = _part_state(state, part, ours_prefix)
        if not nnx.to_flat_state(sub):
            raise CheckpointError(f"mapper part {part!r}: the model has no parameters under {ours_prefix!r}")
        what = f"mapper part {part!r}" + (" (required)" if part in required else "")
        part_state = load_params(sub, _KeySubset(source, keys), keymap, mesh=mesh, what=what)
        loaded.update(nnx.to_flat_state(part_state))
        log.info("mapper: loaded part %r (%d tensors) from %s", part, len(keys), source.description)
    return nnx.from_flat_state([(p, loaded.get(p, v)) for p, v in nnx.to_flat_state(state)])


def export_mapper_params(
    state: nnx.State,
    parts: Sequence[str] = STAGE1_PARTS,
    *,
    theirs_prefix: str = "",
    ours_prefix: str = "",
) -> dict[str, np.ndarray]:
    """The original's state-dict entries for `parts` of the mapper in `state` (fp32 as stored)."""
    _check_parts(parts, "export_mapper_params(parts=...)")
    keymap = mapper_keymap(theirs_prefix, ours_prefix)
    out: dict[str, np.ndarray] = {}
    for part in parts:
        out.update(export_params(_part_state(state, part, ours_prefix), keymap))
    return out
