"""`mg5jax.tiny` builds a complete demo tree offline that every loader of the project (and the
transformers / diffusers references) reads, with data in the original VIST / CC3M formats."""

import json
import pathlib
import random
import shutil
import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mg5jax import tiny
from mg5jax.data.datasets import read_cc3m, read_vist
from mg5jax.data.tokenization import ALL_VOKENS_STR, MiniGPT5Tokenizer

pytestmark = pytest.mark.xdist_group("tiny")

VIST_STEPS = 5


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, pathlib.Path]:
    start = time.perf_counter()
    paths = tiny.build_demo(tmp_path_factory.mktemp("demo"))
    print(f"build_demo: {time.perf_counter() - start:.1f} s")
    return paths


def _mtimes(root: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_scene_image_shows_its_caption():
    scene = tiny.Scene("square", "orange", "black", center=(0.5, 0.5), size=0.5)
    pixels = np.asarray(scene.draw(64))
    assert scene.caption == "an orange square on a black background ."
    assert tuple(pixels[32, 32]) == tiny.COLORS["orange"]
    assert tuple(pixels[2, 2]) == tiny.BACKGROUNDS["black"]
    circle = np.asarray(tiny.Scene("circle", "red", "white", center=(0.5, 0.5), size=0.5).draw(64))
    assert tuple(circle[17, 17]) == tiny.BACKGROUNDS["white"]  # the square's corner is outside the circle


def test_vist_is_in_the_original_format_and_progresses(demo):
    stories = json.loads(demo["vist_train"].read_text())
    mapping = json.loads((demo["vist"] / "train_image_mapping.json").read_text())
    assert len(stories) == tiny.DEMO_VIST_STORIES["train"]
    colors = list(tiny.COLORS)
    for steps in stories.values():
        assert [s["sequence_index"] for s in steps] == list(range(VIST_STEPS))
        assert all(isinstance(s["image_id"], str) and set(s) == {"caption", "image_id", "sequence_index"}
                   for s in steps)  # fmt: skip
        words = [s["caption"].split() for s in steps]  # [article, colour, shape, "on", "a", background, ...]
        assert len({(w[2], w[5]) for w in words}) == 1  # one shape and background per story
        first = colors.index(words[0][1])
        assert [w[1] for w in words] == [colors[(first + k) % len(colors)] for k in range(VIST_STEPS)]
        for s in steps:
            assert mapping[s["image_id"]].startswith("train_images/")
            assert (demo["vist"] / mapping[s["image_id"]]).is_file()
    samples, report = read_vist(demo["vist_train"], strict=True)
    assert report.samples == len(samples) == 13 * tiny.DEMO_VIST_STORIES["train"]  # REFERENCE §6.4
    samples, _ = read_vist(demo["vist_val"], test=True, strict=True)
    assert len(samples) == VIST_STEPS * tiny.DEMO_VIST_STORIES["val"]


def test_cc3m_is_in_the_original_format(demo):
    lines = demo["cc3m_train"].read_text().splitlines()
    assert lines[0] == "caption\timage_path"
    assert lines[1].split("\t")[1] == "train/000000000.png"
    samples, _ = read_cc3m(demo["cc3m_train"], strict=True)
    rows = tiny.DEMO_CC3M_ROWS["train"]
    assert len(samples) == rows + len(range(0, rows, 100))  # one instruction sample per 100 rows
    assert len(read_cc3m(demo["cc3m_val"], test=True, strict=True)[0]) == tiny.DEMO_CC3M_ROWS["val"]
    first = samples[0]
    assert (first.source, first.caption) == (lines[1].split("\t")[0][:-2], lines[1].split("\t")[0][:-2])


def test_llm_dir_loads_everywhere(demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mg5jax.models.llama import LlamaForCausalLM

    tok = MiniGPT5Tokenizer.from_pretrained(demo["llm"])
    sharp = tok.sp_model.piece_to_id("▁###")
    assert tok.sp_model.id_to_piece(sharp) == "▁###"
    assert tok.encode("###") == [sharp]
    assert tok.encode(ALL_VOKENS_STR + " ###") == [*tok.ids.voken_ids, sharp]
    assert (tok.ids.bos_id, tok.ids.eos_id) == (1, 2)
    text = "a red circle on a white background ."
    hf = AutoTokenizer.from_pretrained(str(demo["llm"]))
    ids = hf(text).input_ids
    assert ids == [1, *tok.sp_model.encode(text)]
    torch_model = AutoModelForCausalLM.from_pretrained(str(demo["llm"])).eval()
    assert torch_model.config.vocab_size == tok.sp_model.get_piece_size() == tok.ids.voken_ids[0]
    model = LlamaForCausalLM.from_pretrained(demo["llm"], param_dtype=jnp.float32)
    with torch.no_grad():
        expected = torch_model(torch.tensor([ids])).logits.numpy()
    got = np.asarray(model(jnp.asarray([ids])).logits)
    err = np.abs(got - expected).max()
    print(f"llama logits max-abs error {err:.2e}")
    assert err <= 1e-4


def test_sd_dir_runs_in_diffusers_and_loads_in_mg5jax(demo):
    from diffusers import StableDiffusionPipeline

    from mg5jax.diffusion import StableDiffusionPipeline as OurPipeline
    from mg5jax.models.clip_text import CLIPTextConfig
    from mg5jax.models.unet import UNetConfig
    from mg5jax.models.vae import VAEConfig

    sd = demo["sd"]
    assert json.loads((sd / "model_index.json").read_text())["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert sorted(p.name for p in (sd / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]  # fmt: skip
    pipe = StableDiffusionPipeline.from_pretrained(str(sd), local_files_only=True)
    assert pipe.tokenizer.convert_tokens_to_ids("!") == pipe.tokenizer.pad_token_id == 0
    assert pipe.tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
    assert pipe.vae_scale_factor == 8
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 32
    images = pipe(prompt="a red circle on a white background .", num_inference_steps=2, height=64, width=64,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    unet = UNetConfig.from_json(sd / "unet" / "config.json")
    assert unet.block_out_channels == (32, 64) and unet.num_attention_heads == (2, 4)
    assert VAEConfig.from_json(sd / "vae" / "config.json").downsample_factor == 8
    assert CLIPTextConfig.from_json(sd / "text_encoder" / "config.json").hidden_size == 32

    ours = OurPipeline.from_pretrained(sd)  # the same weights: text features and one U-Net prediction agree
    prompt = "a red circle on a white background ."
    features = np.asarray(ours.encode_prompt([prompt]))
    with torch.no_grad():
        expected = pipe.encode_prompt(prompt, "cpu", 1, False)[0].numpy()
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        eps = pipe.unet(latents, 500, encoder_hidden_states=torch.from_numpy(features.copy())).sample.numpy()
    assert np.abs(features - expected).max() <= 1e-4
    got = np.asarray(ours.unet(jnp.asarray(latents.numpy()), jnp.asarray([500]), jnp.asarray(features)))
    assert np.abs(got - eps).max() <= 1e-4 and np.abs(eps).mean() > 0.1


def test_blip2_dir_projects_to_the_llm_width(demo):
    from transformers import Blip2ForConditionalGeneration

    from mg5jax.models.vision import VisionEncoder

    encoder = VisionEncoder.from_pretrained(demo["blip2"], dtype=jnp.float32, param_dtype=jnp.float32)
    llm_width = json.loads((demo["llm"] / "config.json").read_text())["hidden_size"]
    assert encoder.config.proj_dim == llm_width
    assert encoder.config.qformer.num_query_tokens == tiny.DEMO_BLIP2["num_query_tokens"]
    size = encoder.config.vision.image_size
    pixels = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    torch_model = Blip2ForConditionalGeneration.from_pretrained(str(demo["blip2"])).eval()
    with torch.no_grad():
        image = torch_model.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        queries = torch_model.query_tokens.expand(2, -1, -1)
        q = torch_model.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        expected = torch_model.language_projection(q).numpy()
    got = np.asarray(encoder(jnp.asarray(pixels)))
    err = np.abs(got - expected).max()
    print(f"BLIP-2 image embeddings max-abs error {err:.2e}")
    assert got.shape == (2, tiny.DEMO_BLIP2["num_query_tokens"], llm_width) and err <= 1e-4
    assert np.abs(got[0] - got[1]).mean() > 0.1 * np.abs(got).mean()  # different images, different features


def test_corpus_chunks_are_what_the_tokenizer_encodes(demo):
    corpus = tiny.demo_corpus(demo["data"])
    assert "###" in corpus  # the target's end after the vokens, stripped
    assert not any("[IMG" in line or "<ImageHere>" in line for line in corpus)


def test_second_build_is_a_no_op_and_interrupted_parts_are_redone(demo):
    root = demo["data"].parent
    before = _mtimes(root)
    start = time.perf_counter()
    assert tiny.build_demo(root) == demo
    print(f"build_demo (up to date): {time.perf_counter() - start:.2f} s")
    assert _mtimes(root) == before

    blip2 = demo["blip2"]
    shutil.rmtree(blip2)  # as if the build was killed before the rename
    (blip2.parent / "blip2.partial").mkdir()
    (blip2.parent / "blip2.partial" / "half_written.safetensors").write_bytes(b"")
    tiny.build_demo(root)
    assert not (blip2.parent / "blip2.partial").exists()
    assert sorted(p.name for p in blip2.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", tiny.MARKER]  # fmt: skip
    after = _mtimes(root)
    assert {k: v for k, v in after.items() if "blip2" not in k} == {k: v for k, v in before.items() if "blip2" not in k}

    (blip2 / tiny.MARKER).unlink()  # a directory mg5jax.tiny did not build is never removed
    with pytest.raises(FileExistsError, match="tiny_build.json"):
        tiny.build_demo(root)
    assert (blip2 / "model.safetensors").is_file()
    shutil.rmtree(blip2)
    tiny.build_demo(root)


def test_random_scenes_cover_every_attribute():
    rng = random.Random(0)
    scenes = [tiny.random_scene(rng) for _ in range(200)]
    assert {s.shape for s in scenes} == set(tiny.SHAPES)
    assert {s.color for s in scenes} == set(tiny.COLORS)
    assert {s.background for s in scenes} == set(tiny.BACKGROUNDS)
