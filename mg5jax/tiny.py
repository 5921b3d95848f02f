"""Tiny hub-layout models and a synthetic dataset, built offline, for `make demo` and the tests.

Everything real-size is read from local directories by mg5jax's loaders; this module writes tiny
directories in exactly those layouts, so the whole system runs from scratch on a laptop CPU:

- data: VIST (`VIST/{split}_cleaned.json`, `{split}_image_mapping.json`, `{split}_images/*.png`) and
  CC3M (`CC3M/cc3m_{split}.tsv` + `{split}/*.png`) in the original formats (REFERENCE §6.3, §6.4). The
  images are coloured shapes on plain backgrounds and the captions say what is drawn; a story keeps its
  shape and background and steps its colour through a fixed cycle, so the next scene is predictable.
- llm: a LLaMA SentencePiece tokenizer trained on the demo's own prompt text ("▁###" one piece, as in
  LLaMA) and a random transformers `LlamaForCausalLM` (ENVIRONMENT §2a).
- sd: a random Stable-Diffusion-2.1-base-shaped diffusers pipeline in the hub layout (ENVIRONMENT §2b).
- blip2: a random transformers BLIP-2 (`vision_model`, `qformer`, `query_tokens`, `language_projection`
  to the LLM width; ENVIRONMENT §2c).

torch, transformers and diffusers are imported inside the builders only.

    python -m mg5jax.tiny --root outputs/demo
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import pathlib
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence

from PIL import Image, ImageDraw

from mg5jax.data import datasets
from mg5jax.data.tokenization import IMAGE_PLACEHOLDER, VOKEN_TOKENS, encode

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle")
# the story progression: each step paints the story's shape in the next colour of this cycle
COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40),
    "green": (40, 170, 60), "blue": (40, 90, 225), "purple": (150, 60, 200),
}  # fmt: skip
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}

MARKER = "tiny_build.json"  # written last in every built directory: the build's parameters


@dataclasses.dataclass(frozen=True)
class Scene:
    """One synthetic picture: a filled shape of one colour on a plain background."""

    shape: str
    color: str
    background: str
    center: tuple[float, float]  # in units of the image side
    size: float  # shape extent in units of the image side

    @property
    def caption(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape} on a {self.background} background ."

    def draw(self, image_size: int) -> Image.Image:
        """The scene as an RGB image `image_size` × `image_size`."""
        image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[self.background])
        cx, cy = (c * image_size for c in self.center)
        r = self.size * image_size / 2
        box = (cx - r, cy - r, cx + r, cy + r)
        pen = ImageDraw.Draw(image)
        fill = COLORS[self.color]
        if self.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif self.shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx + r, cy + r * math.sqrt(3) / 2 - r / 4),
                         (cx - r, cy + r * math.sqrt(3) / 2 - r / 4)], fill=fill)  # fmt: skip
        return image


def random_scene(rng: random.Random, *, shape: str | None = None, color: str | None = None,
                 background: str | None = None) -> Scene:
    """A scene with the given (or random) shape, colour and background, slightly jittered in place and size."""
    return Scene(
        shape=shape or rng.choice(SHAPES),
        color=color or rng.choice(list(COLORS)),
        background=background or rng.choice(list(BACKGROUNDS)),
        center=(0.5 + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.08, 0.08)),
        size=rng.uniform(0.45, 0.6),
    )


def _split_rng(kind: str, split: str, seed: int) -> random.Random:
    return random.Random(f"{kind}/{split}/{seed}")  # str seeds hash with sha512: stable across runs


def write_synthetic_vist(root: str | os.PathLike, *, num_stories: int = 24, steps: int = 5, image_size: int = 64,
                         seed: int = 0, split: str = "train") -> pathlib.Path:
    """Write `root/VIST/{split}_cleaned.json`, `{split}_image_mapping.json` and `{split}_images/*.png`.

    Story s keeps one shape and background; step k paints it in colour (start_s + k) of `COLORS`.
    Returns the `_cleaned.json` path (read it with `datasets.read_vist`).
    """
    if steps > len(COLORS):
        raise ValueError(f"write_synthetic_vist: steps={steps} exceeds the {len(COLORS)}-colour cycle")
    rng = _split_rng("vist", split, seed)
    vist = pathlib.Path(root) / "VIST"
    (vist / f"{split}_images").mkdir(parents=True, exist_ok=True)
    colors = list(COLORS)
    image_ids = rng.sample(range(10**8, 10**9), num_stories * steps)
    story_ids = rng.sample(range(10**4, 10**5), num_stories)
    stories, mapping = {}, {}
    for s in range(num_stories):
        shape, background, start = rng.choice(SHAPES), rng.choice(list(BACKGROUNDS)), rng.randrange(len(colors))
        story = []
        for k in range(steps):
            n = s * steps + k
            scene = random_scene(rng, shape=shape, color=colors[(start + k) % len(colors)], background=background)
            relative = f"{split}_images/{n:09d}.png"
            scene.draw(image_size).save(vist / relative)
            image_id = str(image_ids[n])
            mapping[image_id] = relative
            story.append({"caption": scene.caption, "image_id": image_id, "sequence_index": k})
        stories[str(story_ids[s])] = story
    cleaned = vist / f"{split}_cleaned.json"
    (vist / f"{split}_image_mapping.json").write_text(json.dumps(mapping, indent=4) + "\n")
    cleaned.write_text(json.dumps(stories, indent=4) + "\n")
    return cleaned


def write_synthetic_cc3m(root: str | os.PathLike, *, num_rows: int = 200, image_size: int = 64, seed: int = 0,
                         split: str = "train") -> pathlib.Path:
    """Write `root/CC3M/cc3m_{split}.tsv` (header `caption<TAB>image_path`) and `root/CC3M/{split}/*.png`.

    Returns the TSV path (read it with `datasets.read_cc3m`).
    """
    rng = _split_rng("cc3m", split, seed)
    cc3m = pathlib.Path(root) / "CC3M"
    (cc3m / split).mkdir(parents=True, exist_ok=True)
    rows = ["caption\timage_path"]
    for i in range(num_rows):
        scene = random_scene(rng)
        relative = f"{split}/{i:09d}.png"
        scene.draw(image_size).save(cc3m / relative)
        rows.append(f"{scene.caption}\t{relative}")
    tsv = cc3m / f"cc3m_{split}.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    return tsv


def demo_corpus(root: str | os.PathLike) -> list[str]:
    """Text for the demo tokenizer: every text chunk the LLM will see for the data under `root`.

    The samples of every `VIST/*_cleaned.json` and `CC3M/cc3m_*.tsv` (train mode, so all templates)
    plus every CC3M/MMDialog prompt, split at the vokens and `<ImageHere>` and stripped exactly as
    `MiniGPT5Tokenizer.encode` splits them, so frequent chunks such as "###" (after the vokens) train
    the pieces they will really be encoded with.
    """
    root = pathlib.Path(root)
    samples = []
    for path in sorted(root.glob("VIST/*_cleaned.json")):
        samples += datasets.read_vist(path, strict=True)[0]
    for path in sorted(root.glob("CC3M/cc3m_*.tsv")):
        samples += datasets.read_cc3m(path, strict=True)[0]
    if not samples:
        raise FileNotFoundError(f"{root}: no VIST/*_cleaned.json or CC3M/cc3m_*.tsv to build a corpus from")
    texts = [t for s in samples for t in (s.source, s.target)]
    texts += [f"{datasets.CC3M_SYSTEM_PROMPT}###Human: {p} ###Assistant:" for p in datasets.CC3M_GENERATION_PROMPTS]
    texts += [f"{datasets.MMDIALOG_SYSTEM_PROMPT} {' '.join(datasets.MMDIALOG_ROLE_MARKERS)}"]
    special = {t: 0 for t in (*VOKEN_TOKENS, IMAGE_PLACEHOLDER)}
    chunks: list[str] = []
    for text in texts:
        encode(lambda chunk: chunks.append(chunk) or [], text, special)  # collects the chunks only
    return chunks


def _train_sentencepiece(lines: Sequence[str], vocab_size: int) -> bytes:
    """A LLaMA-recipe SentencePiece BPE model (serialized) trained on `lines`."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def build_llm_dir(path: str | os.PathLike, corpus_lines: Sequence[str], *, hidden_size: int = 64, layers: int = 2,
                  heads: int = 4, kv_heads: int | None = None, intermediate: int = 128, vocab_size: int = 512,
                  seed: int = 0) -> pathlib.Path:
    """A tiny LLaMA directory: `tokenizer.model` (SentencePiece BPE trained on `corpus_lines`), the HF
    tokenizer files, and a random `LlamaForCausalLM` (vocab = the SentencePiece vocab, bos 1, eos 2,
    MHA unless `kv_heads` is given) as `config.json` + `model.safetensors`."""
    import sentencepiece as spm
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spm_model = _train_sentencepiece(corpus_lines, vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    if sp.encode("###", out_type=str) != ["▁###"]:
        raise RuntimeError(f"{path}: the tokenizer encodes '###' as {sp.encode('###', out_type=str)}, expected the "
                           "single piece '▁###' (LLaMA's); the corpus needs more target lines ending in ' ###'")
    (path / "tokenizer.model").write_bytes(spm_model)
    tokenizer = LlamaTokenizer.from_pretrained(str(path), add_bos_token=True, add_eos_token=False, legacy=False)
    tokenizer.save_pretrained(str(path))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=sp.get_piece_size(), hidden_size=hidden_size, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False)
    model.save_pretrained(str(path))
    return path


def _clip_byte_table() -> dict[int, str]:
    """OpenAI CLIP's byte -> printable character table (`bytes_to_unicode`), in its vocab order: the
    printable bytes as themselves (so "!" is id 0), then the others as chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _learn_clip_merges(words: Sequence[str], max_merges: int) -> list[tuple[str, str]]:
    """Greedy byte-level BPE over `words` with CLIP's "</w>" word ends (most frequent pair, ties by string)."""
    table = _clip_byte_table()
    counts: dict[tuple[str, ...], int] = {}
    for word in words:
        chars = [table[b] for b in word.encode()]
        key = (*chars[:-1], chars[-1] + "</w>")
        counts[key] = counts.get(key, 0) + 1
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: dict[tuple[str, str], int] = {}
        for seq, n in counts.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for seq, n in counts.items():
            out, i = [], 0
            while i < len(seq):
                if seq[i : i + 2] == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged[tuple(out)] = n
        counts = merged
    return merges


def _clip_vocabulary_words() -> list[str]:
    """Lower-case words the SD text side sees in the demo: scene captions and the prompt templates."""
    text = " ".join([*SHAPES, *COLORS, *BACKGROUNDS, "a an on background", datasets.VIST_SYSTEM_PROMPT,
                     *datasets.VIST_GEN_TEMPLATES, *datasets.CC3M_GENERATION_PROMPTS])  # fmt: skip
    return re.findall(r"[a-z]+", text.lower())


def write_clip_tokenizer(directory: str | os.PathLike, max_merges: int = 256) -> pathlib.Path:
    """A CLIP BPE tokenizer in the SD 2.1 hub layout (`vocab.json`, `merges.txt`, `special_tokens_map.json`,
    `tokenizer_config.json`): the 256 byte characters, the same with "</w>", merges learned on the demo's
    words, then `<|startoftext|>` and `<|endoftext|>`; pad "!" (id 0), max length 77, lower-case."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = list(_clip_byte_table().values())
    merges = _learn_clip_merges(_clip_vocabulary_words(), max_merges)
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges),
                  "<|startoftext|>", "<|endoftext|>"]:  # fmt: skip
        vocab.setdefault(token, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

    def special(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    bos, eos = special("<|startoftext|>"), special("<|endoftext|>")
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": "!", "unk_token": eos}, indent=2))
    added = {"__type": "AddedToken"}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": {**added, **bos}, "do_lower_case": True, "eos_token": {**added, **eos},
        "errors": "replace", "model_max_length": 77, "name_or_path": "stabilityai/stable-diffusion-2-1-base",
        "pad_token": "!", "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
        "unk_token": {**added, **eos}}, indent=2))  # fmt: skip
    return directory


# The SD 2.1-base scheduler config (ENVIRONMENT §3), stored as the hub repo stores it.
PNDM_SD21 = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "prediction_type": "epsilon", "trained_betas": None, "timestep_spacing": "leading",
}  # fmt: skip
CLIP_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
    "rescale_factor": 1 / 255, "size": {"shortest_edge": 224},
}  # fmt: skip


def build_sd_dir(path: str | os.PathLike, *, image_size: int = 64, cross_attention_dim: int = 32,
                 seed: int = 0) -> pathlib.Path:
    """A tiny random SD-2.1-base-shaped pipeline in the hub layout (unet/ vae/ text_encoder/ tokenizer/
    scheduler/ feature_extractor/ model_index.json).

    U-Net: 2 levels (CrossAttnDownBlock2D + DownBlock2D, channels 32/64, head counts 2/4, linear
    projections) on `image_size / 8` latents; VAE: 4 levels (factor 8, as SD), 4 latent channels;
    text encoder: 2-layer CLIP of width `cross_attention_dim` (the voken mapper's output width).
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if image_size % 16:
        raise ValueError(f"build_sd_dir: image_size={image_size} must be a multiple of 16 "
                         "(VAE factor 8, then 2 U-Net levels)")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = len(json.loads((write_clip_tokenizer(path / "tokenizer") / "vocab.json").read_text()))
    torch.manual_seed(seed)
    UNet2DConditionModel(
        sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=False,
        cross_attention_dim=cross_attention_dim, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
        freq_shift=0, act_fn="silu",
    ).save_pretrained(str(path / "unet"))  # fmt: skip
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        sample_size=image_size, scaling_factor=0.18215, force_upcast=True,
    ).save_pretrained(str(path / "vae"))  # fmt: skip
    CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
        layer_norm_eps=1e-5, projection_dim=cross_attention_dim,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # the legacy ids of the real SD 2.1 text_encoder config
    )).save_pretrained(str(path / "text_encoder"))  # fmt: skip
    version = {"_diffusers_version": diffusers.__version__}
    _write_json(path / "scheduler" / "scheduler_config.json", {"_class_name": "PNDMScheduler", **version, **PNDM_SD21})
    _write_json(path / "feature_extractor" / "preprocessor_config.json", CLIP_PREPROCESSOR)
    _write_json(path / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", **version,
        "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})  # fmt: skip
    return path


def _write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def build_blip2_dir(path: str | os.PathLike, *, llm_hidden_size: int, image_size: int = 32, patch_size: int = 8,
                    num_query_tokens: int = 4, seed: int = 0) -> pathlib.Path:
    """A tiny random transformers `Blip2ForConditionalGeneration` (ViT 2 blocks of width 32, Q-Former 2
    layers of width 32 with `num_query_tokens` queries, a 1-layer OPT of width `llm_hidden_size`, so
    `language_projection` maps to the LLM width) as `config.json` + `model.safetensors`.

    Matrices are drawn with variance 1/fan_in (the query tokens and the class/position tables with std
    0.5), so the frozen encoder's attention is far from uniform and its features tell the scenes apart.
    """
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                              OPTConfig)

    if image_size % patch_size:
        raise ValueError(f"build_blip2_dir: image_size={image_size} is not a multiple of patch_size={patch_size}")
    path = pathlib.Path(path)
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=image_size, patch_size=patch_size, hidden_act="gelu", layer_norm_eps=1e-6,
                               qkv_bias=True)  # fmt: skip
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 cross_attention_frequency=2, encoder_hidden_size=32, max_position_embeddings=64,
                                 vocab_size=100)  # fmt: skip
    text = OPTConfig(vocab_size=100, hidden_size=llm_hidden_size, word_embed_proj_dim=llm_hidden_size,
                     num_hidden_layers=1, ffn_dim=2 * llm_hidden_size, num_attention_heads=2,
                     max_position_embeddings=64)  # fmt: skip
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=num_query_tokens)  # fmt: skip
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    tables = ("query_tokens", "vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in tables:
                p.normal_(0.0, 0.5)
            elif p.ndim >= 2 and not name.startswith("language_model."):
                p.normal_(0.0, p[0].numel() ** -0.5)  # [out, in, ...]: variance 1 / fan_in
    model.save_pretrained(str(path))
    return path


# What `build_demo` builds (the demo config reads the model sizes back from the directories' configs).
BUILD_VERSION = 1  # bump when a builder's output changes, so existing demo directories are rebuilt
DEMO_IMAGE_SIZE = 64  # data images and SD output size (8×8 latents)
DEMO_VIST_STORIES = {"train": 24, "val": 4}  # 5 steps each: 13 train samples or 5 eval samples per story
DEMO_CC3M_ROWS = {"train": 200, "val": 20}
DEMO_LLM = dict(hidden_size=64, layers=2, heads=4, intermediate=128, vocab_size=512)
DEMO_BLIP2 = dict(image_size=32, patch_size=8, num_query_tokens=4)
DEMO_SD = dict(image_size=DEMO_IMAGE_SIZE, cross_attention_dim=32)


def _build_once(path: pathlib.Path, spec: dict, build: Callable[[pathlib.Path], object], force: bool) -> bool:
    """Build `path` unless it holds a marker with this `spec`; True when it was (re)built.

    The build goes to `<path>.partial` (removed first if an earlier build was interrupted); the marker is
    written last and the directory then renamed into place, so `path` is either complete or absent.
    A `path` without a marker was not built here and is never removed.
    """
    marker = path / MARKER
    if path.exists():
        if not marker.is_file():
            raise FileExistsError(f"{path} exists but has no {MARKER}, so mg5jax.tiny did not build it; "
                                  "remove it or choose another root")
        if not force and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
            log.info("%s: up to date (%s)", spec["part"], path)
            return False
        shutil.rmtree(path)
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    start = time.perf_counter()
    build(partial)
    _write_json(partial / MARKER, spec)
    partial.rename(path)
    log.info("%s: built in %.1f s (%s)", spec["part"], time.perf_counter() - start, path)
    return True


def _write_demo_data(root: pathlib.Path, seed: int) -> None:
    for split, n in DEMO_VIST_STORIES.items():
        write_synthetic_vist(root, num_stories=n, image_size=DEMO_IMAGE_SIZE, seed=seed, split=split)
    for split, n in DEMO_CC3M_ROWS.items():
        write_synthetic_cc3m(root, num_rows=n, image_size=DEMO_IMAGE_SIZE, seed=seed, split=split)


def build_demo(root: str | os.PathLike, *, seed: int = 0, force: bool = False) -> dict[str, pathlib.Path]:
    """Build the demo's data and weights under `root`; parts already complete are skipped.

    Layout: `root/data/{VIST,CC3M}` (train and val splits), `root/weights/llm` (tokenizer trained on
    `demo_corpus` of the data), `root/weights/sd`, `root/weights/blip2` (projection to the LLM width).
    Returns the directories (`data`, `vist`, `cc3m`, `llm`, `sd`, `blip2`) and the data files
    (`vist_train`, `vist_val`, `cc3m_train`, `cc3m_val`).
    """
    root = pathlib.Path(root)
    paths = {"data": root / "data", "llm": root / "weights" / "llm", "sd": root / "weights" / "sd",
             "blip2": root / "weights" / "blip2"}  # fmt: skip
    (root / "weights").mkdir(parents=True, exist_ok=True)
    base = {"version": BUILD_VERSION, "seed": seed}
    _build_once(paths["data"], {"part": "data", **base, "image_size": DEMO_IMAGE_SIZE, "vist": DEMO_VIST_STORIES,
                                "cc3m": DEMO_CC3M_ROWS}, lambda p: _write_demo_data(p, seed), force)  # fmt: skip
    corpus = demo_corpus(paths["data"])
    corpus_hash = hashlib.sha256("\n".join(corpus).encode()).hexdigest()
    _build_once(paths["llm"], {"part": "llm", **base, **DEMO_LLM, "corpus_sha256": corpus_hash},
                lambda p: build_llm_dir(p, corpus, seed=seed, **DEMO_LLM), force)
    _build_once(paths["sd"], {"part": "sd", **base, **DEMO_SD}, lambda p: build_sd_dir(p, seed=seed, **DEMO_SD), force)
    hidden = DEMO_LLM["hidden_size"]
    _build_once(paths["blip2"], {"part": "blip2", **base, **DEMO_BLIP2, "llm_hidden_size": hidden},
                lambda p: build_blip2_dir(p, llm_hidden_size=hidden, seed=seed, **DEMO_BLIP2), force)
    data = paths["data"]
    paths.update(vist=data / "VIST", cc3m=data / "CC3M",
                 vist_train=data / "VIST" / "train_cleaned.json", vist_val=data / "VIST" / "val_cleaned.json",
                 cc3m_train=data / "CC3M" / "cc3m_train.tsv", cc3m_val=data / "CC3M" / "cc3m_val.tsv")  # fmt: skip
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny demo data and weights (offline).")
    parser.add_argument("--root", default="outputs/demo", help="directory to build into (default: outputs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the random weights")
    parser.add_argument("--force", action="store_true", help="rebuild every part, even when up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, path in build_demo(args.root, seed=args.seed, force=args.force).items():
        print(f"{name:>10}: {path}")


if __name__ == "__main__":
    main()
