"""Weight-only int8 LLM layers: exact dequantized products, bounded error against the fp32 reference,
LoRA folded in, logical sharding kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _fixtures_llama import llama_gqa  # noqa: F401
from flax import nnx

from mg5jax import parallel
from mg5jax.models import layers, lora
from mg5jax.models.llama import LlamaForCausalLM
from mg5jax.models.quantize import Int8Linear, quantize_int8

pytestmark = pytest.mark.xdist_group("llama")


@nnx.jit
def logits(model, input_ids):
    return model(input_ids).logits


def test_int8_linear_is_the_dequantized_product():
    base = layers.linear(96, 40, ("embed", "mlp"), rngs=nnx.Rngs(0))
    base.bias.set_value(jnp.linspace(-1, 1, 40))
    kernel = np.array(base.kernel[...])
    kernel[:, 3] = 0.0  # an all-zero column
    base.kernel.set_value(jnp.asarray(kernel))
    q = Int8Linear(base)
    assert q.kernel.dtype == jnp.int8 and q.scale.shape == (40,)
    assert q.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert q.scale.get_metadata()["out_sharding"] == ("mlp",)
    w = np.asarray(q.dequantized())
    step = np.abs(kernel).max(0) / 127
    assert np.all(np.abs(w - kernel) <= step / 2 + 1e-7) and not w[:, 3].any()
    x = np.random.default_rng(0).normal(size=(5, 96)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(q(jnp.asarray(x))), x @ w + np.asarray(base.bias[...]), atol=1e-5)


def test_quantized_llama_stays_close_to_torch(llama_gqa):
    model = LlamaForCausalLM.from_pretrained(llama_gqa.path, param_dtype=jnp.float32)
    lora.apply_lora(model, rngs=nnx.Rngs(params=0, dropout=1))
    for _, m in nnx.iter_modules(model):  # non-zero adapters, so folding them in is visible
        if isinstance(m, lora.LoraLinear):
            m.lora_b.set_value(jax.random.normal(jax.random.key(1), m.lora_b.shape) * 0.2)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, llama_gqa.model.config.vocab_size, (2, 11)))
    want = np.asarray(logits(model, ids))  # the fp32 model with live adapters

    paths = quantize_int8(model)
    n = llama_gqa.model.config.num_hidden_layers
    assert len(paths) == 7 * n and "model.layers.0.self_attn.q_proj" in paths
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, Int8Linear) and not any(
        isinstance(m, lora.LoraLinear) for _, m in nnx.iter_modules(model))
    assert model.lm_head.kernel.dtype == jnp.float32  # embeddings and lm_head keep their dtype
    got = np.asarray(logits(model, ids))
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"int8 logits: max-abs error {np.abs(got - want).max():.3g} = {err:.2%} of max |logit|")
    assert err < 0.05  # per-column int8 on a 64-wide random model; 7B models lose far less
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9

    with torch.no_grad():  # and without adapters it is close to the transformers reference
        plain = LlamaForCausalLM.from_pretrained(llama_gqa.path, param_dtype=jnp.float32)
        quantize_int8(plain)
        ref = llama_gqa.torch_model(torch.tensor(np.asarray(ids))).logits.numpy()
        assert np.abs(np.asarray(logits(plain, ids)) - ref).max() / np.abs(ref).max() < 0.05


def test_quantized_llama_shards_by_its_rules(llama_gqa):
    model = LlamaForCausalLM.from_pretrained(llama_gqa.path, param_dtype=jnp.float32)
    quantize_int8(model)
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    parallel.shard_model(model, mesh)
    mlp = model.model.layers[1].mlp
    assert mlp.up_proj.kernel.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert mlp.down_proj.kernel.get_value().sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert mlp.up_proj.scale.get_value().sharding.spec == jax.sharding.PartitionSpec("tensor")
    with pytest.raises(ValueError, match="no linear module path matches"):
        quantize_int8(model, targets=r"nothing_here$")


def test_quantized_vit_stays_close():
    from mg5jax.models.quantize import VIT_TARGETS
    from mg5jax.models.vision import EvaViT, VisionConfig

    vit = EvaViT(VisionConfig(image_size=28, patch_size=14, width=48, depth=3, heads=4, mlp_dim=96), rngs=nnx.Rngs(0))
    pixels = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 28, 28)), jnp.float32)
    want = np.asarray(vit(pixels))
    paths = quantize_int8(vit, VIT_TARGETS)
    assert sorted(paths) == sorted(f"blocks.{i}.{p}" for i in range(3) for p in ("attn.qkv", "attn.proj", "fc1", "fc2"))
    got = np.asarray(vit(pixels))
    assert np.abs(got - want).max() / np.abs(want).max() < 0.05
