"""LoRA: parity with a peft-wrapped transformers model, peft key import/export, merge, training."""

import copy

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from _fixtures_llama import llama_gqa, llama_odd  # noqa: F401
from flax import nnx

from mg5jax.convert import llama as convert_llama
from mg5jax.convert.sources import CheckpointError, DictSource
from mg5jax.models import lora
from mg5jax.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.xdist_group("llama")


@nnx.jit
def logits(model, input_ids, attention_mask):
    return model(input_ids, attention_mask=attention_mask).logits


def lora_model(path):
    model = LlamaForCausalLM.from_pretrained(path, param_dtype=jnp.float32)
    wrapped = lora.apply_lora(model, rngs=nnx.Rngs(params=0, dropout=1))
    return model, wrapped


def peft_wrapped(torch_model, *, r: int, alpha: float, dropout: float, targets: list[str], seed: int):
    """A copy of a transformers LLaMA wrapped by peft, with random non-zero LoRA A and B (eval mode)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(torch_model), config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return peft_model


@pytest.fixture(scope="module")
def peft_reference(llama_gqa):
    """The GQA reference wrapped by peft (MiniGPT-5's stage-2 config) with random non-zero A and B."""
    return peft_wrapped(llama_gqa.torch_model, r=8, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"], seed=0)


def test_apply_lora_structure_and_init(llama_gqa):
    model, wrapped = lora_model(llama_gqa.path)
    layers = llama_gqa.model.config.num_hidden_layers
    assert wrapped == [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "v_proj")]
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, lora.LoraLinear) and isinstance(attn.k_proj, nnx.Linear)
    assert attn.q_proj.lora_a.get_metadata()["out_sharding"] == ("embed", "lora")
    assert attn.q_proj.lora_b.get_metadata()["out_sharding"] == ("lora", "heads")
    assert attn.v_proj.lora_b.get_metadata()["out_sharding"] == ("lora", "kv_heads")
    a = np.asarray(attn.q_proj.lora_a[...])
    assert a.shape == (64, 8) and np.abs(a).max() <= 64**-0.5 and a.std() > 0.3 * 64**-0.5
    assert not np.asarray(attn.q_proj.lora_b[...]).any()
    lora_state = nnx.state(model, lora.LoraParam)
    assert len(nnx.to_flat_state(lora_state)) == 2 * 2 * layers
    with pytest.raises(ValueError, match="no nnx.Linear module path matches targets='bogus'"):
        lora.apply_lora(model, targets="bogus", rngs=nnx.Rngs(0))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_parity_import_export_and_merge(llama_gqa, peft_reference, tmp_path):
    model, _ = lora_model(llama_gqa.path)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, llama_gqa.model.config.vocab_size, size=(2, 8))
    mask = np.ones((2, 8), np.int32)
    mask[1, 5:] = 0
    args = (jnp.asarray(ids), jnp.asarray(mask))
    real = mask.astype(bool)
    # B = 0 at init: the wrapped model equals the base model
    base_err = np.abs(np.asarray(logits(model, *args)) - np.asarray(logits(llama_gqa.model, *args)))[real].max()
    assert base_err <= 1e-6

    peft_sd = {k: v.numpy() for k, v in peft_reference.state_dict().items()}
    convert_llama.load_peft(model, DictSource(peft_sd, "peft state dict"))
    with torch.no_grad():
        want = peft_reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(logits(model, *args))
    err = np.abs(ours - want)[real].max()
    print(f"peft LoRA logits max-abs error: {err:.2e}")
    assert err <= 1e-4

    exported = dict(convert_llama.export_peft(model))
    assert exported.keys() == peft_sd.keys()
    for k, v in peft_sd.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in exported
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight" in exported

    # a saved adapter file (no adapter segment in its keys) loads into the adapters only
    from peft import get_peft_model_state_dict

    adapter_sd = {k: v.numpy() for k, v in get_peft_model_state_dict(peft_reference).items()}
    fresh, _ = lora_model(llama_gqa.path)
    convert_llama.load_peft(fresh, DictSource(adapter_sd, "adapter_model.safetensors"), adapter_name=None,
                            lora_only=True)
    np.testing.assert_array_equal(np.asarray(logits(fresh, *args)), ours)

    saved = llama_gqa.model.save_pretrained(tmp_path / "saved")
    config = (tmp_path / "saved" / "config.json").read_text()
    with pytest.raises(CheckpointError, match=r"no conversion rule for our parameter .*lora_a"):  # no HF name
        model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "config.json").read_text() == config and saved == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]

    merged = lora.merge(model)
    assert len(merged) == 4 and not lora.lora_paths(model)
    assert type(model.model.layers[1].self_attn.v_proj) is nnx.Linear
    assert not nnx.to_flat_state(nnx.state(model, lora.LoraParam))
    merge_err = np.abs(np.asarray(logits(model, *args)) - ours)[real].max()
    print(f"merged vs unmerged max-abs error: {merge_err:.2e}")
    assert merge_err <= 1e-5


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_parity_on_other_targets_rank_and_a_tied_model(llama_odd):
    """LoRA on k / o / MLP projections at r=3, alpha=7 of the odd-sized tied LLaMA, against peft."""
    peft_model = peft_wrapped(llama_odd.torch_model, r=3, alpha=7, dropout=0.0,
                              targets=["k_proj", "o_proj", "up_proj", "down_proj"], seed=1)
    model = LlamaForCausalLM.from_pretrained(llama_odd.path, param_dtype=jnp.float32)
    wrapped = lora.apply_lora(model, targets=r"\.(k_proj|o_proj|up_proj|down_proj)$", rank=3, alpha=7.0,
                              dropout=0.0, rngs=nnx.Rngs(0))
    assert len(wrapped) == 4 * llama_odd.model.config.num_hidden_layers
    convert_llama.load_peft(model, DictSource({k: v.numpy() for k, v in peft_model.state_dict().items()}, "peft"))
    ids = np.random.default_rng(2).integers(3, llama_odd.model.config.vocab_size, size=(2, 7))
    with torch.no_grad():
        want = peft_model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(logits(model, jnp.asarray(ids), jnp.ones((2, 7), jnp.int32)))
    err = np.abs(ours - want).max()
    print(f"peft LoRA (k/o/up/down, r=3, tied) logits max-abs error: {err:.2e}")
    assert err <= 1e-4 and np.abs(want - np.asarray(logits(llama_odd.model, jnp.asarray(ids),
                                                           jnp.ones((2, 7), jnp.int32)))).max() > 1e-2


def test_training_lora_params_only_leaves_base_untouched(llama_gqa):
    model, _ = lora_model(llama_gqa.path)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.01), wrt=lora.LoraParam)
    ids = jnp.asarray(np.random.default_rng(1).integers(3, llama_gqa.model.config.vocab_size, size=(2, 9)))

    def loss_fn(m):
        out = m(ids[:, :-1]).logits
        return optax.softmax_cross_entropy_with_integer_labels(out, ids[:, 1:]).mean()

    @nnx.jit
    def train_step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lora.LoraParam))(m)
        opt.update(m, grads)
        return loss

    def params(filt):
        return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, filt))}

    base_before, lora_before = params(nnx.All(nnx.Param, nnx.Not(lora.LoraParam))), params(lora.LoraParam)
    model.train()  # LoRA dropout on
    for _ in range(2):
        train_step(model, optimizer)
    model.eval()
    base_after, lora_after = params(nnx.All(nnx.Param, nnx.Not(lora.LoraParam))), params(lora.LoraParam)
    for k in base_before:
        np.testing.assert_array_equal(base_after[k], base_before[k], err_msg=str(k))
    assert all(np.abs(lora_after[k] - lora_before[k]).max() > 0 for k in lora_before)

    # dropout is active only in training mode
    x = jnp.ones((3, 64))
    q = model.model.layers[0].self_attn.q_proj
    np.testing.assert_array_equal(np.asarray(q(x)), np.asarray(q(x)))
    model.train()
    assert np.abs(np.asarray(q(x)) - np.asarray(q(x))).max() > 0
    model.eval()


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_modules_to_save_stage2_layout(llama_gqa):
    """MiniGPT-5 stage 2: embed_tokens/lm_head are peft modules_to_save copies; its checkpoint holds
    only the trainable set (LoRA A/B and the two copies)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["lm_head", "embed_tokens"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(llama_gqa.torch_model), config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:  # the adapters and the trained copies differ from the frozen originals
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    ids = np.random.default_rng(2).integers(3, llama_gqa.model.config.vocab_size, size=(2, 8))
    with torch.no_grad():
        want = peft_model(torch.tensor(ids)).logits.numpy()
    args = (jnp.asarray(ids), jnp.ones((2, 8), jnp.int32))

    model, _ = lora_model(llama_gqa.path)
    full = {k: v.numpy() for k, v in peft_model.state_dict().items()}
    convert_llama.load_peft(model, DictSource(full, "peft state dict"), modules_to_save=True)
    err = np.abs(np.asarray(logits(model, *args)) - want).max()
    assert err <= 1e-4, err

    trainable = {k: p.detach().numpy() for k, p in peft_model.named_parameters() if p.requires_grad}
    fresh, _ = lora_model(llama_gqa.path)
    convert_llama.load_peft(fresh, DictSource(trainable, "stage2.ckpt"), lora_only=True, modules_to_save=True)
    np.testing.assert_array_equal(np.asarray(logits(fresh, *args)), np.asarray(logits(model, *args)))
    exported = dict(convert_llama.export_peft(fresh, lora_only=True, modules_to_save=True))
    assert exported.keys() == trainable.keys()
