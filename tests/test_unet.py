"""The SD U-Net against diffusers: ε parity (SD 2.1- and SD 1.x-shaped), remat, mesh, conversion."""

import dataclasses
import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _fixtures_sd import TINY_SD1_UNET, build_tiny_unet, tiny_sd1_unet_dir, tiny_sd_dir  # noqa: F401
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mg5jax import parallel
from mg5jax.convert import keymap as km
from mg5jax.convert.diffusers import unet_keymap
from mg5jax.convert.sources import CheckpointError, SafetensorsSource, open_weights, write_safetensors
from mg5jax.models import layers
from mg5jax.models.unet import UNet2DConditionModel, UNetConfig
from mg5jax.convert.keymap import abstract_rngs

pytestmark = pytest.mark.xdist_group("sd")

# the smallest U-Net with every block kind (cross-attn down, plain down, mid, plain up, cross-attn up)
TINY_REMAT_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=[2, 4], use_linear_projection=True, cross_attention_dim=16, norm_num_groups=32,
)  # fmt: skip

# the real diffusers configs (stabilityai/stable-diffusion-2-1-base, runwayml/stable-diffusion-v1-5)
SD21_BASE_UNET = dict(
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, num_class_embeds=None,
    only_cross_attention=False, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    use_linear_projection=True, upcast_attention=False,
)  # fmt: skip
SD15_UNET = dict(SD21_BASE_UNET, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False)

B = 2


def _torch_eps(unet, x, t, ctx):
    with torch.no_grad():
        t = torch.from_numpy(np.asarray(t)) if np.ndim(t) else int(t)
        return unet(torch.from_numpy(x), t, torch.from_numpy(ctx)).sample.numpy()


@nnx.jit
def _eps(model, x, t, ctx):
    return model(x, t, ctx)


def _inputs(cross_dim, seed, length=7):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, 4, 8, 8)).astype(np.float32),
            rng.normal(size=(B, length, cross_dim)).astype(np.float32))  # fmt: skip


@pytest.fixture(scope="session")
def sd2_unet(tiny_sd_dir):
    return UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet", param_dtype=jnp.float32)


@pytest.fixture(scope="session")
def remat_unet_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_remat_unet")
    build_tiny_unet(TINY_REMAT_UNET, 4).save_pretrained(str(d), safe_serialization=True)
    return d


@pytest.fixture(scope="session")
def remat_reference(remat_unet_dir):
    """Output and d(sum(out * cot))/d(context) of the tiny all-block-kinds U-Net without remat."""
    model = UNet2DConditionModel.from_pretrained(remat_unet_dir, param_dtype=jnp.float32)
    x, ctx = _inputs(16, seed=5)
    cot = np.random.default_rng(6).normal(size=x.shape).astype(np.float32)
    t = np.array([3, 700])
    out, grad = _out_and_grad(model, x, t, ctx, cot)
    return dict(x=x, t=t, ctx=ctx, cot=cot, out=np.asarray(out), grad=np.asarray(grad))


@nnx.jit
def _out_and_grad(model, x, t, ctx, cot):
    out, vjp = jax.vjp(lambda c: model(x, t, c), ctx)
    return out, vjp(cot)[0]


def test_sd21_shaped_parity_batched_timesteps(tiny_sd_dir, sd2_unet):
    from diffusers import UNet2DConditionModel as TorchUNet

    cfg = sd2_unet.config
    assert cfg.use_linear_projection and cfg.num_attention_heads == (2, 4, 4, 4)
    assert cfg.cross_attention_dim[0] not in cfg.block_out_channels
    x, ctx = _inputs(cfg.cross_attention_dim[0], seed=0)
    t = np.array([10, 987])
    out = _eps(sd2_unet, x, t, ctx)
    chex.assert_shape(out, x.shape)
    chex.assert_type(out, jnp.float32)
    ref = _torch_eps(TorchUNet.from_pretrained(str(tiny_sd_dir / "unet")).eval(), x, t, ctx)
    err = float(np.abs(np.asarray(out) - ref).max())
    print(f"SD2.1-shaped U-Net max|Δε| = {err:.2e} (|ε| max {np.abs(ref).max():.2f})")
    assert err <= 1e-4


def test_sd1_shaped_parity_scalar_timestep(tiny_sd1_unet_dir):
    from diffusers import UNet2DConditionModel as TorchUNet

    model = UNet2DConditionModel.from_pretrained(tiny_sd1_unet_dir, param_dtype=jnp.float32)
    cfg = model.config
    assert not cfg.use_linear_projection and cfg.num_attention_heads == (2, 2, 2)
    assert cfg.transformer_layers_per_block == (1, 1, 2) and cfg.upcast_attention
    assert len(model.mid_block.attentions[0].transformer_blocks) == 2
    x, ctx = _inputs(TINY_SD1_UNET["cross_attention_dim"], seed=1)
    out = _eps(model, x, 421, ctx)
    chex.assert_shape(out, x.shape)
    ref = _torch_eps(TorchUNet.from_pretrained(str(tiny_sd1_unet_dir)).eval(), x, 421, ctx)
    err = float(np.abs(np.asarray(out) - ref).max())
    print(f"SD1.x-shaped U-Net max|Δε| = {err:.2e} (|ε| max {np.abs(ref).max():.2f})")
    assert err <= 1e-4


def test_remat_same_output_and_gradient(remat_unet_dir, remat_reference):
    r = remat_reference
    model = UNet2DConditionModel.from_pretrained(remat_unet_dir, param_dtype=jnp.float32, remat=True)
    assert model.config.remat
    jaxpr = str(jax.make_jaxpr(lambda c: model(r["x"], r["t"], c))(r["ctx"]))
    assert jaxpr.count("checkpoint") + jaxpr.count("remat") >= 5  # 2 down + mid + 2 up blocks
    out, grad = _out_and_grad(model, r["x"], r["t"], r["ctx"], r["cot"])
    chex.assert_shape(grad, r["ctx"].shape)
    errs = float(np.abs(np.asarray(out) - r["out"]).max()), float(np.abs(np.asarray(grad) - r["grad"]).max())
    print(f"remat vs none: max|Δout| = {errs[0]:.2e}, max|Δgrad| = {errs[1]:.2e}")
    assert np.abs(r["grad"]).max() > 1e-3
    assert max(errs) <= 1e-5


def test_mesh_data2_fsdp4_matches_one_device(remat_unet_dir, remat_reference):
    r = remat_reference
    mesh = parallel.make_mesh(data=2, fsdp=4)
    model = UNet2DConditionModel.from_pretrained(remat_unet_dir, param_dtype=jnp.float32, mesh=mesh)
    kernel = model.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.kernel[...]
    assert kernel.sharding.spec == PartitionSpec("fsdp", None)  # (embed, heads) on a tensor=1 mesh
    assert model.conv_in.kernel[...].sharding.spec == PartitionSpec(None, None, "fsdp", None)
    x = jax.device_put(r["x"], NamedSharding(mesh, PartitionSpec("data")))
    out = _eps(model, x, r["t"], r["ctx"])
    err = float(np.abs(np.asarray(out) - r["out"]).max())
    print(f"mesh (data 2 x fsdp 4) vs one device: max|Δε| = {err:.2e}")
    assert err <= 1e-5


def test_fused_attention_matches_reference(sd2_unet):
    reference = sd2_unet.down_blocks[1].attentions[0]
    fused = nnx.clone(reference)
    for block in fused.transformer_blocks:
        block.attn1.impl = block.attn2.impl = "fused"
    rng = np.random.default_rng(7)
    h = rng.normal(size=(B, 4, 4, 96)).astype(np.float32)
    ctx = rng.normal(size=(B, 7, 32)).astype(np.float32)
    run = nnx.jit(lambda m, h, c: m(h, c))
    err = float(np.abs(np.asarray(run(fused, h, ctx)) - np.asarray(run(reference, h, ctx))).max())
    print(f"fused vs reference attention (one Transformer2DModel): max|Δ| = {err:.2e}")
    assert err <= 1e-5


def test_loads_torch_bin(remat_unet_dir, tmp_path):
    from diffusers import UNet2DConditionModel as TorchUNet

    TorchUNet.from_pretrained(str(remat_unet_dir)).save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    from_bin = UNet2DConditionModel.from_pretrained(tmp_path, param_dtype=jnp.float32)
    from_st = UNet2DConditionModel.from_pretrained(remat_unet_dir, param_dtype=jnp.float32)
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), nnx.state(from_bin),
                        nnx.state(from_st))
    assert all(jax.tree.leaves(same))


def test_save_pretrained_round_trip(tiny_sd_dir, sd2_unet, tmp_path):
    from diffusers import UNet2DConditionModel as TorchUNet

    sd2_unet.save_pretrained(tmp_path)
    original, saved = open_weights(tiny_sd_dir / "unet"), open_weights(tmp_path)
    assert sorted(saved) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(saved[key], original[key], err_msg=key)
    assert UNetConfig.from_json(tmp_path / "config.json") == sd2_unet.config
    TorchUNet.from_config(json.loads((tmp_path / "config.json").read_text()))  # diffusers accepts the config


@pytest.mark.parametrize("hf", [SD21_BASE_UNET, SD15_UNET], ids=["sd2.1-base", "sd1.5"])
def test_real_configs_map_every_diffusers_tensor(hf):
    """Full-size SD U-Nets, abstractly: diffusers' state dict (meta device) and ours correspond 1:1
    with matching shapes; diffusers' attention_head_dim is the head count (head size 64 here)."""
    from diffusers import UNet2DConditionModel as TorchUNet

    cfg = UNetConfig.from_hf(hf)
    _, abstract = km.abstract_model(lambda: UNet2DConditionModel(cfg, rngs=abstract_rngs()))
    ours = km.flat_params(abstract)
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in TorchUNet(**hf).state_dict().items()}
    bound = unet_keymap(cfg.use_linear_projection).bind(ours)
    assert sorted(b.theirs for b in bound) == sorted(theirs)
    for b in bound:
        for path, arr in zip(b.ours, b.to_ours(np.broadcast_to(np.float32(0), theirs[b.theirs]))):
            assert arr.shape == ours[path].shape, (b.theirs, path)
    assert sum(int(np.prod(v.shape)) for v in ours.values()) == sum(int(np.prod(s)) for s in theirs.values())


def test_attention_head_dim_means_heads_per_block():
    cfg = UNetConfig.from_hf(SD21_BASE_UNET)
    model = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=abstract_rngs()))
    attn = lambda block: block.attentions[0].transformer_blocks[0].attn1  # noqa: E731
    assert [(attn(b).heads, attn(b).head_dim) for b in model.down_blocks[:3]] == [(5, 64), (10, 64), (20, 64)]
    assert (attn(model.mid_block).heads, attn(model.mid_block).head_dim) == (20, 64)
    assert [(attn(b).heads, attn(b).head_dim) for b in model.up_blocks[1:]] == [(20, 64), (10, 64), (5, 64)]
    sd15 = UNetConfig.from_hf(SD15_UNET)
    assert sd15.num_attention_heads == (8,) * 4 and sd15.cross_attention_dim == (768,) * 4


def _corrupt(src_dir, dst_dir, edit):
    tensors = {k: np.array(v) for k, v in open_weights(src_dir).items()}
    edit(tensors)
    dst_dir.mkdir()
    shutil.copy(src_dir / "config.json", dst_dir / "config.json")
    write_safetensors(dst_dir / "diffusion_pytorch_model.safetensors", tensors)
    return dst_dir


def test_conversion_errors_name_the_key_and_file(tiny_sd_dir, tmp_path):
    src = tiny_sd_dir / "unet"
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    d = _corrupt(src, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing key '{key}' in .*missing/diffusion_pytorch_model"):
        UNet2DConditionModel.from_pretrained(d)
    cfg = UNetConfig.from_json(src / "config.json")
    _, abstract = km.abstract_model(lambda: UNet2DConditionModel(cfg, rngs=abstract_rngs()))
    keymap = unet_keymap(cfg.use_linear_projection)
    d = _corrupt(src, tmp_path / "extra", lambda t: t.update({"mid_block.resnets.2.conv1.weight": t[key]}))
    with pytest.raises(CheckpointError, match=r"unexpected key 'mid_block.resnets.2.conv1.weight' in .*extra/"):
        km.load_params(abstract, open_weights(d), keymap)
    d = _corrupt(src, tmp_path / "shape", lambda t: t.update({key: t[key][:, :-1]}))
    with pytest.raises(CheckpointError, match=rf"key '{key}' in .*shape/diffusion_pytorch_model.safetensors: "
                                              r"expected shape \(32, 96\)"):  # fmt: skip
        km.load_params(abstract, SafetensorsSource([d / "diffusion_pytorch_model.safetensors"]), keymap)


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text_time"), ("resnet_time_scale_shift", "scale_shift"),
    ("time_embedding_type", "fourier"), ("dual_cross_attention", True), ("only_cross_attention", [True] * 4),
    ("mid_block_type", None), ("conv_in_kernel", 1), ("conv_out_kernel", 5), ("center_input_sample", True),
    ("num_attention_heads", 8), ("encoder_hid_dim_type", "text_proj"), ("dropout", 0.1), ("attention_type", "gated"),
    ("mid_block_only_cross_attention", True), ("down_block_types", ["AttnDownBlock2D"] * 4),
    ("transformer_layers_per_block", [[1, 2], [1, 2], [1, 2], [1, 2]]), ("norm_num_groups", None),
    ("attention_head_dim", [5, 10]), ("some_future_key", 1),
])  # fmt: skip
def test_unsupported_config_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_hf(dict(SD21_BASE_UNET, **{key: value}), where="unet/config.json")


def test_config_defaults_are_sd21_base_and_round_trip():
    cfg = UNetConfig.from_hf(SD21_BASE_UNET)
    assert cfg == UNetConfig()
    assert UNetConfig.from_hf(cfg.to_hf()) == cfg
    sd1 = UNetConfig.from_hf(TINY_SD1_UNET)
    assert UNetConfig.from_hf(sd1.to_hf()) == sd1
    assert dataclasses.replace(cfg, remat=True).remat
    with pytest.raises(ValueError, match="attention_impl"):
        dataclasses.replace(cfg, attention_impl="flash")


def test_attention_without_upcast_keeps_fp32_scores():
    """SD 2.1 runs with upcast_attention=False; its reference (torch SDPA) still forms the scores in fp32.
    Without upcast, bf16 q/k accumulate into fp32 scores: the result equals the upcast one (scale 1/8 is
    exact in bf16), where bf16-rounded scores would be off by about 1e-2."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 256, 2, 64)) * 3, jnp.bfloat16) for _ in range(3))
    plain = layers.attention(q, k, v, upcast=False).astype(jnp.float32)
    upcast = layers.attention(q, k, v, upcast=True).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(upcast), atol=1e-2 / 4)
