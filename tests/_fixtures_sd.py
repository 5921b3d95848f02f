"""Tiny Stable-Diffusion-2.1-base-shaped reference models (random torch weights, built offline).

`tiny_sd_dir` is a whole `StableDiffusionPipeline` saved in the hub layout of
"stabilityai/stable-diffusion-2-1-base" (unet/, vae/, text_encoder/, tokenizer/ as vocab.json +
merges.txt, scheduler/ PNDM, feature_extractor/, model_index.json). Every part reloads with
diffusers/transformers `from_pretrained(dir, subfolder=...)`. Norm scales and biases are perturbed
away from torch's 1/0 defaults so parity tests can fail.

`tiny_sd1_unet_dir` is an SD-1.x-shaped U-Net (conv 1x1 projections, an int head count, three
levels) saved as a diffusers `unet/` directory.
"""

from __future__ import annotations

import collections
import json
import pathlib
import re

import pytest

# SD 2.1-base layout at toy sizes: 4 levels (latent /8), head counts per level, linear projections,
# cross_attention_dim (the text width) unlike every block width.
TINY_SD2_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 96, 128, 128),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=[2, 4, 4, 4], use_linear_projection=True, upcast_attention=False, cross_attention_dim=32,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)  # fmt: skip

# SD 1.x layout at toy sizes: conv 1x1 projections, one int head count, two resnets per level,
# other timestep-embedding conventions, a two-layer transformer in the mid block.
TINY_SD1_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2, use_linear_projection=False, upcast_attention=True, cross_attention_dim=24,
    transformer_layers_per_block=[1, 1, 2], norm_num_groups=32, norm_eps=1e-6, flip_sin_to_cos=False,
    freq_shift=1, act_fn="silu",
)  # fmt: skip

TINY_SD2_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=64, scaling_factor=0.18215, force_upcast=True,
)  # fmt: skip

TINY_SD2_TEXT = dict(
    vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,  # the legacy ids of the real SD 2.1 text_encoder config
)  # fmt: skip

PNDM_SD2 = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, skip_prk_steps=True,
    steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading",
)  # fmt: skip

_CAPTIONS = """a photo of a cat sitting on a wooden table next to a window
my sister arrived early to help me with the family barbecue in the garden
every one else arrived soon after and dad manned the grill all afternoon
there was so much food and it was all delicious we ended the day with fireworks
burning candle on the background of the aquarium with small colorful fish
a shot of the full christmas tree decorated with lights and golden ornaments
the city skyline at night with tall buildings reflected in the quiet river
two dogs running across a green field chasing a bright red ball
an old man reading a newspaper on a bench in the park during autumn
children playing football on the beach while the sun is setting slowly
a bowl of fresh fruit with apples oranges bananas and purple grapes
mountains covered with snow under a clear blue sky in the morning
a woman riding a bicycle along a narrow street lined with flowers
the kitchen smelled of bread baking in the oven while we waited
people walking through a crowded market buying vegetables and spices
a small boat floating on the lake surrounded by tall pine trees
illustration of a robot painting a portrait of a smiling astronaut
students listening to their teacher explaining mathematics on the board
a yellow taxi waiting at the traffic light in heavy rain
birthday cake with candles and chocolate frosting on a white plate
friends laughing together around a campfire under thousands of stars
a black and white photograph of a vintage car parked outside a cinema
the museum displayed ancient pottery jewelry and bronze statues
a giraffe eating leaves from the top of an acacia tree in the savanna
fishermen pulling their nets onto the shore early in the morning"""

_N_MERGES = 486  # 256 bytes + 256 bytes</w> + 486 merges + 2 specials = 1000, bos 998, eos 999


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's byte -> printable unicode character table (the byte-level alphabet, in vocab order)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Greedy byte-level BPE with CLIP's `</w>` word ends (most frequent pair, ties by string order)."""
    table = bytes_to_unicode()
    words = collections.Counter(re.findall(r"[a-z]+", text.lower()))
    seqs = {}
    for w in words:
        chars = [table[b] for b in w.encode()]
        seqs[w] = chars[:-1] + [chars[-1] + "</w>"]
    merges = []
    while len(merges) < n_merges:
        pairs = collections.Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += words[w]
        if not pairs:
            raise RuntimeError(f"tiny CLIP corpus only yields {len(merges)} merges, need {n_merges}")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_clip_tokenizer(directory: pathlib.Path) -> pathlib.Path:
    """A CLIP BPE tokenizer (vocab 1000) in the SD 2.1 hub layout: vocab.json, merges.txt,
    special_tokens_map.json, tokenizer_config.json (pad "!" = id 0, max length 77)."""
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    text = (_CAPTIONS + "\n") * 3 + " ".join(sorted(set(_CAPTIONS.split()))[::-1])
    merges = _learn_merges(text, _N_MERGES)
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    if len(vocab) != 1000:
        raise RuntimeError(f"tiny CLIP vocab has {len(vocab)} entries, expected 1000 (duplicate merges)")
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    bos, eos = _special("<|startoftext|>"), _special("<|endoftext|>")
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": "!", "unk_token": eos}, indent=2))
    added = lambda d: {"__type": "AddedToken", **d}  # noqa: E731
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": added(bos), "do_lower_case": True, "eos_token": added(eos),
        "errors": "replace", "model_max_length": 77, "name_or_path": "stabilityai/stable-diffusion-2-1-base",
        "pad_token": "!", "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
        "unk_token": added(eos)}, indent=2))  # fmt: skip
    return directory


def perturb_norms(module, seed: int, scale: float = 0.2):
    """Move every GroupNorm/LayerNorm weight off 1 and bias off 0 (random, reproducible)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.add_(scale * torch.randn(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.add_(scale * torch.randn(m.bias.shape, generator=g))
    return module


def build_tiny_unet(config: dict, seed: int):
    """A diffusers UNet2DConditionModel with random weights and perturbed norms (eval mode, fp32)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return perturb_norms(UNet2DConditionModel(**config), seed).eval()


def build_tiny_vae(config: dict, seed: int):
    """A diffusers AutoencoderKL with random weights and perturbed norms (eval mode, fp32)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return perturb_norms(AutoencoderKL(**config), seed).eval()


def build_tiny_sd_pipeline(directory: pathlib.Path) -> pathlib.Path:
    """Save a tiny SD-2.1-base-shaped StableDiffusionPipeline to `directory` in hub layout."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = write_clip_tokenizer(directory / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(2)
    text_encoder = perturb_norms(CLIPTextModel(CLIPTextConfig(**TINY_SD2_TEXT)), 2).eval()
    pipe = StableDiffusionPipeline(
        vae=build_tiny_vae(TINY_SD2_VAE, 1), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=build_tiny_unet(TINY_SD2_UNET, 0), scheduler=PNDMScheduler(**PNDM_SD2), safety_checker=None,
        feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}),
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(directory), safe_serialization=True)
    # mirror the hub repo: tokenizer as vocab.json + merges.txt, CLIPImageProcessor, no image_encoder,
    # the scheduler's stray keys
    tok_out = directory / "tokenizer"
    for f in tok_out.iterdir():
        f.unlink()
    for f in tok_dir.iterdir():
        f.rename(tok_out / f.name)
    tok_dir.rmdir()
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index.pop("image_encoder", None)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    sched_path = directory / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_path.read_text())
    sched.update(clip_sample=False, trained_betas=None)  # stored in the real config, unused by PNDM
    sched_path.write_text(json.dumps(sched, indent=2, sort_keys=True))
    return directory


def build_tiny_sd1_unet_dir(directory: pathlib.Path) -> pathlib.Path:
    """Save the SD-1.x-shaped tiny U-Net as a diffusers `unet/`-style directory."""
    build_tiny_unet(TINY_SD1_UNET, 3).save_pretrained(str(directory), safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A whole tiny SD-2.1-base-shaped pipeline directory (hub layout); see the module docstring."""
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd21"))


@pytest.fixture(scope="session")
def tiny_sd1_unet_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny SD-1.x-shaped diffusers U-Net directory (config.json + diffusion_pytorch_model.safetensors)."""
    return build_tiny_sd1_unet_dir(tmp_path_factory.mktemp("tiny_sd1_unet"))
