"""Samples → static-shape batches: tokenization and labels, image slots, buckets, resume, bad data."""

import dataclasses
import json

import numpy as np
import pytest
from fixtures_tokenizer import tiny_tokenizer_dir  # noqa: F401  (session fixture)

from mg5jax.data import pipeline
from mg5jax.data.datasets import DataError, Sample, read_vist
from mg5jax.data.tokenization import IGNORE_INDEX, MiniGPT5Tokenizer

SPEC = pipeline.BatchSpec(batch_size=2, length_buckets=(64, 128, 256), max_input_images=5, max_output_images=1,
                          input_image_size=28, output_image_size=32)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):  # noqa: F811
    return MiniGPT5Tokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def vist(samples_dir):
    samples, report = read_vist(str(samples_dir / "VIST" / "val_cleaned.json"), test=False)
    assert report.skipped == 0
    return samples


def test_examples_match_tokenizer_and_images(tokenizer, vist):
    builder = pipeline.ExampleBuilder(tokenizer, SPEC, train=False)
    rng = np.random.default_rng(0)
    for sample in vist:
        ex = builder(sample, rng)
        ids = tokenizer.encode_example(sample.source, sample.target)
        np.testing.assert_array_equal(ex["input_ids"], ids.input_ids)
        np.testing.assert_array_equal(ex["labels"], ids.labels)
        n_slots = sample.source.count("<ImageHere>")
        assert ex["input_image_mask"].sum() == n_slots
        assert ex["input_images"].shape == (5, 3, 28, 28)
        assert np.all(ex["input_images"][n_slots:] == 0) and np.all(ex["input_images"][:n_slots].std((1, 2, 3)) > 0)
        assert bool(ex["output_image_mask"][0]) == (sample.output_image is not None)
        if sample.output_image is not None:
            assert ex["output_images"].min() >= -1 and ex["output_images"].max() <= 1


def test_batches_pad_to_buckets_and_resume_exactly(tokenizer, vist):
    builder = pipeline.ExampleBuilder(tokenizer, SPEC, train=True)
    ds = pipeline.make_dataset(vist, builder, seed=3, shuffle=True, num_epochs=2)
    it = iter(ds)
    first = [next(it) for _ in range(3)]
    for b in first:
        t = b["input_ids"].shape[1]
        assert t in SPEC.length_buckets
        lengths = b["attention_mask"].sum(1)
        assert t == min(x for x in SPEC.length_buckets if x >= lengths.max())
        for i, n in enumerate(lengths):
            assert np.all(b["input_ids"][i, n:] == tokenizer.ids.pad_id)
            assert np.all(b["labels"][i, n:] == IGNORE_INDEX)
    state = it.get_state()
    rest = [next(it) for _ in range(2)]
    it2 = iter(ds)
    it2.set_state(state)
    for a, b in zip(rest, [next(it2) for _ in range(2)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # 13 samples × 2 epochs, batches of 2: 13 full batches, the two shards of 2 processes are disjoint
    assert sum(1 for _ in iter(ds)) == 13
    tasks = lambda pi: {tuple(b["input_ids"][0][:20]) for b in pipeline.make_dataset(  # noqa: E731
        vist, builder, seed=3, process_index=pi, process_count=2)}
    assert len(tasks(0)) + len(tasks(1)) >= len(tasks(0) | tasks(1))


def test_every_epoch_is_a_permutation_of_the_data(tokenizer, vist):
    """Shuffled then repeated: each epoch holds every sample once, in an order of its own."""
    builder = pipeline.ExampleBuilder(tokenizer, dataclasses.replace(SPEC, batch_size=1), train=False)
    it = iter(pipeline.make_dataset(vist, builder, seed=3, shuffle=True, num_epochs=None))
    batches = [next(it) for _ in range(2 * len(vist))]
    seen = [tuple(b["input_ids"][0][b["attention_mask"][0] > 0]) for b in batches]
    everyone = {tuple(builder(s, np.random.default_rng(0))["input_ids"]) for s in vist}
    first, second = seen[: len(vist)], seen[len(vist):]
    assert len(everyone) == len(vist) and set(first) == everyone and set(second) == everyone
    assert first != second


def test_bad_samples_are_skipped_or_raise(tokenizer, vist, tmp_path, caplog):
    missing = Sample(source="a <Img><ImageHere></Img> b", target="c ###", caption=None, task_name="bad_1",
                     input_images=(str(tmp_path / "nope.jpg"),), output_image=None)
    too_many = Sample(source="<ImageHere>" * 6, target="x", caption=None, task_name="bad_2",
                      input_images=(vist[1].input_images[0],) * 6, output_image=None)
    builder = pipeline.ExampleBuilder(tokenizer, SPEC, train=False)
    assert builder(missing, np.random.default_rng(0)) is None
    assert builder(too_many, np.random.default_rng(0)) is None
    assert builder.skipped == 2 and "nope.jpg" in caplog.text and "bad_2" in caplog.text
    strict = pipeline.ExampleBuilder(tokenizer, SPEC, train=False, strict=True)
    with pytest.raises(DataError, match="bad_1.*nope.jpg"):
        strict(missing, np.random.default_rng(0))
    batches = list(pipeline.make_dataset([missing, vist[0], vist[1]], builder, shuffle=False))
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 2
    assert builder.dropped == 1  # what train.py's metrics report as skipped_samples
    caplog.clear()  # thousands of bad rows: the first are logged one by one, then a count now and then
    quiet = pipeline.ExampleBuilder(tokenizer, SPEC, train=False)
    for i in range(2 * pipeline.SKIP_REPORT_EVERY):
        quiet(dataclasses.replace(too_many, task_name=f"bad_{i}"), np.random.default_rng(0))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == pipeline.LOGGED_SKIPS + 2 and lines[-1].startswith("skipped 2000 samples so far")
    caplog.clear()  # a bad sample met again (each epoch, and grain builds ahead) is counted, not logged again
    again = pipeline.ExampleBuilder(tokenizer, SPEC, train=False)
    for _ in range(5):
        again(too_many, np.random.default_rng(0))
    assert again.skipped == 5 and len(caplog.records) == 1


def test_without_a_vision_encoder_slots_hold_zero_features(tokenizer, vist):
    """Stage 1 (model.vision.kind='none', no precomputed features): image-free samples get zero
    feature slots for the splice, and a sample with input images is skipped naming why."""
    captioned = Sample(source="Show me an image of a dog.", target="[IMG0] ###", caption="a dog", task_name="cc3m_0",
                       input_images=(), output_image=None)
    builder = pipeline.ExampleBuilder(tokenizer, SPEC, train=True, vision_encoder=False)
    example = builder(captioned, np.random.default_rng(0))
    assert "input_images" not in example and not example["input_image_mask"].any()
    np.testing.assert_array_equal(example["input_image_features"],
                                  np.zeros((SPEC.max_input_images, SPEC.num_query_tokens, SPEC.llm_dim)))
    with_images = next(s for s in vist if any(s.input_images))
    assert builder(with_images, np.random.default_rng(0)) is None and builder.skipped == 1
    strict = pipeline.ExampleBuilder(tokenizer, SPEC, train=True, vision_encoder=False, strict=True)
    with pytest.raises(DataError, match=r"input image\(s\), but the model has no vision encoder"):
        strict(with_images, np.random.default_rng(0))


def test_a_dataset_where_nothing_builds_stops_instead_of_searching_forever(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline._Built.__init__, "__defaults__", (5,))
    gone = Sample(source="a <Img><ImageHere></Img> b", target="c ###", caption=None, task_name="gone",
                  input_images=(str(tmp_path / "nope.jpg"),), output_image=None)
    builder = pipeline.ExampleBuilder(tokenizer, SPEC, train=True)
    with pytest.raises(DataError, match="5 examples in a row could not be built"):
        next(iter(pipeline.make_dataset([gone], builder, num_epochs=None)))


def test_hosts_stay_in_step():
    """Two processes: host 0 picked bucket 8 for its two batches, host 1 bucket 16 for its only one. Both
    get one batch, padded to 16 as collate pads, then both stop (host 0 alone would wait forever)."""
    script = (
        "import json, numpy as np\n"
        "from mg5jax.data import pipeline\n"
        "def batch(t):\n"
        "    return {'input_ids': np.full((2, t), 7, np.int32), 'labels': np.full((2, t), 5, np.int32),\n"
        "            'attention_mask': np.ones((2, t), np.int32), 'input_image_mask': np.ones((2, 3), bool)}\n"
        "mine = [batch(8), batch(8)] if jax.process_index() == 0 else [batch(16)]\n"
        "got = list(pipeline.host_batches(mine, pad_id=0))\n"
        "print(json.dumps([{k: v[0].tolist() for k, v in b.items()} for b in got]))\n")
    from _multiprocess import run_two_processes

    host0, host1 = (json.loads(out.strip().splitlines()[-1]) for out in run_two_processes(script))
    assert len(host0) == len(host1) == 1
    assert host0[0] == {"input_ids": [7] * 8 + [0] * 8, "labels": [5] * 8 + [IGNORE_INDEX] * 8,
                        "attention_mask": [1] * 8 + [0] * 8, "input_image_mask": [True] * 3}
    assert host1[0]["input_ids"] == [7] * 16


def test_unreadable_feature_file_skips_the_sample_naming_it(tokenizer, tmp_path, caplog):
    sample = Sample(source="a <Img><ImageHere></Img> b", target="c ###", caption=None, task_name="feat_1",
                    input_images=(str(tmp_path / "img.png"),), output_image=None)
    (tmp_path / "img.npy").write_bytes(b"")  # an interrupted write
    builder = pipeline.ExampleBuilder(tokenizer, SPEC, train=False, input_features_dir=str(tmp_path))
    assert builder(sample, np.random.default_rng(0)) is None
    assert builder.skipped == 1 and "feat_1" in caplog.text and "img.npy: cannot read the precomputed array" in caplog.text
    # NaNs (a diverged encoder) or complex values would train on garbage: skipped the same way
    shape = (SPEC.num_query_tokens, SPEC.llm_dim)
    for bad, message in ((np.full(shape, np.nan, np.float32), f"img.npy: {np.prod(shape)} non-finite values"),
                         (np.zeros(shape, np.complex64), "img.npy: expected a real-valued array, got dtype complex64")):
        np.save(tmp_path / "img.npy", bad)
        assert builder(sample, np.random.default_rng(0)) is None and message in caplog.text


def test_features_of_another_image_with_the_same_stem_are_refused(tokenizer, tmp_path, caplog):
    """sources.json (written by mg5jax.encode_images) says which image each <stem>.npy came from."""
    first, second = tmp_path / "train_images" / "5.png", tmp_path / "val_images" / "5.png"
    np.save(tmp_path / "5.npy", np.zeros((SPEC.num_query_tokens, SPEC.llm_dim), np.float32))
    (tmp_path / "sources.json").write_text(json.dumps({"5": str(first.resolve())}))
    builder = pipeline.ExampleBuilder(tokenizer, SPEC, train=False, input_features_dir=str(tmp_path))

    def sample(path):
        return Sample(source="a <Img><ImageHere></Img> b", target="c ###", caption=None, task_name="s",
                      input_images=(str(path),), output_image=None)

    assert builder(sample(first), np.random.default_rng(0)) is not None
    assert builder(sample(second), np.random.default_rng(0)) is None
    assert "5.npy holds the features of" in caplog.text and "val_images/5.png" in caplog.text
    # precomputed VAE moments of the target image are checked the same way
    moments = tmp_path / "moments"
    moments.mkdir()
    np.save(moments / "5.npy", np.zeros((8, SPEC.latent_size, SPEC.latent_size), np.float32))
    (moments / "sources.json").write_text(json.dumps({"5": str(first.resolve())}))
    builder = pipeline.ExampleBuilder(tokenizer, SPEC, train=False, input_features_dir=str(tmp_path),
                                      output_moments_dir=str(moments))
    target = dataclasses.replace(sample(first), output_image=str(second))
    assert builder(target, np.random.default_rng(0)) is None
    assert "moments/5.npy holds the VAE moments of" in caplog.text


def test_a_precomputed_folder_for_another_model_or_size_is_refused_once(tokenizer, tmp_path):
    """Features of another LLM width / query count, or moments at another size, would fail every sample
    alike: the builder refuses the folder when it is made, naming both shapes."""
    features, moments = tmp_path / "features", tmp_path / "moments"
    features.mkdir()
    moments.mkdir()
    np.save(features / "1.npy", np.zeros((SPEC.num_query_tokens, SPEC.llm_dim // 2), np.float32))
    with pytest.raises(DataError, match=rf"features holds arrays of shape \({SPEC.num_query_tokens}, "
                                        rf"{SPEC.llm_dim // 2}\), this run needs input features .* shape "
                                        rf"\({SPEC.num_query_tokens}, {SPEC.llm_dim}\): encode the images"):
        pipeline.ExampleBuilder(tokenizer, SPEC, train=False, input_features_dir=str(features))
    np.save(moments / "1.npy", np.zeros((8, SPEC.latent_size // 2, SPEC.latent_size // 2), np.float32))
    with pytest.raises(DataError, match=rf"VAE moments \[8, latent, latent\] of {SPEC.output_image_size} px"):
        pipeline.ExampleBuilder(tokenizer, SPEC, train=False, output_moments_dir=str(moments))
    with pytest.raises(DataError, match="nowhere: no such folder of precomputed input features"):
        pipeline.ExampleBuilder(tokenizer, SPEC, train=False, input_features_dir=str(tmp_path / "nowhere"))
    (features / "0.npy").write_bytes(b"")  # an interrupted write: judged by the next file, reported per sample
    np.save(features / "1.npy", np.zeros((SPEC.num_query_tokens, SPEC.llm_dim), np.float32))
    pipeline.ExampleBuilder(tokenizer, SPEC, train=False, input_features_dir=str(features))
