"""Image encoder: EVA ViT + ln_vision, Q-Former and the whole encoder against transformers BLIP-2 (fp32,
tiny random weights), LAVIS / MiniGPT-4 pickle import, and the encode_images CLI."""

import json
import shutil
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

import _fixtures_vision as fx
from mg5jax import encode_images, parallel
from mg5jax.convert import keymap as km
from mg5jax.convert import vision as convert
from mg5jax.convert.sources import CheckpointError, DictSource
from mg5jax.data.images import input_image_pixels, input_image_transform, load_image
from mg5jax.data import pipeline
from mg5jax.data.pipeline import read_feature_sources
from mg5jax.models import vision
from mg5jax.models.minigpt5 import embed_images

F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
TOL = 1e-4

_forward = nnx.jit(lambda module, x: module(x))


def _report(name, out, ref, t0):
    err = float(np.abs(np.asarray(out, np.float32) - ref).max())
    print(f"{name}: max-abs {err:.2e} ({time.perf_counter() - t0:.1f}s)")
    return err


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def blip2(tmp_path_factory):
    """A tiny random `Blip2ForConditionalGeneration` (OPT language model) saved with save_pretrained."""
    model = fx.blip2_model()
    directory = tmp_path_factory.mktemp("vision") / "blip2"
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="session")
def hf_encoder(blip2):
    return vision.VisionEncoder.from_pretrained(blip2[1], **F32)


@pytest.fixture(scope="session")
def pixels():
    return np.random.default_rng(2).normal(size=(3, 3, 28, 28)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(fx.VIT_CONFIGS))
def test_vit_matches_blip2_vision_model(name):
    t0 = time.perf_counter()
    ref_model = fx.vision_model(name)
    cfg = vision.VisionConfig.from_hf(ref_model.config.to_dict())
    graphdef, abstract = km.abstract_model(lambda: vision.EvaViT(cfg, **F32, rngs=nnx.Rngs(0)))
    source = convert.FusedQKVBiasView(DictSource(_state_dict(ref_model), f"Blip2VisionModel[{name}]"))
    vit = km.materialize(graphdef, km.load_params(abstract, source, convert.HF_VIT_KEYMAP))
    size, p = cfg.image_size, cfg.patch_size
    rng = np.random.default_rng(0)
    for side, interpolate in ((size, False), (size + 2 * p, True)):
        x = rng.normal(size=(2, 3, side, side)).astype(np.float32)
        with torch.no_grad():
            ref = ref_model(pixel_values=torch.from_numpy(x), interpolate_pos_encoding=interpolate)
        out = _forward(vit, jnp.asarray(x))
        chex.assert_shape(out, (2, 1 + (side // p) ** 2, cfg.width))
        chex.assert_type(out, jnp.float32)
        assert _report(f"ViT {name} {side}px", out, ref.last_hidden_state.numpy(), t0) <= TOL
    # at the native size the stored table is used as is, and the resize weights are the identity
    native = vit.position_embedding(cfg.grid, cfg.grid)
    np.testing.assert_array_equal(np.asarray(native), np.asarray(vit.pos_embed[...]))
    np.testing.assert_allclose(vision.bicubic_resize_matrix(cfg.grid, cfg.grid), np.eye(cfg.grid), atol=1e-12)


@pytest.mark.parametrize("sizes", [(4, 6), (16, 37), (16, 9), (5, 3)])
def test_bicubic_resize_matches_torch(sizes):
    src, dst = sizes
    x = torch.randn(1, 2, src, src, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.interpolate(x, size=(dst, dst + 1), mode="bicubic", align_corners=False).numpy()
    rows, cols = vision.bicubic_resize_matrix(src, dst), vision.bicubic_resize_matrix(src, dst + 1)
    np.testing.assert_allclose(np.einsum("Hh,nchw,Ww->ncHW", rows, x.numpy(), cols), ref, atol=1e-12)


def test_remat_wraps_every_block():
    cfg = vision.VisionEncoderConfig(
        vision.VisionConfig(image_size=28, patch_size=7, width=36, depth=2, heads=3, mlp_dim=40),
        vision.QFormerConfig(hidden_size=32, num_layers=3, heads=4, intermediate_size=64, encoder_width=36,
                             num_query_tokens=4), proj_dim=16)
    pixels = jax.ShapeDtypeStruct((2, 3, 28, 28), jnp.float32)
    for remat, count in ((False, 0), (True, 5)):
        graphdef, abstract = km.abstract_model(lambda: vision.VisionEncoder(cfg, remat=remat, rngs=nnx.Rngs(0)))
        jaxpr = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(abstract, pixels)
        assert sum(eqn.primitive.name in ("checkpoint", "remat2") for eqn in jaxpr.eqns) == count
        chex.assert_shape(jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), abstract, pixels), (2, 4, 16))


@pytest.mark.parametrize("freq", [1, 2])
def test_qformer_matches_blip2_qformer(freq):
    t0 = time.perf_counter()
    ref_model = fx.qformer_model(freq)
    cfg = vision.QFormerConfig.from_hf(ref_model.config.to_dict(), num_query_tokens=8)
    assert [layer.has_cross_attention for layer in ref_model.encoder.layer] == [
        i % freq == 0 for i in range(cfg.num_layers)]
    rng = np.random.default_rng(freq)
    queries = rng.normal(size=(1, 8, 32)).astype(np.float32)
    features = rng.normal(size=(2, 11, fx.QFORMER_ENCODER_WIDTH)).astype(np.float32)
    graphdef, abstract = km.abstract_model(lambda: vision.QFormer(cfg, **F32, rngs=nnx.Rngs(0)))
    keymap = convert.HF_QFORMER_KEYMAP + km.KeyMap([km.Rule("query_tokens", "query_tokens", km.SQUEEZE0)])
    source = DictSource(dict(_state_dict(ref_model), query_tokens=queries), "Blip2QFormerModel")
    qformer = km.materialize(graphdef, km.load_params(abstract, source, keymap))
    with torch.no_grad():
        ref = ref_model(query_embeds=torch.from_numpy(queries).expand(2, -1, -1),
                        encoder_hidden_states=torch.from_numpy(features)).last_hidden_state.numpy()
    out = _forward(qformer, jnp.asarray(features))
    chex.assert_shape(out, (2, 8, 32))
    assert _report(f"Q-Former freq {freq}", out, ref, t0) <= TOL


def test_from_pretrained_matches_blip2(blip2, hf_encoder, pixels):
    t0 = time.perf_counter()
    model, directory = blip2
    cfg = hf_encoder.config
    assert (cfg.vision.depth, cfg.qformer.num_query_tokens, cfg.proj_dim) == (3, 8, 16)
    ref = fx.blip2_image_embeddings(model, pixels)
    out = _forward(hf_encoder, jnp.asarray(pixels))
    chex.assert_shape(out, (3, 8, 16))
    assert _report("VisionEncoder.from_pretrained", out, ref, t0) <= TOL
    # the default frozen precision: bf16 weights and compute, fp32 ln_vision / softmax
    t0 = time.perf_counter()
    bf16 = vision.VisionEncoder.from_pretrained(directory)
    assert bf16.vit.blocks[0].attn.qkv.kernel[...].dtype == jnp.bfloat16
    out = _forward(bf16, jnp.asarray(pixels))
    chex.assert_type(out, jnp.bfloat16)
    assert _report("VisionEncoder.from_pretrained bf16", out, ref, t0) <= 0.05 * np.abs(ref).max()


def test_from_lavis_matches_blip2(blip2, hf_encoder, pixels, tmp_path):
    t0 = time.perf_counter()
    model, _ = blip2
    paths = fx.write_lavis_checkpoints(model, tmp_path)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    encoder = vision.VisionEncoder.from_lavis(paths["vit"], paths["qformer"], paths["proj"],
                                              config=hf_encoder.config, mesh=mesh, **F32)
    kernel = encoder.vit.blocks[0].attn.qkv.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    out = _forward(encoder, jnp.asarray(pixels))
    assert _report("VisionEncoder.from_lavis (sharded)", out, fx.blip2_image_embeddings(model, pixels), t0) <= TOL

    blip2_sd = torch.load(paths["qformer"], weights_only=True)
    blip2_sd["model"]["Qformer.bert.encoder.layer.1.attention.self.extra.weight"] = torch.zeros(2)
    bad = tmp_path / "blip2_extra.pth"
    torch.save(blip2_sd, bad)
    with pytest.raises(CheckpointError, match=r"unexpected key 'Qformer\.bert\.encoder\.layer\.1\.attention\.self"
                                              r"\.extra\.weight' in .*blip2_extra\.pth"):
        vision.VisionEncoder.from_lavis(paths["vit"], bad, paths["proj"], config=hf_encoder.config, **F32)
    vit_sd = torch.load(paths["vit"], weights_only=True)
    del vit_sd["blocks.1.attn.v_bias"]
    torch.save(vit_sd, tmp_path / "eva_missing.pth")
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.1\.attn\.v_bias' in .*eva_missing\.pth"):
        vision.VisionEncoder.from_lavis(tmp_path / "eva_missing.pth", paths["qformer"], paths["proj"],
                                        config=hf_encoder.config, **F32)


def test_configs():
    cfg = vision.VisionEncoderConfig()
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width, cfg.vision.depth, cfg.vision.heads,
            cfg.vision.mlp_dim, cfg.vision.layer_norm_eps, cfg.vision.ln_vision_eps) == (
        224, 14, 1408, 39, 16, 6144, 1e-6, 1e-5)
    assert (cfg.qformer.hidden_size, cfg.qformer.num_layers, cfg.qformer.heads, cfg.qformer.intermediate_size,
            cfg.qformer.cross_attention_freq, cfg.qformer.encoder_width, cfg.qformer.num_query_tokens,
            cfg.proj_dim) == (768, 12, 12, 3072, 2, 1408, 32, 4096)
    # transformers' defaults are the real BLIP-2 sizes (apart from ln_vision's eps, see VisionConfig)
    hf = vision.VisionEncoderConfig.from_hf({"text_config": {"hidden_size": 4096}})
    assert hf.qformer == cfg.qformer and hf.vision.depth == 39 and hf.vision.ln_vision_eps == 1e-6
    with pytest.raises(ValueError, match="vision_config.qkv_bias"):
        vision.VisionConfig.from_hf({"qkv_bias": False}, where="vision_config")
    with pytest.raises(ValueError, match="hidden_act"):
        vision.QFormerConfig.from_hf({"hidden_act": "mish"})
    with pytest.raises(ValueError, match="text_config.hidden_size"):
        vision.VisionEncoderConfig.from_hf({})
    # a Flan-T5 BLIP-2 (the family MiniGPT-4's Q-Former comes from) gives its width as d_model
    assert vision.VisionEncoderConfig.from_hf({"text_config": {"model_type": "t5", "d_model": 2048}}).proj_dim == 2048


def test_encode_images_cli(blip2, hf_encoder, tmp_path, capsys, monkeypatch):
    t0 = time.perf_counter()
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for name, (w, h) in {"a": (40, 30), "b": (28, 28), "c": (17, 50)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{name}.png")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "features"
    argv = ["--blip2-dir", str(blip2[1]), "--images", str(images), "--out", str(out), "--batch-size", "2",
            "--dtype", "float32", "--no-progress"]
    assert encode_images.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.npy", "b.npy", "c.npy", "encoding.json", "sources.json"]
    assert read_feature_sources(out) == {s: str((images / f"{s}.png").resolve()) for s in "abc"}
    size = hf_encoder.config.vision.image_size
    stems = ["a", "b", "c"]
    x = np.stack([input_image_transform(load_image(images / f"{s}.png"), size=size) for s in stems])
    direct = np.asarray(_forward(hf_encoder, jnp.asarray(x)))
    for i, stem in enumerate(stems):
        feature = np.load(out / f"{stem}.npy")
        chex.assert_shape(feature, (8, 16))
        assert feature.dtype == np.float32
        np.testing.assert_allclose(feature, direct[i], atol=1e-5, rtol=0)
    print(f"encode_images CLI: 3 images ({time.perf_counter() - t0:.1f}s)")

    (out / "b.npy").unlink()  # only the missing file is redone
    done = encode_images.encode_folder(encode_images.input_features(hf_encoder), images, out, 2, progress=False)
    assert [p.name for p in done.encoded] == ["b.png"] and not done.unreadable
    other = tmp_path / "other_split"  # a.png again, from another folder: same stem, other features
    other.mkdir()
    shutil.copy(images / "b.png", other / "a.png")
    with pytest.raises(ValueError, match=r"a\.npy holds the features of .*images/a\.png, not of .*other_split/a\.png"):
        encode_images.encode_folder(encode_images.input_features(hf_encoder), other, out, 2, progress=False)
    # an unreadable image is skipped and listed (training skips its samples), or stops a --strict run
    (images / "d.png").write_bytes(b"not a png")
    (images / "e.png").write_bytes(b"")
    shutil.copy(images / "a.png", images / "f.png")
    done = encode_images.encode_folder(encode_images.input_features(hf_encoder), images, out, 2, progress=False)
    assert [p.name for p in done.encoded] == ["f.png"] and sorted(p.name for p in done.unreadable) == ["d.png", "e.png"]
    np.testing.assert_array_equal(np.load(out / "f.npy"), np.load(out / "a.npy"))
    listed = json.loads((out / "unreadable.json").read_text())
    assert list(listed) == [str((images / n).resolve()) for n in ("d.png", "e.png")]
    assert "d.png" in listed[str((images / "d.png").resolve())]
    with pytest.raises(ValueError, match=r"d\.npy \(encode_images lists the images it could not read in .*unreadable"):
        pipeline._load_array(out / "d.npy", (8, 16))
    capsys.readouterr()
    assert encode_images.main([*argv, "--strict"]) == 1
    assert "d.png" in capsys.readouterr().err
    assert encode_images.main(argv) == 0
    assert "skipped 2 images that could not be read" in capsys.readouterr().out
    shutil.copy(images / "b.png", images / "d.png")  # mended: encoded by the next run, and no longer listed
    assert encode_images.main(argv) == 0
    assert list(json.loads((out / "unreadable.json").read_text())) == [str((images / "e.png").resolve())]
    (images / "e.png").unlink()  # gone from this folder: off the list; another folder's entry (unmounted) stays
    elsewhere = str(tmp_path / "unmounted" / "g.png")
    (out / "unreadable.json").write_text(json.dumps({**json.loads((out / "unreadable.json").read_text()),
                                                     elsewhere: "cannot read image"}))
    assert encode_images.main(argv) == 0
    assert list(json.loads((out / "unreadable.json").read_text())) == [elsewhere]
    # --size is the output moments' alone; a missing image folder makes no output folder
    with pytest.raises(SystemExit):
        encode_images.main([*argv, "--size", "64"])
    assert "--size is for output moments (--vae)" in capsys.readouterr().err
    assert encode_images.main([*argv[:2], "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "new"),
                               *argv[6:]]) == 1
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "new").exists()
    # Ctrl-C: one line that says the written files are kept and how to go on, no traceback
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(encode_images, "encode_folder", interrupt)
    assert encode_images.main(argv) == 130
    assert f"interrupted: run the same command again to go on (files already written to {out} are kept)" \
        in capsys.readouterr().err


def test_uint8_input_images_are_normalized_on_the_device(hf_encoder):
    """`embed_images` takes uint8 pixels [B, M, 3, S, S] (what generation sends): exactly the host's floats."""
    size = hf_encoder.config.vision.image_size
    rng = np.random.default_rng(5)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((40, 30), (17, 50))]
    pixels = np.stack([input_image_pixels(img, size=size) for img in imgs]).reshape(1, 2, 3, size, size)
    floats = np.stack([input_image_transform(img, size=size) for img in imgs]).reshape(1, 2, 3, size, size)
    run = nnx.jit(lambda encoder, x: embed_images(encoder, {"input_images": x}, jnp.float32))
    out, ref = run(hf_encoder, jnp.asarray(pixels)), run(hf_encoder, jnp.asarray(floats))
    chex.assert_shape(out, (1, 2, 8, 16))
    np.testing.assert_array_equal(out, ref)  # the same encoder inputs, bit for bit
