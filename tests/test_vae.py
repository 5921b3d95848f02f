"""The SD VAE against diffusers: encoder moments, decoder output, posterior semantics, conversion."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _fixtures_sd import TINY_SD2_VAE, tiny_sd_dir  # noqa: F401
from flax import nnx

from mg5jax.convert import keymap as km
from mg5jax.convert.diffusers import vae_keymap
from mg5jax.convert.sources import CheckpointError, open_weights, write_safetensors
from mg5jax.convert.keymap import abstract_rngs
from mg5jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

pytestmark = pytest.mark.xdist_group("sd")

# stabilityai/stable-diffusion-2-1-base vae/config.json
SD21_BASE_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=768,
    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215, force_upcast=True,
)  # fmt: skip


@pytest.fixture(scope="session")
def vae_pair(tiny_sd_dir):
    from diffusers import AutoencoderKL as TorchVAE

    ours = AutoencoderKL.from_pretrained(tiny_sd_dir / "vae", param_dtype=jnp.float32)
    return ours, TorchVAE.from_pretrained(str(tiny_sd_dir / "vae")).eval()


# a second layout: three levels (downsample 4), two resnets per encoder level (three per decoder level),
# 16 groups over 32 / 48 / 64 channels, three latent channels
ODD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=3, layers_per_block=2, block_out_channels=(32, 48, 64),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16,
    sample_size=24, scaling_factor=0.5,
)  # fmt: skip


@pytest.fixture(scope="session", params=["sd2", "odd"])
def parity_pair(request, vae_pair, tmp_path_factory):
    """(ours, diffusers', input size, latent size) for each tiny layout."""
    if request.param == "sd2":
        return (*vae_pair, 32, 4)
    from _fixtures_sd import build_tiny_vae

    directory = tmp_path_factory.mktemp("odd_vae")
    theirs = build_tiny_vae(ODD_VAE, 5)
    theirs.save_pretrained(str(directory), safe_serialization=True)
    return AutoencoderKL.from_pretrained(directory, param_dtype=jnp.float32), theirs, 24, 6


@nnx.jit
def _moments(vae, x):
    return vae.encode(x).moments


@nnx.jit
def _decode(vae, z):
    return vae.decode(z)


def test_encoder_moments_parity(parity_pair):
    ours, theirs, size, latent = parity_pair
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, size, size)).astype(np.float32)
    moments = _moments(ours, x)
    c = theirs.config.latent_channels
    chex.assert_shape(moments, (2, 2 * c, latent, latent))
    chex.assert_type(moments, jnp.float32)
    with torch.no_grad():
        ref = theirs.encode(torch.from_numpy(x)).latent_dist.parameters.numpy()
    err = float(np.abs(np.asarray(moments) - ref).max())
    print(f"VAE encoder max|Δmoments| = {err:.2e} (max {np.abs(ref).max():.2f})")
    assert err <= 1e-4


def test_decoder_parity(parity_pair):
    ours, theirs, size, latent = parity_pair
    z = np.random.default_rng(1).normal(size=(2, theirs.config.latent_channels, latent, latent)).astype(np.float32)
    image = _decode(ours, z)
    chex.assert_shape(image, (2, 3, size, size))
    with torch.no_grad():
        ref = theirs.decode(torch.from_numpy(z)).sample.numpy()
    err = float(np.abs(np.asarray(image) - ref).max())
    print(f"VAE decoder max|Δx| = {err:.2e} (max {np.abs(ref).max():.2f})")
    assert err <= 1e-4


def test_diagonal_gaussian_semantics():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(2)
    moments = rng.normal(size=(2, 8, 4, 4)).astype(np.float32)
    moments[0, 4, 0, :2] = [35.0, -45.0]  # logvar outside [-30, 20] is clamped
    post = DiagonalGaussian.from_moments(moments)
    ref = DiagonalGaussianDistribution(torch.from_numpy(moments))
    for name in ("mean", "logvar", "std", "var"):
        np.testing.assert_allclose(getattr(post, name), getattr(ref, name).numpy(), rtol=1e-6, err_msg=name)
    assert float(post.logvar[0, 0, 0, 0]) == 20.0 and float(post.logvar[0, 0, 0, 1]) == -30.0
    np.testing.assert_array_equal(post.mode(), moments[:, :4])
    key = jax.random.key(0)
    sample = post.sample(key)
    chex.assert_shape(sample, (2, 4, 4, 4))
    np.testing.assert_allclose(sample, post.mean + post.std * jax.random.normal(key, (2, 4, 4, 4)), rtol=1e-6)
    np.testing.assert_array_equal(sample, post.sample(key))
    assert not np.array_equal(sample, post.sample(jax.random.key(1)))
    assert jax.tree.leaves(jax.jit(lambda p: p)(post))[0].shape == moments.shape  # a pytree, jit-able
    with pytest.raises(ValueError, match=r"\[B, 2C, h, w\]"):
        DiagonalGaussian.from_moments(moments[:, :7])


def test_config_and_save_pretrained_round_trip(tiny_sd_dir, vae_pair, tmp_path):
    ours, _ = vae_pair
    cfg = ours.config
    assert cfg.scaling_factor == TINY_SD2_VAE["scaling_factor"] and cfg.downsample_factor == 8
    ours.save_pretrained(tmp_path)
    original, saved = open_weights(tiny_sd_dir / "vae"), open_weights(tmp_path)
    assert sorted(saved) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(saved[key], original[key], err_msg=key)
    assert VAEConfig.from_json(tmp_path / "config.json") == cfg
    assert VAEConfig.from_hf(SD21_BASE_VAE) == VAEConfig(sample_size=768)


def test_loads_pre_0_15_attention_names(tiny_sd_dir, vae_pair, tmp_path):
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, value in open_weights(tiny_sd_dir / "vae").items():
        for new, old in renames.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        tensors[key] = np.array(value)
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in tensors
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", tensors)
    (tmp_path / "config.json").write_text((tiny_sd_dir / "vae" / "config.json").read_text())
    old = AutoencoderKL.from_pretrained(tmp_path, param_dtype=jnp.float32)
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), nnx.state(old),
                        nnx.state(vae_pair[0]))
    assert all(jax.tree.leaves(same))


@pytest.mark.parametrize("variant", [{}, {"use_quant_conv": False, "use_post_quant_conv": False,
                                          "mid_block_add_attention": False}], ids=["sd2.1-base", "no-quant-no-attn"])
def test_real_config_maps_every_diffusers_tensor(variant):
    from diffusers import AutoencoderKL as TorchVAE

    hf = dict(SD21_BASE_VAE, **variant)
    cfg = VAEConfig.from_hf(hf)
    _, abstract = km.abstract_model(lambda: AutoencoderKL(cfg, rngs=abstract_rngs()))
    ours = km.flat_params(abstract)
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in TorchVAE(**hf).state_dict().items()}
    bound = vae_keymap().bind(ours)
    assert sorted(b.theirs for b in bound) == sorted(theirs)
    for b in bound:
        (arr,) = b.to_ours(np.broadcast_to(np.float32(0), theirs[b.theirs]))
        assert arr.shape == ours[b.ours[0]].shape, b.theirs


def test_conversion_errors_name_the_key_and_file(tiny_sd_dir, tmp_path):
    tensors = {k: np.array(v) for k, v in open_weights(tiny_sd_dir / "vae").items()}
    key = "decoder.up_blocks.1.resnets.1.conv2.weight"
    tensors[key] = tensors[key][:, :, :1]
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", tensors)
    config = json.loads((tiny_sd_dir / "vae" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"key '{key}' in {tmp_path}/diffusion_pytorch_model.safetensors"):
        AutoencoderKL.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, shift_factor=0.1159)))
    with pytest.raises(ValueError, match=rf"{tmp_path}/config.json: unsupported VAE config shift_factor=0.1159"):
        AutoencoderKL.from_pretrained(tmp_path)


@pytest.mark.parametrize("key,value", [
    ("down_block_types", ["AttnDownEncoderBlock2D"] * 4), ("up_block_types", ["UpDecoderBlock2D"] * 3),
    ("latents_mean", [0.0] * 4), ("latents_std", [1.0] * 4), ("norm_type", "spatial"),
])  # fmt: skip
def test_unsupported_config_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        VAEConfig.from_hf(dict(SD21_BASE_VAE, **{key: value}), where="vae/config.json")


def test_posterior_samples_draw_fp32_noise_from_bf16_moments():
    """A bf16 normal is coarse (erfinv of a bf16 uniform: ~128 values, |ε| < 2.9); the posterior's ε is
    drawn in fp32 whatever the moments' dtype, so its tails are those of N(0, 1)."""
    moments = jnp.zeros((4, 8, 128, 128), jnp.bfloat16)  # mean 0, logvar 0
    sample = DiagonalGaussian.from_moments(moments).sample(jax.random.key(0))
    chex.assert_type(sample, jnp.float32)
    values = np.asarray(sample).ravel()  # 262144 draws: the largest |ε| is beyond 3.5 with near certainty
    assert np.abs(values).max() > 3.5 and len(np.unique(values)) > 100_000


def test_encode_images_writes_vae_moments(tiny_sd_dir, vae_pair, tmp_path, capsys):
    """`python -m mg5jax.encode_images --vae` stores what diffusers' encoder gives for the online target
    transform, in the layout `data.output_moments_dir` reads ([2C, S/8, S/8] per `<stem>.npy`)."""
    from PIL import Image

    from mg5jax import encode_images
    from mg5jax.data.images import load_image, output_image_transform
    from mg5jax.data.pipeline import read_feature_sources

    images = tmp_path / "targets"
    images.mkdir()
    rng = np.random.default_rng(5)
    for name, (w, h) in {"wide": (60, 30), "tall": (20, 45), "square": (32, 32)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{name}.png")
    out = tmp_path / "moments"
    argv = ["--vae", str(tiny_sd_dir), "--size", "32", "--images", str(images), "--out", str(out),
            "--batch-size", "2", "--dtype", "float32", "--no-progress"]
    assert encode_images.main(argv) == 0
    assert "encoded 3 images (VAE moments)" in capsys.readouterr().out
    assert read_feature_sources(out) == {s: str((images / f"{s}.png").resolve()) for s in ("wide", "tall", "square")}
    _, theirs = vae_pair
    for stem in ("wide", "tall", "square"):
        x = output_image_transform(load_image(images / f"{stem}.png"), size=32)
        with torch.no_grad():
            ref = theirs.encode(torch.from_numpy(x[None])).latent_dist.parameters[0].numpy()
        stored = np.load(out / f"{stem}.npy")
        chex.assert_shape(stored, (8, 4, 4))
        assert stored.dtype == np.float32
        np.testing.assert_allclose(stored, ref, atol=1e-4, rtol=0)

    # the vae/ folder itself works too; another size into the same folder, a size the VAE cannot take and a
    # folder without a VAE are one-line errors
    assert encode_images.main([*argv[:1], str(tiny_sd_dir / "vae"), *argv[2:]]) == 0
    assert encode_images.main([*argv[:3], "16", *argv[4:]]) == 1
    err = capsys.readouterr().err
    assert "holds VAE moments at 32 px, shape (8, 4, 4), from" in err and "this run makes VAE moments at 16 px" in err
    assert encode_images.main([*argv[:-2], "bfloat16", "--no-progress"]) == 1  # same shape, another encoding
    assert f"from {(tiny_sd_dir / 'vae').resolve()} (float32); this run makes" in capsys.readouterr().err
    assert encode_images.main([*argv[:3], "30", *argv[4:]]) == 1
    assert "--size 30" in capsys.readouterr().err
    assert encode_images.main([*argv[:1], str(tmp_path), *argv[2:]]) == 1
    assert f"--vae {tmp_path}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        encode_images.main([*argv, "--blip2-dir", str(tmp_path)])
