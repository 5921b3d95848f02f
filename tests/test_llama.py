"""LLaMA: parity with transformers, the KV cache, checkpoint I/O, mesh loading, voken rows."""

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from _fixtures_llama import GQA, llama_gqa, llama_gqa_bin_dir, llama_gqa_sharded_dir, llama_odd  # noqa: F401
from flax import nnx

from mg5jax import parallel
from mg5jax.convert.sources import CheckpointError, open_weights, write_safetensors
from mg5jax.models import cpu_decode, lora
from mg5jax.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaOutput,
    add_voken_rows,
    prepare_for_decoding,
    train_new_rows_only,
)
from mg5jax.models.quantize import Int8Linear, quantize_int8

pytestmark = pytest.mark.xdist_group("llama")


@nnx.jit
def forward(model, input_ids, attention_mask):
    return model(input_ids, attention_mask=attention_mask)


@nnx.jit
def forward_ids_and_embeds(model, input_ids, inputs_embeds, attention_mask):
    return (model(input_ids, attention_mask=attention_mask),
            model(inputs_embeds=inputs_embeds, attention_mask=attention_mask))


@nnx.jit
def step(model, input_ids, attention_mask, position_ids, cache):
    return model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)


def right_padded(rng, vocab, lengths, t):
    ids = rng.integers(3, vocab, size=(len(lengths), t))
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask, ids, 2), mask


@pytest.mark.parametrize("name", ["llama_gqa", "llama_odd"])
def test_parity_with_transformers(name, request):
    ref = request.getfixturevalue(name)
    cfg = ref.model.config
    rng = np.random.default_rng(0)
    ids, mask = right_padded(rng, cfg.vocab_size, [9, 6, 3], 9)
    embeds = rng.normal(size=(3, 9, cfg.hidden_size)).astype(np.float32)
    out_ids, out_emb = forward_ids_and_embeds(ref.model, jnp.asarray(ids), jnp.asarray(embeds), jnp.asarray(mask))
    chex.assert_shape(out_ids.logits, (3, 9, cfg.vocab_size))
    chex.assert_shape(out_ids.hidden_states, (3, 9, cfg.hidden_size))
    chex.assert_type(out_ids.logits, jnp.float32)
    with torch.no_grad():
        t_ids = ref.torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
        t_emb = ref.torch_model(inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(mask),
                                output_hidden_states=True)
    real = mask.astype(bool)
    errors = {}
    for tag, ours, theirs in (("ids", out_ids, t_ids), ("embeds", out_emb, t_emb)):
        errors[f"{tag} logits"] = np.abs(np.asarray(ours.logits) - theirs.logits.numpy())[real].max()
        errors[f"{tag} hidden"] = np.abs(np.asarray(ours.hidden_states) - theirs.hidden_states[-1].numpy())[real].max()
    print(f"{name} max-abs errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-4, errors
    # the tied model really ties: logits are hidden @ embedding.T
    if cfg.tie_word_embeddings:
        assert ref.model.lm_head is None
        tied = np.asarray(out_ids.hidden_states) @ np.asarray(ref.model.model.embed_tokens.embedding[...]).T
        np.testing.assert_allclose(np.asarray(out_ids.logits), tied, atol=1e-4, rtol=0)


def test_kv_cache_decode_matches_full_forward(llama_gqa):
    model, cfg = llama_gqa.model, llama_gqa.model.config
    rng = np.random.default_rng(1)
    total, lengths, steps = 10, np.array([5, 2, 7]), 3
    full_ids = rng.integers(3, cfg.vocab_size, size=(3, total))
    full = forward(model, jnp.asarray(full_ids), jnp.ones((3, total), jnp.int32))

    # right-padded prefill: padding slots stay invalid
    t0 = int(lengths.max())
    prompt_mask = (np.arange(t0)[None] < lengths[:, None]).astype(np.int32)
    prompt = np.where(prompt_mask, full_ids[:, :t0], 2)
    cache = model.init_cache(3, 12)
    chex.assert_shape(cache.k, [(3, cfg.num_key_value_heads, 12, cfg.head_dim)] * cfg.num_hidden_layers)
    out = step(model, jnp.asarray(prompt), jnp.asarray(prompt_mask), None, cache)
    np.testing.assert_array_equal(np.asarray(out.cache.valid[:, :t0]), prompt_mask.astype(bool))
    real = prompt_mask.astype(bool)
    errs = [np.abs(np.asarray(out.logits) - np.asarray(full.logits[:, :t0]))[real].max()]
    errs.append(np.abs(np.asarray(out.hidden_states) - np.asarray(full.hidden_states[:, :t0]))[real].max())

    # per-row decode: every row continues at its own position (explicit, then defaulted position_ids)
    cache, pos = out.cache, lengths.copy()
    for i in range(steps):
        tok = full_ids[np.arange(3), pos][:, None]
        position_ids = jnp.asarray(pos[:, None]) if i == 0 else None
        out = step(model, jnp.asarray(tok), jnp.ones((3, 1), jnp.int32), position_ids, cache)
        want = np.asarray(full.logits)[np.arange(3), pos]
        errs.append(np.abs(np.asarray(out.logits[:, 0]) - want).max())
        cache, pos = out.cache, pos + 1
    np.testing.assert_array_equal(np.asarray(cache.valid).sum(-1), pos)

    # a masked (inactive) row writes nothing and marks nothing valid
    out = step(model, jnp.asarray(full_ids[:, :1]), jnp.asarray([[1], [0], [1]]), jnp.asarray(pos[:, None]), cache)
    np.testing.assert_array_equal(np.asarray(out.cache.valid).sum(-1), pos + np.array([1, 0, 1]))
    for new, old in zip(out.cache.k, cache.k):
        np.testing.assert_array_equal(np.asarray(new[1]), np.asarray(old[1]))
    print("kv-cache max-abs error vs full forward:", f"{max(errs):.2e}")
    assert max(errs) <= 1e-5, errs


def test_fused_attention_and_remat_match_reference(llama_gqa):
    rng = np.random.default_rng(2)
    ids, mask = right_padded(rng, llama_gqa.model.config.vocab_size, [6, 4], 6)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    fused = LlamaForCausalLM.from_pretrained(llama_gqa.path, param_dtype=jnp.float32, attn_impl="fused")
    real = np.asarray(mask, bool)
    err = np.abs(np.asarray(forward(fused, ids, mask).logits) - np.asarray(forward(llama_gqa.model, ids, mask).logits))
    assert err[real].max() <= 1e-5

    remat = LlamaForCausalLM.from_pretrained(llama_gqa.path, param_dtype=jnp.float32, remat=True)

    @nnx.jit
    def grads(model):
        return nnx.grad(lambda m: jnp.mean(m(ids, attention_mask=mask).logits ** 2))(model)

    g_ref, g_remat = grads(llama_gqa.model), grads(remat)
    chex.assert_trees_all_close(nnx.to_pure_dict(g_remat), nnx.to_pure_dict(g_ref), atol=1e-6)
    # a named policy (model.remat_llm_policy): the same gradients, the products saved
    policy = LlamaForCausalLM.from_pretrained(llama_gqa.path, param_dtype=jnp.float32,
                                              remat="dots_with_no_batch_dims_saveable")
    chex.assert_trees_all_close(nnx.to_pure_dict(grads(policy)), nnx.to_pure_dict(g_ref), atol=1e-6)
    with pytest.raises(ValueError, match="remat='bogus'"):
        LlamaForCausalLM(llama_gqa.model.config, remat="bogus", rngs=nnx.Rngs(0))


def test_config_from_hf_and_rejections(llama_gqa, llama_odd):
    cfg = LlamaConfig.from_json(llama_odd.path)
    assert (cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings) == (32, 500000.0, True)
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
    base = json.loads((llama_gqa.path / "config.json").read_text())
    assert LlamaConfig.from_hf(base).num_key_value_heads == 2
    legacy = {k: v for k, v in base.items() if k != "rope_parameters"} | {"rope_theta": 1e4, "rope_scaling": None}
    assert LlamaConfig.from_hf(legacy) == LlamaConfig.from_hf(base)
    bad = {
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4},
        "attention_bias": True,
        "mlp_bias": True,
        "hidden_act": "gelu",
    }
    for key, value in bad.items():
        with pytest.raises(ValueError, match=key):
            LlamaConfig.from_hf(base | {key: value})


def _params(model):
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


def test_sharded_and_bin_checkpoints_load(llama_gqa, llama_gqa_sharded_dir, llama_gqa_bin_dir):
    assert (llama_gqa_sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(llama_gqa_sharded_dir.glob("model-*.safetensors"))) > 1
    for path in (llama_gqa_sharded_dir, llama_gqa_bin_dir):
        _assert_same_params(LlamaForCausalLM.from_pretrained(path, param_dtype=jnp.float32), llama_gqa.model)


def test_checkpoint_errors_name_key_and_file(llama_gqa, tmp_path):
    tensors = dict(open_weights(llama_gqa.path).items())

    def attempt(name, edited):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(llama_gqa.path / "config.json", d / "config.json")
        write_safetensors(d / "model.safetensors", edited)
        return d

    key = "model.layers.1.self_attn.k_proj.weight"
    missing = attempt("missing", {k: v for k, v in tensors.items() if k != key})
    with pytest.raises(CheckpointError, match=rf"missing key '{key}' in .*missing/model.safetensors"):
        LlamaForCausalLM.from_pretrained(missing)
    extra = attempt("extra", tensors | {"model.layers.7.mlp.up_proj.weight": tensors[key]})
    with pytest.raises(CheckpointError, match=r"unexpected key 'model.layers.7.mlp.up_proj.weight' in .*extra/model"):
        LlamaForCausalLM.from_pretrained(extra)
    wrong = attempt("wrong", tensors | {key: tensors[key][:, :-1]})
    with pytest.raises(CheckpointError, match=rf"key '{key}' in .*wrong/model.safetensors: expected shape"):
        LlamaForCausalLM.from_pretrained(wrong)
    ignored = attempt("ignored", tensors | {"model.rotary_emb.inv_freq": np.ones(8, np.float32)})
    LlamaForCausalLM.from_pretrained(ignored)
    # a config that says tied over a file whose lm_head is its own matrix
    untied = attempt("said_tied", tensors)
    (untied / "config.json").write_text(json.dumps(
        json.loads((untied / "config.json").read_text()) | {"tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match=r"said_tied/model.safetensors: config.json says tie_word_embeddings"):
        LlamaForCausalLM.from_pretrained(untied)
    copy = attempt("tied_copy", tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"]})
    (copy / "config.json").write_text((untied / "config.json").read_text())
    LlamaForCausalLM.from_pretrained(copy)  # a copy of the embedding is what a tied file may hold


@pytest.mark.parametrize("name", ["llama_gqa", "llama_odd"])
def test_save_pretrained_round_trip(name, request, tmp_path):
    from transformers import LlamaForCausalLM as TorchLlama

    ref = request.getfixturevalue(name)
    files = ref.model.save_pretrained(tmp_path / "single")
    assert files == ["model.safetensors"]
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "single", param_dtype=jnp.float32)
    _assert_same_params(reloaded, ref.model)
    assert reloaded.config == ref.model.config
    files = ref.model.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    assert len(files) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _assert_same_params(LlamaForCausalLM.from_pretrained(tmp_path / "sharded", param_dtype=jnp.float32), ref.model)
    # transformers reads what we wrote, bit for bit
    theirs = TorchLlama.from_pretrained(tmp_path / "sharded").state_dict()
    for k, v in ref.torch_model.state_dict().items():
        np.testing.assert_array_equal(theirs[k].numpy(), v.numpy(), err_msg=k)
    # bf16 storage round trips exactly too
    bf16 = LlamaForCausalLM.from_pretrained(ref.path, param_dtype=jnp.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _assert_same_params(LlamaForCausalLM.from_pretrained(tmp_path / "bf16", param_dtype=jnp.bfloat16), bf16)


def test_mesh_load_gives_same_logits(llama_gqa):
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = LlamaForCausalLM.from_pretrained(llama_gqa.path, param_dtype=jnp.float32, mesh=mesh)
    spec = sharded.model.layers[0].self_attn.q_proj.kernel[...].sharding.spec
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert sharded.lm_head.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    rng = np.random.default_rng(3)
    ids, mask = right_padded(rng, llama_gqa.model.config.vocab_size, [8, 8, 5, 2], 8)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    with jax.set_mesh(mesh):
        out = forward(sharded, ids, mask)
    want = forward(llama_gqa.model, ids, mask)
    assert isinstance(out, LlamaOutput)
    err = np.abs(np.asarray(out.logits) - np.asarray(want.logits))[np.asarray(mask, bool)].max()
    assert err <= 1e-5, err


def test_voken_rows_mean_init_and_only_new_rows_train(llama_gqa):
    old = llama_gqa.model.config.vocab_size
    # Vicuna-like: the vocab grows by fewer rows than there are new tokens (32001 -> 32009, 9 new)
    model = LlamaForCausalLM.from_pretrained(llama_gqa.path, param_dtype=jnp.float32)
    add_voken_rows(model, 9, vocab_size=old + 8)
    emb = np.asarray(model.model.embed_tokens.embedding[...])
    np.testing.assert_allclose(emb[-9:], np.broadcast_to(emb[:-9].mean(0), (9, emb.shape[1])), atol=1e-6)

    model = LlamaForCausalLM.from_pretrained(llama_gqa.path, param_dtype=jnp.float32)
    add_voken_rows(model, 9)
    vocab = old + 9
    assert model.config.vocab_size == vocab
    emb = np.asarray(model.model.embed_tokens.embedding[...])
    head = np.asarray(model.lm_head.kernel[...])
    chex.assert_shape((emb, head), ((vocab, GQA["hidden_size"]), (GQA["hidden_size"], vocab)))
    old_emb = np.asarray(llama_gqa.model.model.embed_tokens.embedding[...])
    old_head = np.asarray(llama_gqa.model.lm_head.kernel[...])
    np.testing.assert_array_equal(emb[:old], old_emb)
    np.testing.assert_allclose(emb[old:], np.broadcast_to(old_emb.mean(0), (9, emb.shape[1])), atol=1e-6)
    np.testing.assert_allclose(head[:, old:], np.broadcast_to(old_head.mean(1, keepdims=True), (head.shape[0], 9)),
                               atol=1e-6)

    trainable = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("embed_tokens"), nnx.PathContains("lm_head")))
    tx = train_new_rows_only(optax.adamw(1e-2, weight_decay=0.01), model, 9)
    optimizer = nnx.Optimizer(model, tx, wrt=trainable)
    before = _params(model)
    rng = np.random.default_rng(4)
    ids = jnp.asarray(rng.permutation(vocab)[:48].reshape(4, 12))

    def loss_fn(m):
        logits = m(ids[:, :-1]).logits
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
        return ce + 1e-3 * jnp.sum(m.model.embed_tokens.embedding[...] ** 2)

    @nnx.jit
    def train_step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable))(m)
        opt.update(m, grads)
        return loss

    for _ in range(3):
        train_step(model, optimizer)
    after = _params(model)
    for k in before:
        name = ".".join(map(str, k))
        if name == "model.embed_tokens.embedding":
            np.testing.assert_array_equal(after[k][:old], before[k][:old])
            assert (np.abs(after[k][old:] - before[k][old:]) > 0).all(axis=1).all()
        elif name == "lm_head.kernel":
            np.testing.assert_array_equal(after[k][:, :old], before[k][:, :old])
            assert (np.abs(after[k][:, old:] - before[k][:, old:]) > 0).any(axis=0).all()
        else:
            np.testing.assert_array_equal(after[k], before[k], err_msg=name)


def test_bf16_compute_keeps_the_residual_stream_in_fp32(llama_gqa):
    """As under the original's autocast, where the fp32 embed_tokens output plus bf16 block outputs
    promote to fp32: with every block's output projections zeroed, the final norm sees the fp32
    embeddings themselves, not their bf16 rounding."""
    def zero_blocks(residual_dtype):
        model = LlamaForCausalLM.from_pretrained(llama_gqa.path, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                                 residual_dtype=residual_dtype)
        for layer in model.model.layers:
            layer.self_attn.o_proj.kernel[...] = 0.0
            layer.mlp.down_proj.kernel[...] = 0.0
        return model

    model = zero_blocks(jnp.float32)  # the default
    ids = jnp.asarray(np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 7)), jnp.int32)
    embeds = model.embed(ids)
    chex.assert_type(embeds, jnp.float32)
    out = model(ids)
    chex.assert_type(out.hidden_states, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out.hidden_states, np.float32),
                                  np.asarray(model.model.norm(embeds), np.float32))
    rounded = np.asarray(model.model.norm(embeds.astype(jnp.bfloat16)), np.float32)  # a bf16 stream's result
    assert not np.array_equal(rounded, np.asarray(out.hidden_states, np.float32))
    np.testing.assert_array_equal(np.asarray(zero_blocks(jnp.bfloat16)(ids).hidden_states, np.float32), rounded)


def _decode_logits(model, ids, mask, steps):
    """Logits of a right-padded prefill and then `steps` one-token cached steps (each row's next id)."""
    b, t = ids.shape
    out = step(model, jnp.asarray(ids), jnp.asarray(mask), None, model.init_cache(b, t + steps))
    logits, cache = [out.logits], out.cache
    pos = mask.sum(1)
    for i in range(steps):
        tok = jnp.asarray((ids[:, :1] + i + 1) % model.config.vocab_size)
        out = step(model, tok, jnp.ones((b, 1), jnp.int32), jnp.asarray(pos[:, None] + i), cache)
        logits.append(out.logits)
        cache = out.cache
    return logits


@pytest.mark.parametrize("name", ["llama_gqa", "llama_odd"])
def test_prepare_for_decoding_keeps_logits(name, request):
    ref = request.getfixturevalue(name)
    cfg = ref.model.config
    prepared = LlamaForCausalLM.from_pretrained(ref.path, param_dtype=jnp.float32)
    done = prepare_for_decoding(prepared)
    kernel = cpu_decode.unavailable_reason() is None
    untied = not cfg.tie_word_embeddings
    assert done == {"fused_layers": cfg.num_hidden_layers,
                    "packed_layers": (4 * cfg.num_hidden_layers + untied) if kernel else 0,
                    "not_packed": cpu_decode.unavailable_reason()}
    attn = prepared.model.layers[0].self_attn
    assert attn.q_proj is None and attn.qkv_proj is not None
    assert isinstance(attn.qkv_proj, cpu_decode.PackedLinear) == kernel
    assert prepare_for_decoding(prepared)["fused_layers"] == 0  # a second call changes nothing
    ids, mask = right_padded(np.random.default_rng(5), cfg.vocab_size, [6, 3, 5], 6)
    errors = [np.abs(np.asarray(a) - np.asarray(b))[:, -1].max() for a, b in
              zip(_decode_logits(prepared, ids, mask, 3), _decode_logits(ref.model, ids, mask, 3))]
    print(f"{name} prepared vs as loaded, prefill and 3 cached steps:", [f"{e:.1e}" for e in errors])
    assert max(errors) <= 1e-5, errors
    with pytest.raises(ValueError, match="save before preparing it"):
        prepared.save_pretrained(request.getfixturevalue("tmp_path"))


def test_prepare_for_decoding_folds_lora_and_leaves_int8_and_meshes_unpacked(llama_gqa):
    cfg = llama_gqa.model.config
    ids, mask = right_padded(np.random.default_rng(6), cfg.vocab_size, [7, 4], 7)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    adapted = LlamaForCausalLM.from_pretrained(llama_gqa.path, param_dtype=jnp.float32)
    lora.apply_lora(adapted, rank=4, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(1))
    for _, m in nnx.iter_modules(adapted):
        if isinstance(m, lora.LoraLinear):
            m.lora_b.set_value(jax.random.normal(jax.random.key(2), m.lora_b.shape) * 0.1)
    want = forward(adapted, ids, mask).logits
    assert prepare_for_decoding(adapted)["fused_layers"] == cfg.num_hidden_layers
    assert not lora.lora_paths(adapted)
    assert np.abs(np.asarray(forward(adapted, ids, mask).logits) - np.asarray(want)).max() <= 1e-5

    quantized = LlamaForCausalLM.from_pretrained(llama_gqa.path, param_dtype=jnp.float32)
    quantize_int8(quantized)
    want = forward(quantized, ids, mask).logits
    done = prepare_for_decoding(quantized)
    assert done["fused_layers"] == 0 and isinstance(quantized.model.layers[0].mlp.down_proj, Int8Linear)
    assert done["packed_layers"] == (1 if done["not_packed"] is None else 0)  # the fp32 lm_head only
    assert np.abs(np.asarray(forward(quantized, ids, mask).logits) - np.asarray(want)).max() <= 1e-5

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = LlamaForCausalLM.from_pretrained(llama_gqa.path, param_dtype=jnp.float32, mesh=mesh)
    done = prepare_for_decoding(sharded)
    assert done == {"fused_layers": cfg.num_hidden_layers, "packed_layers": 0,
                    "not_packed": "the model is not on one CPU device"}
    with jax.set_mesh(mesh):
        out = forward(sharded, ids, mask)
    want = forward(llama_gqa.model, ids, mask).logits
    assert np.abs(np.asarray(out.logits) - np.asarray(want))[np.asarray(mask, bool)].max() <= 1e-5
