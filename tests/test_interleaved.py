"""Interleaved generation: several voken groups per response in a batch, batch-independence, the
inference voken window equal to the teacher-forced training window, and the HTML report."""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fixtures_sd import tiny_sd_dir  # noqa: F401  (session fixture)
from fixtures_tokenizer import tiny_tokenizer_dir  # noqa: F401  (session fixture)
from flax import nnx

from mg5jax.data.tokenization import IGNORE_INDEX, MiniGPT5Tokenizer
from mg5jax.diffusion import schedulers
from mg5jax.generation.decode import ForcedInsertion, generate
from mg5jax.generation.interleaved import GenerationSettings, InterleavedGenerator, Prompt, image_seed
from mg5jax.generation.report import ReportWriter, write_outputs
from mg5jax.generation.sampling import SamplingConfig
from mg5jax.models.llama import LlamaConfig, LlamaForCausalLM, prepare_for_decoding
from mg5jax.models.mapper import MapperConfig, VokenMapper
from mg5jax.models.minigpt5 import MiniGPT5, MiniGPT5Config
from mg5jax.models.unet import UNet2DConditionModel
from mg5jax.models.vae import AutoencoderKL

REPO = pathlib.Path(__file__).resolve().parents[1]
D = 512
PROMPTS = ["###Human: tell me a story ###Assistant:", "###Human: the sister arrived ###Assistant:",
           "###Human: fireworks at night and food on the grill ###Assistant:"]


def bigram_llm(tokenizer: MiniGPT5Tokenizer, transitions: dict[int, dict[int, float]]) -> LlamaForCausalLM:
    """A LLaMA whose layers add nothing, so the next-token distribution depends on the last token only:
    one-hot embeddings, lm_head = log-probabilities (0 = allowed, -30 elsewhere)."""
    v = tokenizer.ids.vocab_size
    cfg = LlamaConfig(vocab_size=v, hidden_size=D, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, tie_word_embeddings=False)
    llm = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    layer = llm.model.layers[0]
    layer.self_attn.o_proj.kernel.set_value(jnp.zeros_like(layer.self_attn.o_proj.kernel[...]))
    layer.mlp.down_proj.kernel.set_value(jnp.zeros_like(layer.mlp.down_proj.kernel[...]))
    llm.model.embed_tokens.embedding.set_value(jnp.eye(v, D))
    table = np.full((D, v), -30.0, np.float32)
    for src, nexts in transitions.items():
        table[src] = -30.0
        for dst, logit in nexts.items():
            table[src, dst] = logit
    llm.lm_head.kernel.set_value(jnp.asarray(table / np.sqrt(D)))
    return llm


@pytest.fixture(scope="module")
def parts(tiny_sd_dir, tiny_tokenizer_dir):  # noqa: F811
    tokenizer = MiniGPT5Tokenizer.from_pretrained(tiny_tokenizer_dir)
    schedule_cfg = json.loads((tiny_sd_dir / "scheduler" / "scheduler_config.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet", param_dtype=jnp.float32)
    vae = AutoencoderKL.from_pretrained(tiny_sd_dir / "vae", param_dtype=jnp.float32)
    mapper = VokenMapper(MapperConfig(llm_dim=D, hidden=32, num_queries=77, enc_layers=1, dec_layers=1, heads=4,
                                      ff=64), rngs=nnx.Rngs(1))
    return tokenizer, schedule_cfg, unet, vae, mapper


def make_model(parts, llm) -> MiniGPT5:
    tokenizer, schedule_cfg, unet, vae, mapper = parts
    ids = tokenizer.ids
    config = MiniGPT5Config(voken_ids=ids.voken_ids, image_placeholder_id=ids.image_placeholder_id, bos_id=ids.bos_id,
                            groups_per_sample=2)
    return MiniGPT5(config, llm=llm, mapper=mapper, unet=unet, vae=vae,
                    noise_schedule=schedulers.NoiseSchedule.from_config(schedule_cfg))


SETTINGS = GenerationSettings(max_new_tokens=12, max_images=2, num_inference_steps=3, guidance_scale=7.5,
                              length_buckets=(16, 32))


@pytest.fixture(scope="module")
def story_model(parts):
    """A seeded bigram model that writes "sister", then [IMG0] or "###", "day" after an image, and so on."""
    tokenizer = parts[0]
    ids = tokenizer.ids
    img0, img7 = ids.voken_ids[0], ids.voken_ids[-1]
    last = tokenizer.encode(PROMPTS[0])[-1]  # every prompt ends with "###Assistant:"
    (stop,) = tokenizer.encode("###")
    (w1,), (w2,) = tokenizer.encode("sister"), tokenizer.encode("day")  # single pieces
    transitions = {last: {w1: 0.0}, w1: {img0: 0.0, stop: 0.0}, img7: {w2: 0.0}, w2: {img0: 0.0, stop: 0.0}}
    llm = bigram_llm(tokenizer, transitions)
    model = make_model(parts, llm)
    gen = InterleavedGenerator(model, tokenizer, parts[1], settings=SETTINGS, max_input_images=1)
    # find seeds whose (batch-1) responses hold 0, 1 and 2 images: the model is seeded, not scripted
    by_count: dict[int, list] = {}
    for seed in range(12):
        (r,) = gen([Prompt(PROMPTS[seed % 3], seed=seed)])
        by_count.setdefault(len(r.images), []).append(r)
        if all(k in by_count for k in (0, 1, 2)):
            break
    return model, gen, [by_count[k][0] for k in (0, 1, 2)], transitions


def test_batch_of_three_gets_zero_one_two_images(parts, story_model, tmp_path):
    tokenizer = parts[0]
    img0 = tokenizer.ids.voken_ids[0]
    (stop,) = tokenizer.encode("###")
    model, gen, singles, _ = story_model
    batch = gen([r.prompt for r in singles])
    assert set(gen.timings) == {"prepare_s", "text_s", "images_s", "sampler_s", "respond_s"}
    assert gen.timings["sampler_s"] <= gen.timings["images_s"]
    for k, (single, batched) in enumerate(zip(singles, batch)):
        assert len(batched.images) == k
        assert batched.token_ids == single.token_ids
        for a, b in zip(batched.images, single.images):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
        # images sit where [IMG0] was sampled: after w1 (and after w2 for the second)
        assert [s for s in batched.segments if isinstance(s, int)] == list(range(k))
        expected = {0: ["sister"], 1: ["sister", 0, "day"], 2: ["sister", 0, "day", 1, "day"]}[k]
        assert batched.segments == expected, batched.segments
        assert batched.token_ids.count(img0) == k and batched.token_ids[-1] == stop
    assert batch[2].text == "sister [image 1] day [image 2] day"
    assert not np.array_equal(batch[2].images[0], batch[2].images[1])
    # at most 2 images per sampler call: the 3 images come from two calls, and are the same pictures
    chunked = InterleavedGenerator(model, tokenizer, parts[1], settings=dataclasses.replace(SETTINGS, render_batch=2),
                                   max_input_images=1)([r.prompt for r in singles])
    with pytest.raises(ValueError, match="render_batch=0"):
        dataclasses.replace(SETTINGS, render_batch=0)
    for one, other in zip(chunked, batch):
        assert one.token_ids == other.token_ids and len(one.images) == len(other.images)
        for a, b in zip(one.images, other.images):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1

    # the LLM re-laid for decoding (fused, and on a CPU the packed matmul and attention kernels) writes
    # the same responses
    prepared_llm = bigram_llm(tokenizer, transitions=story_model[3])
    assert prepare_for_decoding(prepared_llm)["fused_layers"] == 1
    prepared = InterleavedGenerator(make_model(parts, prepared_llm), tokenizer, parts[1], settings=SETTINGS,
                                    max_input_images=1)([r.prompt for r in singles])
    for one, other in zip(prepared, batch):
        assert one.token_ids == other.token_ids and len(one.images) == len(other.images)
        for a, b in zip(one.images, other.images):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1

    index = write_outputs(batch, tmp_path / "out")
    html = index.read_text()
    assert html.count('class="generated"') == 3 and "000/record.json" not in html
    record = json.loads((tmp_path / "out" / "002" / "record.json").read_text())
    assert record["images"] == ["image_1.png", "image_2.png"] and record["text"] == batch[2].text
    assert record["sd_baseline"] is None and 'class="reference"' not in html
    _check_renders(index, 3)
    # a folder with an earlier report is refused, or emptied of it (other files stay): two runs never mix
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "1000").mkdir()  # a crash left it before its record.json
    (tmp_path / "out" / "1000" / "image_1.png").write_bytes(b"")
    (tmp_path / "out" / "2024").mkdir()  # the user's: a photo and a note, not a response folder
    (tmp_path / "out" / "2024" / "holiday.png").write_bytes(b"png")
    (tmp_path / "out" / "2024" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds an earlier report \(5 entries, e.g. index.html\)"):
        ReportWriter(tmp_path / "out")
    assert (tmp_path / "out" / "002" / "record.json").is_file()
    report = ReportWriter(tmp_path / "out", run={"command": "infer.py --seed 3"}, overwrite=True)
    report.add([batch[1]])
    report.add([batch[0]])
    assert [p.name for p in (tmp_path / "out" / "000").glob("image_*.png")] == ["image_1.png"]
    assert not list((tmp_path / "out" / "001").glob("image_*.png"))
    assert not (tmp_path / "out" / "002").exists() and not (tmp_path / "out" / "1000").exists()
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "out" / "2024").iterdir()) == ["holiday.png", "notes.txt"]
    assert report.index.read_text().count("<article") == 2
    assert json.loads((tmp_path / "out" / "run.json").read_text()) == {"command": "infer.py --seed 3"}
    # a response that fails to write raises once the index shows those written before it
    from mg5jax.data.images import ImageLoadError

    broken = ReportWriter(tmp_path / "broken")
    gone = dataclasses.replace(batch[1], prompt=dataclasses.replace(batch[1].prompt,
                                                                    reference_image=str(tmp_path / "gone.png")))
    with pytest.raises(ImageLoadError, match="gone.png"):
        broken.add([batch[0], gone])
    assert broken.written == 1 and broken.index.read_text().count("<article") == 1
    failed = tmp_path / "failed"  # a run that stopped before its first response: replaced without overwrite
    failed.mkdir()
    (failed / "run.json").write_text(json.dumps({"command": "infer.py --seed 1"}))
    ReportWriter(failed, run={"command": "again"})
    assert json.loads((failed / "run.json").read_text()) == {"command": "again"}
    site = tmp_path / "site"  # but a page or a run.json of someone else's is refused
    site.mkdir()
    (site / "index.html").write_text("<html>mine</html>")
    with pytest.raises(FileExistsError, match=r"holds an earlier report \(1 entries, e.g. index.html\)"):
        ReportWriter(site, run={"command": "again"})
    assert (site / "index.html").read_text() == "<html>mine</html>"


def test_streamed_text_is_the_response_text(parts, story_model):
    """Pieces decoded as they come join to the decoded response (no space lost at a chunk's start)."""
    _, gen, singles, _ = story_model
    prompts = [r.prompt for r in singles]
    pieces = ["", "", ""]
    for item in gen.stream(prompts, chunk_steps=1):
        if isinstance(item, list):
            responses = item
        else:
            pieces[item[0]] += item[1]
    for row, r in enumerate(responses):
        assert pieces[row] == parts[0].decode(r.token_ids), (pieces[row], r.raw_text)
        assert r.token_ids == singles[row].token_ids  # streaming samples what generating does


def test_batches_in_a_pipeline_give_the_responses_of_single_calls(story_model):
    """`generate_batches` (the next batch prepared and its text started while this one renders) gives
    what `__call__` gives for each batch; a batch that cannot be prepared fails after the ones before it."""
    _, gen, singles, _ = story_model
    prompts = [r.prompt for r in singles]
    batches = [prompts[:2], prompts[2:], prompts[1:]]
    for batch, responses in zip(batches, gen.generate_batches(batches), strict=True):
        assert set(gen.timings) == {"prepare_s", "text_s", "images_s", "respond_s"}  # sampler calls not waited on
        for alone, piped in zip(gen(batch), responses, strict=True):
            assert piped.prompt == alone.prompt and piped.token_ids == alone.token_ids
            assert len(piped.images) == len(alone.images)
            for a, b in zip(piped.images, alone.images):
                np.testing.assert_array_equal(a, b)
    bad = Prompt("###Human: no slot here ###Assistant:", images=("missing.png",))
    done = []
    with pytest.raises(ValueError, match=r"prompt 2 of 2 .* 0 <ImageHere> slots but 1 images"):
        for responses in gen.generate_batches([prompts[:1], [prompts[0], bad], prompts[1:]]):
            done.append(responses)
    assert [[r.token_ids for r in b] for b in done] == [[singles[0].token_ids]]

    def source():  # a lazy source of batches that fails after its first
        yield prompts[:1]
        raise RuntimeError("the prompt source failed")

    done = []
    with pytest.raises(RuntimeError, match="the prompt source failed"):
        for responses in gen.generate_batches(source()):
            done.append(responses)
    assert [[r.token_ids for r in b] for b in done] == [[singles[0].token_ids]]


def test_sd_baseline_from_the_caption_and_the_reference_image(parts, story_model, tiny_sd_dir, tmp_path):  # noqa: F811
    """As the original's predict_step: SD's own image of the caption when the response has an image
    (none without a caption or an image); rendered from the noise of the response's first image."""
    from PIL import Image

    from mg5jax.diffusion import StableDiffusionPipeline
    from mg5jax.diffusion.sampler import initial_latents

    model, _, singles, _ = story_model
    none, one = singles[0].prompt, singles[1].prompt
    reference = tmp_path / "gt.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(reference)
    prompts = [dataclasses.replace(one, caption="a red square on a white table", reference_image=str(reference)),
               dataclasses.replace(none, caption="a blue circle", reference_text="Lovely photo & more", task="0_3-mm"),
               one]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    settings = dataclasses.replace(SETTINGS, sd_baseline=True)
    with pytest.raises(ValueError, match="sd_baseline needs an sd_pipeline"):
        InterleavedGenerator(model, parts[0], parts[1], settings=settings, max_input_images=1)
    gen = InterleavedGenerator(model, parts[0], parts[1], settings=settings, max_input_images=1, sd_pipeline=pipe)
    out = gen(prompts)
    assert [r.baseline is not None for r in out] == [True, False, False]
    assert out[0].token_ids == singles[1].token_ids and len(out[0].images) == 1
    assert np.abs(out[0].images[0].astype(int) - singles[1].images[0].astype(int)).max() <= 1
    # the same picture as the text-to-image pipeline gives for the caption from that noise
    latent = out[0].baseline.shape[0] // pipe.vae_scale_factor
    noise = initial_latents(jax.random.fold_in(jax.random.key(0), 1), jnp.asarray([image_seed(one.seed, 0)], jnp.uint32),
                            (4, latent, latent))
    want = pipe(prompt=[prompts[0].caption], latents=noise, num_inference_steps=SETTINGS.num_inference_steps,
                guidance_scale=SETTINGS.guidance_scale)[0]
    assert np.abs(out[0].baseline.astype(int) - (want * 255).round().astype(int)).max() <= 1
    assert np.abs(out[0].baseline.astype(int) - out[0].images[0].astype(int)).max() > 10  # another conditioning
    (piped,) = gen.generate_batches([prompts])  # the sampler calls dispatched, then waited on: the same images
    np.testing.assert_array_equal(piped[0].baseline, out[0].baseline)
    assert [r.baseline is not None for r in piped] == [True, False, False]

    index = write_outputs(out, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "000" / "record.json").read_text())
    assert record["sd_baseline"] == "sd_baseline.png" and record["caption"] == prompts[0].caption
    assert record["reference_image"] == str(reference)
    assert (tmp_path / "out" / "000" / "reference.png").is_file()
    html = index.read_text()
    assert html.count('class="reference"') == 2 and "a red square on a white table" in html
    assert "caption: a blue circle" in html  # a caption is shown without images to compare too
    assert "the dataset's text: Lovely photo &amp; more" in html and "prompt 2 · task 0_3-mm · seed" in html
    record = json.loads((tmp_path / "out" / "001" / "record.json").read_text())
    assert (record["task"], record["reference_text"]) == ("0_3-mm", "Lovely photo & more")
    _check_renders(index, 4)


def _check_renders(index, images: int):
    """Open the page in headless Chromium and count images that loaded (skipped without Chromium)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed; .ci/run installs it")
    probe = index.with_name("probe.html")
    probe.write_text(index.read_text().replace(
        "</body>", "<script>window.addEventListener('load', () => { const n = [...document.images].filter("
                   "i => i.complete && i.naturalWidth > 0).length; document.body.setAttribute('data-loaded', n);"
                   " document.body.setAttribute('data-total', document.images.length); });</script></body>"))
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--no-first-run", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert f'data-loaded="{images}"' in dom and f'data-total="{images}"' in dom, dom[-500:]


def test_inference_window_equals_teacher_forced_window(parts):
    """A random LLM forced (by a logit bias) to start with [IMG0] twice: the windows kept by the decode
    loop equal the training windows of MiniGPT5.voken_windows over the same sequence."""
    tokenizer = parts[0]
    ids = tokenizer.ids
    cfg = LlamaConfig(vocab_size=ids.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = make_model(parts, LlamaForCausalLM(cfg, rngs=nnx.Rngs(7)))
    model.mapper = VokenMapper(MapperConfig(llm_dim=64, hidden=32, num_queries=77, enc_layers=1, dec_layers=1,
                                            heads=4, ff=64), rngs=nnx.Rngs(2))
    gen = InterleavedGenerator(model, tokenizer, parts[1], settings=GenerationSettings(length_buckets=(16, 32)),
                               max_input_images=1)
    prompts = [Prompt(PROMPTS[0]), Prompt(PROMPTS[2])]
    batch = gen.prepare(prompts)
    embeds, mask, _ = model.splice(jax.tree.map(jnp.asarray, batch))
    config = SamplingConfig(do_sample=False, max_new_tokens=6, logit_bias=((ids.voken_ids[0], 30.0),),
                            pad_id=ids.pad_id)
    insertion = ForcedInsertion(trigger_id=ids.voken_ids[0], tokens=tuple(ids.voken_ids[1:]), max_insertions=2)
    out = generate(model.llm, inputs_embeds=embeds, prompt_mask=mask, config=config, insertion=insertion)
    np.testing.assert_array_equal(np.asarray(out.insertion_counts), [2, 2])

    # teacher forcing: prompt as source, the generated ids as target, through the training path
    n = int(np.asarray(out.lengths).max())
    t = batch["input_ids"].shape[1] + n
    train = {k: v for k, v in batch.items()}
    train["input_ids"] = np.full((2, t), ids.pad_id, np.int32)
    train["labels"] = np.full((2, t), IGNORE_INDEX, np.int32)
    train["attention_mask"] = np.zeros((2, t), np.int32)
    for r in range(2):
        src = [i for i, m in zip(batch["input_ids"][r], batch["attention_mask"][r]) if m]
        tgt = np.asarray(out.ids)[r, : int(out.lengths[r])].tolist()
        train["input_ids"][r, : len(src) + len(tgt)] = src + tgt
        train["labels"][r, len(src) : len(src) + len(tgt)] = tgt
        train["attention_mask"][r, : len(src) + len(tgt)] = 1
    e, m, labels = model.splice(jax.tree.map(jnp.asarray, train))
    hidden = model.llm(inputs_embeds=e, attention_mask=m).hidden_states
    windows, found = model.voken_windows(hidden, labels)
    assert bool(jnp.all(found))
    err = np.abs(np.asarray(windows) - np.asarray(out.insertion_hidden)).max()
    assert err <= 1e-5, err


def test_prompt_checks_its_fields():
    Prompt("a story", ("a.png",), seed=2**31 - 1)
    for bad in (dict(text=3), dict(text="t", images="a.png"), dict(text="t", images=(None,)), dict(text="t", seed=-1),
                dict(text="t", seed=2**31), dict(text="t", seed="7"), dict(text="t", seed=True),
                dict(text="t", caption=["a cat"]), dict(text="t", reference_image=3),
                dict(text="t", reference_image=" ")):
        with pytest.raises(ValueError, match="prompt (text|images|seed|caption|reference_image)"):
            Prompt(**bad)


def test_infer_py_rejects_a_bad_prompts_file_before_loading_a_model(tmp_path, tiny_tokenizer_dir,  # noqa: F811
                                                                    tiny_sd_dir):  # noqa: F811
    """Each malformed --prompts file ends infer.py at once with one line naming the file and the line (or the
    entry of a .json list): what generation would refuse after loading the models is checked first."""
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "here.png")
    (tmp_path / "text.png").write_text("not an image")
    slot = "<Img><ImageHere></Img>"
    cases = {
        "object.json": ('{"text": "a"}', "expected a list of prompts, got a dict"),
        "no_text.json": ('[{"text": "a"}, {"txt": "b"}]', ", entry 2: no 'text' string"),
        "list.txt": ('\n [{"text": "a"},\n {"txt": "b"}]', ", entry 2: no 'text' string"),  # a list by its content
        "string_images.jsonl": ('{"text": "a", "images": "here.png"}', ", line 1: 'images' must be a list"),
        "missing_image.jsonl": (f'{{"text": "{slot}", "images": ["here.png"]}}\n\n{{"text": "b", "images": ["gone.png"]}}',
                                ", line 3: image file not found"),
        "unreadable_image.jsonl": (f'{{"text": "{slot}", "images": ["text.png"]}}', ", line 1: cannot read image"),
        "more_slots.jsonl": (f'{{"text": "{slot} {slot}", "images": ["here.png"]}}',
                             ", line 1: the text has 2 <ImageHere> slots but 1 images are given"),
        "more_images.jsonl": ('{"text": "a", "images": ["here.png"]}', "the text has 0 <ImageHere> slots but 1 images"),
        "too_many_images.jsonl": (f'{{"text": "{slot * 6}", "images": {json.dumps(["here.png"] * 6)}}}',
                                  ", line 1: 6 input images, more than data.max_input_images=5"),
        "too_long.jsonl": ('{"text": "a"}\n' + json.dumps({"text": "red square " * 900}),
                           (", line 2: the prompt has ", " tokens, more than the 1024 generation takes")),
        "negative_seed.jsonl": ('{"text": "a", "seed": -1}', ", line 1: prompt seed must be an integer"),
        "missing_reference.jsonl": ('{"text": "a", "caption": "a cat", "reference_image": "gone.png"}',
                                    ", line 1: reference_image: image file not found"),
        "caption_list.jsonl": ('{"text": "a", "caption": ["a cat"]}', ", line 1: prompt caption must be a string"),
        "empty_reference.jsonl": ('{"text": "a", "reference_image": ""}', ", line 1: prompt reference_image must be"),
        "broken.json": ('[{"text": "a"', "not valid JSON"),
        "broken_line.jsonl": ('{"text": "a"}\n\n{"text": ', ", line 3: not valid JSON"),
        "empty.jsonl": ("\n", "no prompts in the file"),
    }
    plain_run = tmp_path / "run"  # a run of ours whose recorded config has nothing to compare
    (plain_run / "checkpoints" / "1" / "meta").mkdir(parents=True)
    (plain_run / "checkpoints" / "1" / "meta" / "metadata").write_text(json.dumps({"step": 1, "config": {}}))
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        r = subprocess.run([sys.executable, "infer.py", "--config", "configs/demo.py", "--prompts", str(path),
                            f"--config.model.llm_path={tiny_tokenizer_dir}", "--checkpoint", str(plain_run)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        last = r.stderr.strip().splitlines()[-1]
        fragments = message if isinstance(message, tuple) else (message,)
        assert r.returncode == 1 and last.startswith(f"infer.py: --prompts {path}"), last
        assert all(f in last for f in fragments), last
        assert "loading" not in r.stderr  # failed before any weights were read
    # a stage-2 run's checkpoint holds only what it trained: the stage-1 weights must be the ones it started from
    run = tmp_path / "stage2_run"
    (run / "checkpoints" / "7" / "meta").mkdir(parents=True)
    (run / "checkpoints" / "7" / "meta" / "metadata").write_text(
        json.dumps({"step": 7, "config": {"model": {"init_from": "runs/stage1_cc3m", "vision": {"kind": "blip2"},
                                                    "lora": {"enabled": True, "targets": "k_proj$", "rank": 8}},
                                          "data": {"input_image_size": 48}}}))
    earlier = tmp_path / "stories"  # what an earlier run wrote
    (earlier / "000").mkdir(parents=True)
    (earlier / "000" / "record.json").write_text("{}")
    (earlier / "index.html").write_text("<html></html>")
    (tmp_path / "image.ckpt").write_bytes((tmp_path / "here.png").read_bytes())
    (tmp_path / "zipped.ckpt").write_bytes(b"PK\x03\x04")  # looks like a torch file: read only after the checks
    (earlier / "000" / "image_1.png").write_bytes((tmp_path / "here.png").read_bytes())
    (tmp_path / "two.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    for flags, message in ((["--prompt", "a", "--prompts", str(path)], "give --prompt or --prompts, not both"),
                           (["--prompt", slot, "--image", str(earlier / "000" / "image_1.png"), "--out", str(earlier),
                             "--overwrite", "--checkpoint", str(plain_run)],
                            f"--prompt: image {earlier / '000' / 'image_1.png'} is among the earlier results that "
                            f"--overwrite replaces in --out {earlier}: copy it elsewhere first"),
                           (["--prompt", "a", "--out", str(earlier)],
                            f"--out {earlier}: holds the results of an earlier run (1 responses): pass --overwrite "
                            "to replace them, or choose another --out"),
                           (["--prompt", "a", "--checkpoint", str(plain_run), "--official_stage1", str(path)],
                            "give --checkpoint (a run of ours) or --official_stage1, not both"),
                           (["--prompts", str(path), "--limit", "2"],
                            "--limit takes prompts from the config's validation file: not with --prompt / --prompts"),
                           (["--prompt", "a", "--official_stage1", str(tmp_path / "image.ckpt")],
                            f"--official_stage1: {tmp_path / 'image.ckpt'} is not a torch checkpoint (neither a zip "
                            "archive nor a pickle)"),
                           (["--prompt", "a", "--guidance_scale", "nan"], "--guidance_scale=nan: expected a finite number"),
                           (["--prompt", "a", "--checkpoint", str(plain_run), "--steps", "1001",
                             f"--config.model.sd_path={tiny_sd_dir}"],
                            "num_inference_steps=1001: expected 1 to the scheduler's num_train_timesteps=1000"),
                           (["--prompt", "a", "--checkpoint", str(plain_run), "--config.data.output_image_size=36",
                             f"--config.model.sd_path={tiny_sd_dir}"],
                            f"data.output_image_size=36 for {tiny_sd_dir}: must be a multiple of 64 (the VAE's factor "
                            "8 × the U-Net's 8)"),
                           (["--prompts", str(path), "--steps", "0"], "--steps=0: expected at least 1"),
                           (["--prompt", "a", "--seed", "-1"], "--seed=-1: expected an integer in [0, 2**31)"),
                           (["--seed", str(2**31 - 1), "--limit", "2"],
                            f"--seed={2**31 - 1}: expected an integer in [0, 2**31) that stays there for the 2 "
                            "prompts (seed + 1)"),
                           (["--prompts", str(tmp_path / "two.jsonl"), "--seed", str(2**31 - 1)],
                            f"--prompts {tmp_path / 'two.jsonl'}, line 2: its seed is --seed + 1 = {2**31}, past "
                            "2**31 - 1: give a smaller --seed, or the row a seed"),
                           (["--prompt", "a", "--out", str(tmp_path / "here.png" / "stories")],
                            f"--out {tmp_path / 'here.png' / 'stories'}: {tmp_path / 'here.png'} exists and is not a "
                            "directory"),
                           (["--prompt", "a", "--image", str(tmp_path / "here.png"), "--checkpoint", str(plain_run)],
                            "--prompt: the text has 0 <ImageHere> slots but 1 images are given"),
                           (["--checkpoint", str(plain_run), f"--config.data.val_path={tmp_path / 'gone.json'}"],
                            f"data.val_path: file not found: {tmp_path / 'gone.json'}"),  # the default prompts' file
                           (["--prompt", "a", "--checkpoint", str(tmp_path / "nowhere")],
                            f"--checkpoint: no such directory: {tmp_path / 'nowhere'}"),
                           (["--prompt", "a", "--checkpoint", str(tmp_path / "zipped.ckpt")],
                            f"--checkpoint: {tmp_path / 'zipped.ckpt'} is a file; expected a run's directory"),
                           (["--prompt", "a", "--official_stage1", str(tmp_path / "zipped.ckpt"), "--official_stage2",
                             str(tmp_path / "zipped.ckpt")],
                            "--official_stage2 holds LoRA adapters, and this config's model.lora.enabled is False"),
                           (["--prompt", "a", "--official_stage1", str(tmp_path / "zipped.ckpt"), "--official_stage2",
                             str(tmp_path / "zipped.ckpt"), "--config.model.lora.enabled=True",
                             "--config.model.lora.alpha=8"],
                            "--official_stage2's LoRA runs at alpha / r = 2.0; this config's model.lora has alpha 8 / "
                            "rank 8 (the original: 16 / 8)"),
                           (["--prompt", "a", "--config.model.remat_lm=True"],
                            "--config.model.remat_lm: the config has no field 'remat_lm' (did you mean 'remat_llm'?)"),
                           (["--prompt", "a", "--checkpoint", str(run)],
                            f"{run} was trained with model.init_from='runs/stage1_cc3m' (this config: ''), "
                            "model.lora.enabled=True (this config: False), model.lora.targets='k_proj$' (this config: "
                            "'(^|\\\\.)(q_proj|v_proj)$'), data.input_image_size=48 (this config: 32): add "
                            "--config.model.init_from=runs/stage1_cc3m --config.model.lora.enabled=True "
                            "'--config.model.lora.targets=k_proj$' --config.data.input_image_size=48")):
        r = subprocess.run([sys.executable, "infer.py", "--config", "configs/demo.py", *flags,
                            f"--config.model.llm_path={tiny_tokenizer_dir}"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and last.startswith(f"infer.py: {message}"), r.stderr[-500:]
        assert "loading" not in r.stderr  # failed before any weights were read
    # without --config, a run's recorded config is used: it must be a whole one
    for flags, message in ((["--prompt", "a"], "--config is required (e.g. --config configs/stage2_vist.py), or "
                                               "--checkpoint with a run of ours, whose recorded config is used"),
                           (["--prompt", "a", "--checkpoint", str(plain_run)], f"--checkpoint {plain_run}: records "
                                                                               "no config"),
                           (["--prompt", "a", "--checkpoint", str(run)], f"--checkpoint {run}: its recorded config "
                                                                         "lacks ")):
        r = subprocess.run([sys.executable, "infer.py", *flags], cwd=REPO, capture_output=True, text=True, timeout=120)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and last.startswith(f"infer.py: {message}"), r.stderr[-500:]
    assert (earlier / "000" / "record.json").read_text() == "{}"  # nothing already written is lost
    assert (earlier / "000" / "image_1.png").is_file()


def test_a_run_on_precomputed_features_takes_any_vision_encoder_at_inference():
    """infer.py compares a run's recorded vision settings only when it trained with an encoder: one
    trained on precomputed features (kind 'none') may read images with the encoder that made them."""
    from mg5jax import build

    recorded = {"model": {"vision": {"kind": "none"}, "lora": {"enabled": False}}}
    assert not [k for k in build.run_settings(recorded) if k.startswith("model.vision") or k.startswith("data.")]
    recorded["model"]["vision"]["kind"] = "blip2"
    assert {"model.vision.kind", "model.vision.blip2_dir", "model.vision.proj_path",
            "data.input_image_size"} <= set(build.run_settings(recorded))


def test_prompt_images_go_to_the_device_as_uint8_pixels(parts, tmp_path, monkeypatch):
    """Input images are read (on threads when the files are big enough to pay for them) into uint8
    `[B, M, 3, S, S]` and normalized in the splice program: the same LLM inputs as the model's splice of
    host-normalized images; a missing file is named."""
    from mg5jax.generation import interleaved

    from PIL import Image

    from mg5jax.data.images import ImageLoadError, input_image_pixels, input_image_transform, load_image
    from mg5jax.generation.interleaved import _splice
    from mg5jax.models.minigpt5 import PromptEncoder
    from mg5jax.models.vision import QFormerConfig, VisionConfig, VisionEncoder, VisionEncoderConfig

    tokenizer = parts[0]
    cfg = VisionEncoderConfig(
        vision=VisionConfig(image_size=28, patch_size=14, width=24, depth=1, heads=2, mlp_dim=32),
        qformer=QFormerConfig(hidden_size=16, num_layers=1, heads=2, intermediate_size=32, cross_attention_freq=1,
                              encoder_width=24, num_query_tokens=4), proj_dim=D)
    base = make_model(parts, bigram_llm(tokenizer, {}))
    model = MiniGPT5(dataclasses.replace(base.config, num_query_tokens=4), llm=base.llm, mapper=base.mapper,
                     unet=base.unet, vae=base.vae, noise_schedule=schedulers.NoiseSchedule.from_config(parts[1]),
                     vision=VisionEncoder(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3)))
    gen = InterleavedGenerator(model, tokenizer, parts[1], settings=SETTINGS, input_image_size=28, max_input_images=2)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(((40, 30), (17, 50), (28, 28))):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    slot = "<Img><ImageHere></Img>"
    prompts = [Prompt(f"###Human: {slot} a story {slot} ###Assistant:", (paths[0], paths[1])),
               Prompt(f"###Human: {slot} more ###Assistant:", (paths[2],))]
    batch = gen.prepare(prompts)
    monkeypatch.setattr(interleaved, "PARALLEL_READ_BYTES", 0)  # these small files on threads
    jax.tree.map(np.testing.assert_array_equal, gen.prepare(prompts), batch)
    assert batch["input_images"].dtype == np.uint8 and batch["input_images"].shape == (2, 2, 3, 28, 28)
    for (i, k), path in zip(((0, 0), (0, 1), (1, 0)), paths):
        np.testing.assert_array_equal(batch["input_images"][i, k], input_image_pixels(load_image(path), size=28))
    np.testing.assert_array_equal(batch["input_images"][1, 1], 0)
    np.testing.assert_array_equal(batch["input_image_mask"], [[True, True], [True, False]])

    embeds, mask = _splice(*gen._prompt_split, batch)
    floats = dict(batch, input_images=np.zeros((2, 2, 3, 28, 28), np.float32))
    for (i, k), path in zip(((0, 0), (0, 1), (1, 0)), paths):
        floats["input_images"][i, k] = input_image_transform(load_image(path), size=28)
    expected, expected_mask, _ = model.splice(jax.tree.map(jnp.asarray, floats))
    np.testing.assert_array_equal(mask, np.asarray(expected_mask).astype(bool))
    np.testing.assert_array_equal(embeds, expected)
    assert isinstance(PromptEncoder(model).vision, VisionEncoder)

    missing = str(tmp_path / "gone.png")
    for threshold in (0, 1 << 30):  # on threads, in turn
        monkeypatch.setattr(interleaved, "PARALLEL_READ_BYTES", threshold)
        with pytest.raises(ImageLoadError, match=r"prompt 2 of 2 \(ending '<Img><ImageHere></Img>'\): .*gone.png"):
            gen.prepare([prompts[1], Prompt(slot, (missing,))])

    # a batch without input images has no image slots (no vision pass, a shorter prompt); its prompts get
    # the responses they get beside a prompt with images
    text_only = [Prompt("###Human: a day at the beach ###Assistant:", seed=s) for s in range(3)]
    batch = gen.prepare(text_only)
    assert "input_images" not in batch and batch["input_image_features"].shape == (3, 0, 4, D)
    embeds, mask = _splice(*gen._prompt_split, batch)
    assert embeds.shape[1] == 1 + batch["input_ids"].shape[1]
    alone = gen(text_only)
    beside = gen([prompts[1], *text_only])[1:]
    assert [r.token_ids for r in alone] == [r.token_ids for r in beside]
    assert len({tuple(r.token_ids) for r in alone}) == 3
