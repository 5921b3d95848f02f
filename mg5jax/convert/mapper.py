"""Key map between the original MiniGPT-5 checkpoints and `VokenMapper` (REFERENCE §8.2).

The original stores the mapper at the top level of its Lightning state dict: `fc.{0,2}.*`,
`llm_to_t2i_mapping.{encoder,decoder}.…` (torch `nn.Transformer`, fused in_proj) and
`t2i_decoder_prompt` [1, 77, D]. Stage-2 checkpoints hold only `llm_to_t2i_mapping`
(`convert.minigpt5.stage_keymap` composes the maps of each stage's file).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from mg5jax.convert.keymap import LINEAR, SQUEEZE0, KeyMap, Rule, export_params


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


def mapper_keymap(theirs_prefix: str = "", ours_prefix: str = "") -> KeyMap:
    """The mapper's key map, with a prefix on the checkpoint keys and/or on our parameter paths."""
    return MAPPER_KEYMAP.prefixed(theirs=theirs_prefix, ours=ours_prefix)


def export_mapper_params(state: nnx.State) -> dict[str, np.ndarray]:
    """The original's state-dict entries of a `VokenMapper`'s state (fp32 as stored)."""
    return dict(export_params(state, MAPPER_KEYMAP))
