"""Sampling processors vs transformers, and the jitted KV-cache decode loop vs transformers generate."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _fixtures_llama import llama_gqa  # noqa: F401
from transformers.generation import logits_process as hf

from mg5jax.generation import decode, sampling
from mg5jax.generation.sampling import SamplingConfig
from mg5jax.models.llama import LlamaForCausalLM, prepare_for_decoding


def _random_logits(seed, b=3, v=257):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, v)) * 3).astype(np.float32), rng.integers(0, v, size=(b, 12))


def _assert_same_scores(ours, theirs):
    ours, theirs = np.asarray(ours), theirs.numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    assert np.abs(ours[finite] - theirs[finite]).max() <= 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_processors_match_transformers(seed):
    logits, ids = _random_logits(seed)
    seen = np.zeros(logits.shape, bool)
    seen[np.arange(3)[:, None], ids] = True
    t_logits, t_ids = torch.from_numpy(logits), torch.from_numpy(ids)
    cases = [
        (sampling.temperature(logits, 0.7), hf.TemperatureLogitsWarper(0.7)),
        (sampling.top_k(logits, 10), hf.TopKLogitsWarper(10)),
        (sampling.top_k(logits, 1000), hf.TopKLogitsWarper(1000)),
        (sampling.top_p(logits, 0.9), hf.TopPLogitsWarper(0.9)),
        (sampling.top_p(logits, 0.05), hf.TopPLogitsWarper(0.05)),
        (sampling.repetition_penalty(logits, seen, 2.0), hf.RepetitionPenaltyLogitsProcessor(2.0)),
        (sampling.repetition_penalty(logits, seen, 0.7), hf.RepetitionPenaltyLogitsProcessor(0.7)),
    ]
    for ours, proc in cases:
        _assert_same_scores(ours, proc(t_ids, t_logits.clone()))
    # the whole chain, in transformers' order (processors, then warpers)
    cfg = SamplingConfig(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=2.0)
    chain = hf.LogitsProcessorList([hf.RepetitionPenaltyLogitsProcessor(2.0), hf.TemperatureLogitsWarper(0.8),
                                    hf.TopKLogitsWarper(50), hf.TopPLogitsWarper(0.9)])
    _assert_same_scores(sampling.process_logits(logits, seen, cfg), chain(t_ids, t_logits.clone()))


def _tie_cases(seed, b=4, v=3000):
    rng = np.random.default_rng(seed)
    normal = (rng.normal(size=(b, v)) * 3).astype(np.float32)
    zeros = np.where(rng.random((b, v)) < 0.5, np.float32(-0.0), np.float32(0.0))
    return {
        "distinct values": normal,
        "bf16-rounded (some ties)": np.asarray(jnp.asarray(normal, jnp.bfloat16).astype(jnp.float32)),
        "even integers (ties beyond 2k: the full-sort path)": (2 * np.round(normal / 2)).astype(np.float32),
        "fewer finite values than k": np.where(rng.random((b, v)) < 0.99, -np.inf, normal).astype(np.float32),
        "signed zeros": np.where(rng.random((b, v)) < 0.95, zeros, normal).astype(np.float32),
    }


@pytest.mark.parametrize("k", [1, 50, 5000])
def test_sort_free_top_k_and_top_p_equal_the_sorting_reference(k):
    """top-k by bisection over the float bits, and top-p on what top-k keeps, give exactly what a sort gives."""
    top_k = jax.jit(sampling.top_k, static_argnums=1)
    top_k_top_p = jax.jit(sampling.top_k_top_p, static_argnums=(1, 2))
    top_p = jax.jit(sampling.top_p, static_argnums=1)
    for name, logits in _tie_cases(k).items():
        kth = np.sort(logits, axis=-1)[:, -min(k, logits.shape[1])][:, None]
        reference = np.where(logits < kth, -np.inf, logits)
        np.testing.assert_array_equal(top_k(logits, k), reference, err_msg=name)
        for p in (0.9, 0.3):
            np.testing.assert_array_equal(top_k_top_p(logits, k, p), top_p(reference, p), err_msg=f"{name}, p={p}")


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ValueError, match="SamplingConfig.top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="SamplingConfig.temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="SamplingConfig.stop_sequences"):
        SamplingConfig(stop_sequences=((),))


# ---------------------------------------------------------------------------------------------
# the decode loop on a tiny LLaMA

VOCAB = 160
TRIGGER = VOCAB - 8  # plays [IMG0]; the next seven ids play [IMG1] … [IMG7]
FORCED = tuple(range(VOCAB - 7, VOCAB))
PROMPTS = ([5, 17, 33, 2, 91, 12, 7], [44, 3, 120], [9, 8, 77, 41, 63])


@pytest.fixture(scope="session")
def tiny_llama(llama_gqa):
    """(torch model, our fp32 model) with the same random weights (vocab 160, GQA, untied lm_head)."""
    return llama_gqa.torch_model, llama_gqa.model


def _padded(prompts, width=None):
    width = width or max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for r, p in enumerate(prompts):
        ids[r, :len(p)], mask[r, :len(p)] = p, True
    return ids, mask


def _hf_greedy(ref, prompt, max_new, **kw):
    out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                       max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return out[0, len(prompt):].numpy()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_transformers(tiny_llama, penalty):
    ref, ours = tiny_llama
    cfg = SamplingConfig(max_new_tokens=16, repetition_penalty=penalty, penalize_prompt=True)
    ids, mask = _padded(PROMPTS)
    out = decode.generate(ours, input_ids=ids, prompt_mask=mask, config=cfg)
    chex.assert_shape(out.ids, (3, 16))
    chex.assert_type(out.ids, np.int32)
    np.testing.assert_array_equal(out.lengths, 16)
    assert bool(out.finished.all())
    for r, prompt in enumerate(PROMPTS):
        expected = _hf_greedy(ref, prompt, 16, repetition_penalty=penalty)
        np.testing.assert_array_equal(np.asarray(out.ids[r]), expected)


def test_prompt_masks_must_be_right_padded_prefixes(tiny_llama):
    ids, mask = _padded(PROMPTS)
    empty, left = mask.copy(), mask.copy()
    empty[1] = False
    left[2] = np.roll(left[2], 2)  # [0, 0, 1, 1, 1, 1, 1]: a left-padded row
    for bad, row in ((empty, 1), (left, 2)):
        with pytest.raises(ValueError, match=rf"prompt_mask rows \[{row}\] are not a prefix"):
            decode.generate(tiny_llama[1], input_ids=ids, prompt_mask=bad, config=SamplingConfig(max_new_tokens=2))


def test_stop_sequences_and_eos_end_rows_independently(tiny_llama):
    ref, ours = tiny_llama
    full = [_hf_greedy(ref, p, 16) for p in PROMPTS]
    stop = tuple(int(t) for t in full[0][4:6])  # row 0 ends at its first occurrence of this pair
    # row 1 ends at an id that rows 0 and 2 never produce, so row 2 runs to max_new_tokens
    eos = next(int(t) for j, t in enumerate(full[1]) if j >= 4 and t not in full[0] and t not in full[2]
               and t not in full[1][:j])
    cfg = SamplingConfig(max_new_tokens=16, eos_ids=(eos,), stop_sequences=(stop, (VOCAB + 5,)), pad_id=VOCAB - 1)
    ids, mask = _padded(PROMPTS)
    out = decode.generate(ours, input_ids=ids, prompt_mask=mask, config=cfg)

    expected_lengths = []
    for r, seq in enumerate(full):
        n = next((i + 1 for i in range(len(seq))
                  if seq[i] == eos or (i >= 1 and tuple(seq[i - 1:i + 1]) == stop)), len(seq))
        expected_lengths.append(n)
        assert int(out.lengths[r]) == n
        np.testing.assert_array_equal(np.asarray(out.ids[r, :n]), seq[:n])
        np.testing.assert_array_equal(np.asarray(out.ids[r, n:]), VOCAB - 1)  # frozen after its end
    assert expected_lengths[0] <= 6 and 5 <= expected_lengths[1] < 16 and expected_lengths[2] == 16
    assert bool(out.finished.all())


INSERTION = dict(trigger_id=TRIGGER, tokens=FORCED, max_insertions=2)
SAMPLE_CFG = SamplingConfig(do_sample=True, top_k=40, top_p=0.95, temperature=0.9, repetition_penalty=1.5,
                            max_new_tokens=10, logit_bias=((TRIGGER, 4.0),), pad_id=0)
SEEDS = (11, 12, 13)


@pytest.fixture(scope="session")
def inserted(tiny_llama):
    """A sampled batch-3 run with forced insertion from an embeddings prompt."""
    _, ours = tiny_llama
    ids, mask = _padded(PROMPTS)
    out = decode.generate(ours, inputs_embeds=ours.embed(ids), prompt_mask=mask, config=SAMPLE_CFG,
                          insertion=decode.ForcedInsertion(**INSERTION), key=jax.random.key(3), row_seeds=SEEDS)
    return jax.device_get(out)


def _forced_slots(positions, n):
    """Boolean `[n]`: the output slots filled by forced tokens after each trigger position."""
    slots = np.zeros(n, bool)
    for p in positions:
        slots[p + 1:p + 1 + len(FORCED)] = True
    return slots


def test_forced_insertion_windows_match_teacher_forcing(tiny_llama, inserted):
    _, ours = tiny_llama
    out = inserted
    chex.assert_shape(out.insertion_hidden, (3, 2, 8, 64))
    chex.assert_shape(out.ids, (3, 10 + 2 * 7))
    assert out.insertion_counts.max() == 2, out.insertion_counts  # two insertions in one row
    assert out.insertion_counts.min() >= 1
    # edge cases this seed covers: a trigger chosen from the prefill logits (its window starts with
    # the prompt's last hidden state), and a trigger that is a row's last sampled token (the forced
    # tokens still follow before the row finishes)
    assert (out.insertion_positions == 0).any()
    last = out.insertion_positions[np.arange(3), out.insertion_counts - 1] - 7 * (out.insertion_counts - 1)
    assert (last == SAMPLE_CFG.max_new_tokens - 1).any()
    worst = 0.0
    for r, prompt in enumerate(PROMPTS):
        n, count = int(out.lengths[r]), int(out.insertion_counts[r])
        gen = out.ids[r, :n]
        assert n == 10 + 7 * count  # forced tokens do not count against max_new_tokens
        positions = out.insertion_positions[r, :count]
        np.testing.assert_array_equal(out.insertion_positions[r, count:], -1)
        assert list(np.flatnonzero(gen == TRIGGER)) == list(positions)
        for p in positions:  # the forced tokens follow the trigger at consecutive positions
            np.testing.assert_array_equal(gen[p + 1:p + 8], FORCED)
        full = jnp.asarray(np.concatenate([prompt, gen])[None])
        hidden = np.asarray(ours(full).hidden_states[0])
        for c, p in enumerate(positions):
            start = len(prompt) + p - 1  # the state that predicted the trigger
            window = hidden[start:start + 8]
            worst = max(worst, float(np.abs(out.insertion_hidden[r, c] - window).max()))
    assert worst <= 1e-5, worst


def test_a_model_prepared_for_decoding_generates_the_same(llama_gqa, inserted):
    """Fused projections and (on a CPU) the packed small-batch kernel: HF's greedy ids, and the same
    sampled run with forced insertion (ids and insertion hidden states) as the model as loaded."""
    prepared = LlamaForCausalLM.from_pretrained(llama_gqa.path, param_dtype=jnp.float32)
    prepare_for_decoding(prepared)
    ids, mask = _padded(PROMPTS)
    out = decode.generate(prepared, input_ids=ids, prompt_mask=mask, config=SamplingConfig(max_new_tokens=12))
    for r, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(np.asarray(out.ids[r]), _hf_greedy(llama_gqa.torch_model, prompt, 12))
    got = decode.generate(prepared, inputs_embeds=prepared.embed(ids), prompt_mask=mask, config=SAMPLE_CFG,
                          insertion=decode.ForcedInsertion(**INSERTION), key=jax.random.key(3), row_seeds=SEEDS)
    np.testing.assert_array_equal(np.asarray(got.ids), inserted.ids)
    np.testing.assert_allclose(np.asarray(got.insertion_hidden), inserted.insertion_hidden, atol=1e-5)


def test_a_used_up_trigger_is_banned_before_top_k_and_top_p(tiny_llama):
    """When the trigger dominates the nucleus and its insertions are used up, the next tokens come from
    top-k / top-p over the other tokens (the ban runs first), not an empty nucleus that yields id 0."""
    _, ours = tiny_llama
    ids, mask = _padded(PROMPTS)
    cfg = dataclasses.replace(SAMPLE_CFG, logit_bias=((TRIGGER, 50.0),), top_p=0.5, repetition_penalty=1.0)
    out = decode.generate(ours, inputs_embeds=ours.embed(ids), prompt_mask=mask, config=cfg,
                          insertion=decode.ForcedInsertion(**{**INSERTION, "max_insertions": 1}),
                          key=jax.random.key(3), row_seeds=SEEDS)
    for r in range(3):
        gen = np.asarray(out.ids[r, :int(out.lengths[r])])
        assert gen[0] == TRIGGER and int(out.insertion_counts[r]) == 1
        after = gen[1 + len(FORCED):]
        assert len(after) == cfg.max_new_tokens - 1 and not np.any(after == TRIGGER)
        assert not np.all(after == 0), after  # sampled among the remaining tokens


def test_rows_do_not_depend_on_the_batch(tiny_llama, inserted):
    _, ours = tiny_llama
    width = max(map(len, PROMPTS))
    for r, prompt in enumerate(PROMPTS):
        ids, mask = _padded([prompt], width)
        one = decode.generate(ours, inputs_embeds=ours.embed(ids), prompt_mask=mask, config=SAMPLE_CFG,
                              insertion=decode.ForcedInsertion(**INSERTION), key=jax.random.key(3),
                              row_seeds=[SEEDS[r]])
        np.testing.assert_array_equal(np.asarray(one.ids[0]), inserted.ids[r])
        np.testing.assert_array_equal(np.asarray(one.insertion_positions[0]), inserted.insertion_positions[r])
        np.testing.assert_allclose(np.asarray(one.insertion_hidden[0]), inserted.insertion_hidden[r], atol=1e-5)


def test_stream_matches_generate_and_drop_forced_tokens(tiny_llama, inserted):
    _, ours = tiny_llama
    ids, mask = _padded(PROMPTS)
    kw = dict(inputs_embeds=ours.embed(ids), prompt_mask=mask, config=SAMPLE_CFG,
              insertion=decode.ForcedInsertion(**INSERTION, keep_tokens=False), key=jax.random.key(3),
              row_seeds=SEEDS)
    whole = decode.generate(ours, **kw)
    chunks = list(decode.generate_stream(ours, chunk_steps=3, **kw))
    assert len(chunks) > 2 and all(c.output is None for c in chunks[:-1])
    for r in range(3):
        streamed = np.concatenate([c.new_ids[r] for c in chunks])
        np.testing.assert_array_equal(streamed, np.asarray(whole.ids[r, :int(whole.lengths[r])]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(chunks[-1].output), jax.device_get(whole))
    # dropping the forced tokens changes nothing else: same samples, positions in the shorter ids
    for r in range(3):
        kept = inserted.ids[r, :int(inserted.lengths[r])]
        count = int(inserted.insertion_counts[r])
        forced = _forced_slots(inserted.insertion_positions[r, :count], len(kept))
        np.testing.assert_array_equal(np.asarray(whole.ids[r, :int(whole.lengths[r])]), kept[~forced])
        np.testing.assert_array_equal(np.asarray(whole.insertion_positions[r, :count]),
                                      inserted.insertion_positions[r, :count] - 7 * np.arange(count))
    np.testing.assert_array_equal(np.asarray(whole.insertion_hidden), inserted.insertion_hidden)
