"""Key maps and loaders for the image encoder (`mg5jax.models.vision.VisionEncoder`), in two layouts.

Our parameter paths: `vit.*` (EVA ViT, with `vit.ln_vision`), `qformer.*` (with `qformer.query_tokens`),
`proj.*`. One table below lists every parameter with its LAVIS key and its transformers key.

LAVIS / MiniGPT-4: three torch pickles, each loaded strictly into its own part.
  eva_vit_g.pth, a flat state dict -> `vit.*` except `vit.ln_vision`.
      Ignored: `blocks.{i}.*` for i >= the kept depth (MiniGPT-4 keeps 39 of EVA-CLIP-g's 40 blocks).
  the BLIP-2 stage checkpoint, under `['model']` -> `vit.ln_vision` (`ln_vision.*`), `qformer.query_tokens`
      (`query_tokens`) and `qformer.*` (`Qformer.bert.*`).
      Ignored (the text path and other heads of BLIP-2, unused by the image path):
        `Qformer.cls.*` (MLM head), `Qformer.bert.embeddings.{word_embeddings,position_embeddings}.*`,
        `Qformer.bert.embeddings.position_ids`, the per-layer text FFN `Qformer.bert.encoder.layer.{i}.
        {intermediate,output}.*`, the stage-1 heads `vision_proj.*`, `text_proj.*`, `itm_head.*`, `temp`,
        and stage-2 language-model parts `t5_model.*`, `t5_proj.*`, `opt_model.*`, `opt_proj.*`.
      A `visual_encoder.*` key there is an error: the original would let it overwrite eva_vit_g.pth.
  the MiniGPT-4 checkpoint, under `['model']` -> `proj.*` (`llama_proj.{weight,bias}`); every other key is
      ignored (the original loads it with strict=False into the whole MiniGPT model).

transformers BLIP-2 directory (`Blip2Model`, `Blip2ForConditionalGeneration`, `Blip2ForImageTextRetrieval`):
  `vision_model.*` -> `vit.*` (`post_layernorm` is ln_vision), `query_tokens`, `qformer.*`,
  `language_projection.*` -> `proj.*` (or `llama_proj` from a MiniGPT-4 checkpoint instead).
  The fused `vision_model.encoder.layers.{i}.self_attn.qkv.bias` is read through `FusedQKVBiasView` as
  `...self_attn.q_bias` / `...self_attn.v_bias`.
  Ignored: `language_model.*`, the Q-Former text FFN `qformer.encoder.layer.{i}.{intermediate,output}.*`,
  the retrieval model's text `embeddings.*`, `vision_projection.*`, `text_projection.*`, `itm_head.*`,
  and `language_projection.*` when the projection comes from a MiniGPT-4 checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import jax
from flax import nnx

from mg5jax.convert import keymap as km
from mg5jax.convert.keymap import CONV, IDENTITY, LINEAR, SQUEEZE0, KeyMap, Rule, Transform
from mg5jax.convert.sources import CheckpointError, TensorSource, TorchSource, open_weights

Row = tuple[str, str, str, Transform]  # (our path, LAVIS key, transformers key, transform)


def _params(ours: str, lavis: str, hf: str, kind: str) -> list[Row]:
    """The weight and bias rows of one linear / conv / norm layer."""
    weight = {"linear": ("kernel", LINEAR), "conv": ("kernel", CONV), "norm": ("scale", IDENTITY)}[kind]
    return [(f"{ours}.{weight[0]}", f"{lavis}.weight", f"{hf}.weight", weight[1]),
            (f"{ours}.bias", f"{lavis}.bias", f"{hf}.bias", IDENTITY)]


# EvaViT paths | eva_vit_g.pth keys | Blip2VisionModel keys
VIT_ROWS: list[Row] = [
    *_params("patch_embed", "patch_embed.proj", "embeddings.patch_embedding", "conv"),
    ("cls_token", "cls_token", "embeddings.class_embedding", SQUEEZE0),
    ("pos_embed", "pos_embed", "embeddings.position_embedding", SQUEEZE0),
    *_params("blocks.{i}.norm1", "blocks.{i}.norm1", "encoder.layers.{i}.layer_norm1", "norm"),
    ("blocks.{i}.attn.qkv.kernel", "blocks.{i}.attn.qkv.weight", "encoder.layers.{i}.self_attn.qkv.weight", LINEAR),
    ("blocks.{i}.attn.q_bias", "blocks.{i}.attn.q_bias", "encoder.layers.{i}.self_attn.q_bias", IDENTITY),
    ("blocks.{i}.attn.v_bias", "blocks.{i}.attn.v_bias", "encoder.layers.{i}.self_attn.v_bias", IDENTITY),
    *_params("blocks.{i}.attn.proj", "blocks.{i}.attn.proj", "encoder.layers.{i}.self_attn.projection", "linear"),
    *_params("blocks.{i}.norm2", "blocks.{i}.norm2", "encoder.layers.{i}.layer_norm2", "norm"),
    *_params("blocks.{i}.fc1", "blocks.{i}.mlp.fc1", "encoder.layers.{i}.mlp.fc1", "linear"),
    *_params("blocks.{i}.fc2", "blocks.{i}.mlp.fc2", "encoder.layers.{i}.mlp.fc2", "linear"),
]
# EvaViT.ln_vision | BLIP-2 stage checkpoint key | Blip2VisionModel key
LN_VISION_ROWS: list[Row] = _params("ln_vision", "ln_vision", "post_layernorm", "norm")


def _qformer_rows() -> list[Row]:
    rows = _params("ln", "embeddings.LayerNorm", "layernorm", "norm")
    for ours, name in (("self_attn", "attention"), ("cross_attn", "crossattention")):
        layer = f"encoder.layer.{{i}}.{name}"
        for p in ("query", "key", "value"):
            rows += _params(f"layers.{{i}}.{ours}.{p}", f"{layer}.self.{p}", f"{layer}.attention.{p}", "linear")
        rows += _params(f"layers.{{i}}.{ours}.out", f"{layer}.output.dense", f"{layer}.output.dense", "linear")
        rows += _params(f"layers.{{i}}.{ours}.norm", f"{layer}.output.LayerNorm", f"{layer}.output.LayerNorm", "norm")
    for ours, name, kind in (("ffn_in", "intermediate_query.dense", "linear"),
                             ("ffn_out", "output_query.dense", "linear"),
                             ("ffn_norm", "output_query.LayerNorm", "norm")):
        rows += _params(f"layers.{{i}}.{ours}", f"encoder.layer.{{i}}.{name}", f"encoder.layer.{{i}}.{name}", kind)
    return rows


# QFormer paths | LAVIS keys under `Qformer.bert.` | Blip2QFormerModel keys (no query tokens)
QFORMER_ROWS: list[Row] = _qformer_rows()
# the learned queries: `query_tokens [1, Q, D]` at the top level in both layouts
QUERY_TOKENS_ROW: Row = ("query_tokens", "query_tokens", "query_tokens", SQUEEZE0)


def _rules(rows: list[Row], column: int, *, ours: str = "", theirs: str = "") -> list[Rule]:
    """Rules from one column of a table (1 = LAVIS, 2 = transformers), with path prefixes."""
    return [Rule(theirs + row[column], ours + row[0], row[3]) for row in rows]


# ---------------------------------------------------------------------------------------------- LAVIS

LAVIS_BLIP2_IGNORE = (
    r"^Qformer\.cls\.",
    r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.",
    r"^Qformer\.bert\.embeddings\.position_ids$",
    r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",
    r"^(vision_proj|text_proj|itm_head)\.",
    r"^temp$",
    r"^(t5_model|t5_proj|opt_model|opt_proj)\.",
)

LAVIS_BLIP2_KEYMAP = KeyMap(
    _rules(LN_VISION_ROWS, 1, ours="vit.")
    + _rules(QFORMER_ROWS, 1, ours="qformer.", theirs="Qformer.bert.")
    + _rules([QUERY_TOKENS_ROW], 1, ours="qformer."),
    ignore=LAVIS_BLIP2_IGNORE,
)

MINIGPT4_PROJ_KEYMAP = KeyMap(
    [Rule("llama_proj.weight", "proj.kernel", LINEAR), Rule("llama_proj.bias", "proj.bias")],
    ignore=[r"^(?!llama_proj\.)"],
)


def lavis_vit_keymap(depth: int) -> KeyMap:
    """eva_vit_g.pth -> `vit.*` (without ln_vision); blocks at index >= `depth` are ignored."""
    kept = "|".join(str(i) for i in range(depth))
    return KeyMap(_rules(VIT_ROWS, 1, ours="vit."), ignore=[rf"^blocks\.(?!(?:{kept})\.)\d+\."])


# --------------------------------------------------------------------------------------- transformers

# Blip2VisionModel -> EvaViT (read through FusedQKVBiasView)
HF_VIT_KEYMAP = KeyMap(_rules(VIT_ROWS + LN_VISION_ROWS, 2))
# Blip2QFormerModel -> QFormer, without `query_tokens` (a Blip2Model parameter)
HF_QFORMER_KEYMAP = KeyMap(_rules(QFORMER_ROWS, 2))

HF_BLIP2_IGNORE = (
    r"^language_model\.",
    r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.",
    r"^embeddings\.",
    r"^(vision_projection|text_projection|itm_head)\.",
)


def hf_blip2_keymap(with_projection: bool = True) -> KeyMap:
    """A transformers BLIP-2 model -> `VisionEncoder`; without the projection, `language_projection.*` is
    ignored (the projection then comes from a MiniGPT-4 checkpoint)."""
    rules = (_rules(VIT_ROWS + LN_VISION_ROWS, 2, ours="vit.", theirs="vision_model.")
             + _rules(QFORMER_ROWS, 2, ours="qformer.", theirs="qformer.")
             + _rules([QUERY_TOKENS_ROW], 2, ours="qformer."))
    if with_projection:
        rules += [Rule("language_projection.weight", "proj.kernel", LINEAR),
                  Rule("language_projection.bias", "proj.bias")]
        return KeyMap(rules, HF_BLIP2_IGNORE)
    return KeyMap(rules, HF_BLIP2_IGNORE + (r"^language_projection\.",))


class FusedQKVBiasView(TensorSource):
    """A source seen with transformers' fused EVA attention bias split back into LAVIS's parameters.

    transformers stores `...self_attn.qkv.bias = [q_bias; k_bias; v_bias]` (k_bias zero in converted
    checkpoints); this view shows `...self_attn.q_bias` and `...self_attn.v_bias` instead and drops the key
    third: one bias added to every key shifts all of a query's scores by the same amount, which softmax
    cancels, so it never changes the output.
    """

    FUSED = ".self_attn.qkv.bias"

    def __init__(self, source: TensorSource):
        self.source = source
        self._split: dict[str, tuple[str, int]] = {}
        for key in source:
            if key.endswith(self.FUSED):
                stem = key[: -len("qkv.bias")]
                self._split[stem + "q_bias"] = (key, 0)
                self._split[stem + "v_bias"] = (key, 2)
        self._keys = [k for k in source if not k.endswith(self.FUSED)] + list(self._split)

    def __getitem__(self, key: str):
        if key not in self._split:
            if key.endswith(self.FUSED):
                raise KeyError(key)
            return self.source[key]
        fused, third = self._split[key]
        tensor = self.source[fused]
        if tensor.ndim != 1 or tensor.shape[0] % 3:
            raise CheckpointError(f"key {fused!r} in {self.source.where(fused)}: expected a [3 * width] bias, "
                                  f"got shape {tuple(tensor.shape)}")
        width = tensor.shape[0] // 3
        return tensor[third * width:(third + 1) * width]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._split or (key in self.source and not str(key).endswith(self.FUSED))

    def where(self, key: str) -> str:
        return self.source.where(self._split[key][0] if key in self._split else key)

    @property
    def description(self) -> str:
        return self.source.description


# -------------------------------------------------------------------------------------------- loaders

Part = tuple[str, TensorSource, KeyMap, str]  # (regex over our paths, source, key map, what)


def load_parts(abstract: nnx.State, parts: list[Part], *, mesh: jax.sharding.Mesh | None = None) -> nnx.State:
    """Fill an abstract state from several sources, each owning the parameters whose path matches its
    regex; every parameter must belong to exactly one part. Each part is loaded strictly."""
    flat = [(".".join(map(str, path)), path, v) for path, v in nnx.to_flat_state(abstract)]
    owners = {name: [what for pattern, _, _, what in parts if re.match(pattern, name)] for name, _, _ in flat}
    for name, whats in owners.items():
        if len(whats) != 1:
            raise CheckpointError(f"parameter {name!r} belongs to {len(whats)} sources {whats}, expected one")
    loaded = []
    for pattern, source, keymap, what in parts:
        group = nnx.from_flat_state([(path, v) for name, path, v in flat if re.match(pattern, name)])
        loaded.extend(nnx.to_flat_state(km.load_params(group, source, keymap, mesh=mesh, what=what)))
    return nnx.from_flat_state(loaded)


def _minigpt4_source(path: str | os.PathLike) -> TorchSource:
    return TorchSource([path], subkey="model")


def minigpt4_proj_dim(path: str | os.PathLike) -> int:
    """Output width of `llama_proj` in a MiniGPT-4 checkpoint (4096 for the 7B model)."""
    source = _minigpt4_source(path)
    if "llama_proj.weight" not in source:
        raise CheckpointError(f"{path}: no key 'llama_proj.weight' under ['model']")
    return int(source["llama_proj.weight"].shape[0])


def load_lavis(abstract: nnx.State, vit_path: str | os.PathLike, qformer_path: str | os.PathLike,
               proj_path: str | os.PathLike, *, depth: int, mesh: jax.sharding.Mesh | None = None) -> nnx.State:
    """A `VisionEncoder` state from eva_vit_g.pth, the BLIP-2 stage checkpoint and the MiniGPT-4 checkpoint."""
    return load_parts(abstract, [
        (r"vit\.(?!ln_vision\.)", TorchSource([vit_path]), lavis_vit_keymap(depth), "EVA ViT"),
        (r"(vit\.ln_vision|qformer)\.", TorchSource([qformer_path], subkey="model"), LAVIS_BLIP2_KEYMAP,
         "BLIP-2 Q-Former"),
        (r"proj\.", _minigpt4_source(proj_path), MINIGPT4_PROJ_KEYMAP, "MiniGPT-4 llama_proj"),
    ], mesh=mesh)


def load_hf(abstract: nnx.State, blip2_dir: str | os.PathLike, *, proj_path: str | os.PathLike | None = None,
            mesh: jax.sharding.Mesh | None = None) -> nnx.State:
    """A `VisionEncoder` state from a transformers BLIP-2 directory (and a MiniGPT-4 `llama_proj`)."""
    source = FusedQKVBiasView(open_weights(blip2_dir))
    if proj_path is None:
        return load_parts(abstract, [(r"", source, hf_blip2_keymap(True), "BLIP-2")], mesh=mesh)
    return load_parts(abstract, [
        (r"(vit|qformer)\.", source, hf_blip2_keymap(False), "BLIP-2"),
        (r"proj\.", _minigpt4_source(proj_path), MINIGPT4_PROJ_KEYMAP, "MiniGPT-4 llama_proj"),
    ], mesh=mesh)
