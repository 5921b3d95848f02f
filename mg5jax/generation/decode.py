"""Batched KV-cache decoding for the LLaMA LLM: one jitted `lax.while_loop`, per-row finish,
and a forced-insertion hook for MiniGPT-5's generative vokens.

Layout of a batch (all static shapes):
  * the prompt is right-padded, `[B, Tp]` ids or `[B, Tp, D]` embeddings plus `prompt_mask [B, Tp]`;
    row b's prompt fills positions `0 .. len_b - 1` and its new tokens go to `len_b, len_b + 1, …`
    (a KV-cache slot index is its position id, so a row's padding slots are simply overwritten);
  * the cache holds `Tp + max_new_tokens + max_insertions * len(tokens)` slots;
  * the prefill stores all prompt positions but each row's last; every loop step feeds each row
    one input (first that last prompt position, then the token chosen before; finished rows feed
    with attention mask 0, which stores nothing) and chooses each row's next token.

Forced insertion (REFERENCE §7.3/§7.4, generalised to batches and several images per response):
when a row *samples* `trigger_id` ([IMG0]) the next `len(tokens)` steps of that row choose
`tokens` ([IMG1] … [IMG7]) instead of sampling, one per step, so the cache receives the vokens at
consecutive positions exactly as the original's 8-token forced forward does. The row keeps a window
of `len(tokens) + 1` final hidden states per insertion: the state that predicted the trigger, then
the states at the trigger and at the first `len(tokens) - 1` forced tokens (the training window
p-1 … p+6 of REFERENCE §4.1). Forced tokens are invisible to the sampling logic, as in the
original, where [IMG1] … [IMG7] never enter `sequences`: they are not counted by `max_new_tokens`,
not marked as seen for the repetition penalty, not part of the stop-sequence tail and never tested
against EOS. The sampled trigger itself is an ordinary sampled token for all of these. Once a row
has used its `max_insertions`, its trigger logit is set to -inf, so the insertion budget (and the
cache) can never overflow. A row whose sampling ends (EOS, stop sequence, `max_new_tokens`) on the
trigger still finishes its forced tokens before it counts as finished.

RNG: row b draws with `fold_in(fold_in(key, row_seeds[b]), step)`, so its samples do not depend on
the batch it is in. `generate` and `generate_stream` run the same two compiled functions (`_start`:
prefill; `_advance`: the loop up to a step limit), so they give identical results.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mg5jax import aot
from mg5jax.generation import sampling
from mg5jax.generation.sampling import SamplingConfig

NO_LIMIT = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class ForcedInsertion:
    """Tokens fed after a sampled trigger, with the hidden-state window kept for each insertion."""

    trigger_id: int  # sampling this id starts an insertion ([IMG0])
    tokens: tuple[int, ...]  # fed at the next consecutive positions ([IMG1] … [IMG7])
    max_insertions: int = 1  # insertions kept per row; afterwards the trigger is banned in that row
    keep_tokens: bool = True  # write the forced tokens to the output ids (the original drops them)

    def __post_init__(self):
        if not self.tokens:
            raise ValueError("ForcedInsertion.tokens: expected at least one token id")
        if self.max_insertions < 1:
            raise ValueError(f"ForcedInsertion.max_insertions={self.max_insertions}: expected >= 1")

    @property
    def window(self) -> int:
        return len(self.tokens) + 1


@flax.struct.dataclass
class GenerationOutput:
    """What `generate` returns (M = max_insertions, W = len(tokens) + 1, N = output capacity)."""

    ids: jax.Array  # [B, N] int32: chosen ids, pad_id after each row's length
    lengths: jax.Array  # [B] int32: valid entries of `ids`
    finished: jax.Array  # [B] bool: the row ended (EOS, stop sequence, max_new_tokens)
    insertion_hidden: jax.Array  # [B, M, W, D]: final hidden-state window of each insertion
    insertion_counts: jax.Array  # [B] int32: insertions made
    insertion_positions: jax.Array  # [B, M] int32: index in `ids` of each insertion's trigger, -1 unused


@flax.struct.dataclass
class DecodeState:
    """Loop carry. `logits`/`hidden` are the model outputs at each row's last fed position (unset
    before the first step)."""

    cache: Any  # KVCache of the model
    next_embed: jax.Array  # [B, D]: input embedding fed at `positions` by the next step
    logits: jax.Array  # [B, V] fp32
    hidden: jax.Array  # [B, D]
    step: jax.Array  # [] int32: choices made so far
    positions: jax.Array  # [B] int32: position the next fed token takes
    row_keys: jax.Array  # [B] PRNG keys
    ids: jax.Array  # [B, N] int32
    lengths: jax.Array  # [B] int32
    num_sampled: jax.Array  # [B] int32
    seen: jax.Array  # [B, V] bool: repetition-penalty presence mask
    tail: jax.Array  # [B, max stop length] int32: last sampled ids (for stop sequences)
    stopped: jax.Array  # [B] bool: sampling has ended for the row
    finished: jax.Array  # [B] bool: stopped and no forced tokens pending
    forced_ptr: jax.Array  # [B] int32: index of the next forced token; len(tokens) when not forcing
    insertion_hidden: jax.Array  # [B, M, W, D]
    insertion_counts: jax.Array  # [B] int32
    insertion_positions: jax.Array  # [B, M] int32

    def output(self) -> GenerationOutput:
        return GenerationOutput(
            ids=self.ids,
            lengths=self.lengths,
            finished=self.finished,
            insertion_hidden=self.insertion_hidden,
            insertion_counts=self.insertion_counts,
            insertion_positions=self.insertion_positions,
        )


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    """One `generate_stream` step: ids chosen per row since the last chunk; `output` on the last chunk."""

    new_ids: tuple[np.ndarray, ...]
    output: GenerationOutput | None


def _forced_count(insertion: ForcedInsertion | None) -> int:
    return len(insertion.tokens) if insertion is not None else 0


def output_capacity(cfg: SamplingConfig, insertion: ForcedInsertion | None) -> int:
    """N, the width of the output ids: the sampled tokens plus the kept forced tokens."""
    if insertion is None or not insertion.keep_tokens:
        return cfg.max_new_tokens
    return cfg.max_new_tokens + insertion.max_insertions * len(insertion.tokens)


def _choose(state: DecodeState, cfg: SamplingConfig,
            insertion: ForcedInsertion | None) -> tuple[DecodeState, jax.Array]:
    """Choose every running row's next token `[B]` from `state.logits` and update the bookkeeping
    (a finished row's token is arbitrary and changes nothing)."""
    b, _ = state.logits.shape
    rows = jnp.arange(b)
    running = ~state.finished
    k = _forced_count(insertion)
    forcing = state.forced_ptr < k

    logits = state.logits
    if insertion is not None:  # banned before the warpers (as HF's bad-words processor): top-k/top-p then
        #                        choose among the other tokens, never from an emptied nucleus
        exhausted = state.insertion_counts >= insertion.max_insertions
        logits = logits.at[:, insertion.trigger_id].set(
            jnp.where(exhausted, sampling.NEG_INF, logits[:, insertion.trigger_id]))
    logits = sampling.process_logits(logits, state.seen, cfg)
    keys = jax.vmap(jax.random.fold_in, (0, None))(state.row_keys, state.step)
    token = sampling.choose_tokens(logits, keys, cfg.do_sample)
    sampled = running & ~forcing

    forced_ptr, ins_hidden = state.forced_ptr, state.insertion_hidden
    ins_counts, ins_positions = state.insertion_counts, state.insertion_positions
    emitted = sampled
    if insertion is not None:
        forced_tokens = jnp.asarray(insertion.tokens, jnp.int32)
        token = jnp.where(forcing, forced_tokens[jnp.minimum(forced_ptr, k - 1)], token)
        triggered = sampled & (token == insertion.trigger_id)
        in_forced = running & forcing
        # window slot 0 at the trigger (the state that predicted it), slot ptr+1 while forcing
        which = jnp.clip(jnp.where(triggered, ins_counts, ins_counts - 1), 0, insertion.max_insertions - 1)
        slot = jnp.where(triggered, 0, jnp.minimum(forced_ptr + 1, insertion.window - 1))
        store = (triggered | in_forced)[:, None]
        ins_hidden = ins_hidden.at[rows, which, slot].set(
            jnp.where(store, state.hidden.astype(ins_hidden.dtype), ins_hidden[rows, which, slot]))
        ins_positions = ins_positions.at[rows, which].set(
            jnp.where(triggered, state.lengths, ins_positions[rows, which]))
        ins_counts = ins_counts + triggered
        forced_ptr = jnp.where(triggered, 0, forced_ptr + in_forced)
        if insertion.keep_tokens:
            emitted = sampled | in_forced

    write_at = jnp.minimum(state.lengths, state.ids.shape[1] - 1)
    ids = state.ids.at[rows, write_at].set(jnp.where(emitted, token, state.ids[rows, write_at]))
    lengths = state.lengths + emitted

    seen = state.seen.at[rows, token].set(state.seen[rows, token] | sampled)
    num_sampled = state.num_sampled + sampled
    tail = state.tail
    hit = jnp.zeros_like(sampled)
    if cfg.max_stop_length:
        tail = jnp.where(sampled[:, None], jnp.concatenate([tail[:, 1:], token[:, None]], axis=1), tail)
        for seq in cfg.stop_sequences:
            ends_with = jnp.all(tail[:, tail.shape[1] - len(seq):] == jnp.asarray(seq, jnp.int32), axis=1)
            hit = hit | (ends_with & (num_sampled >= len(seq)))
    for eos in cfg.eos_ids:
        hit = hit | (token == eos)
    stopped = state.stopped | (sampled & hit) | (num_sampled >= cfg.max_new_tokens)
    finished = stopped & (forced_ptr >= k)

    state = state.replace(
        step=state.step + 1, ids=ids, lengths=lengths, num_sampled=num_sampled, seen=seen,
        tail=tail, stopped=stopped, finished=finished, forced_ptr=forced_ptr, insertion_hidden=ins_hidden,
        insertion_counts=ins_counts, insertion_positions=ins_positions,
    )
    return state, token


def _start(graphdef, cfg: SamplingConfig, insertion: ForcedInsertion | None, params, input_ids, inputs_embeds,
           prompt_mask, key, row_seeds) -> DecodeState:
    """Prefill the cache with each row's prompt except its last token; the loop's first step feeds that
    one (so the prefill never computes logits, which XLA then drops, lm_head included)."""
    model = nnx.merge(graphdef, params)
    b, tp = prompt_mask.shape
    m = insertion.max_insertions if insertion is not None else 0
    cache_len = tp + cfg.max_new_tokens + m * _forced_count(insertion)
    rows = jnp.arange(b)
    prompt_len = prompt_mask.sum(axis=1).astype(jnp.int32)
    embeds = (model.embed(input_ids) if inputs_embeds is None else inputs_embeds).astype(model.residual_dtype)
    positions = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (b, tp))
    out = model(inputs_embeds=embeds, attention_mask=prompt_mask & (positions < prompt_len[:, None] - 1),
                position_ids=positions, cache=model.init_cache(b, cache_len))
    d = embeds.shape[-1]
    v = model.config.vocab_size

    seen = jnp.zeros((b, v), bool)
    if cfg.seen_ids:
        seen = seen.at[:, jnp.asarray(cfg.seen_ids, jnp.int32)].set(True)
    if cfg.penalize_prompt and input_ids is not None:
        seen = seen.at[rows[:, None], input_ids].max(prompt_mask)

    w = insertion.window if insertion is not None else 0
    return DecodeState(
        cache=out.cache,
        next_embed=embeds[rows, prompt_len - 1],
        logits=jnp.zeros((b, v), jnp.float32),
        hidden=jnp.zeros((b, d), model.dtype),
        step=jnp.zeros((), jnp.int32),
        positions=prompt_len - 1,
        row_keys=jax.vmap(jax.random.fold_in, (None, 0))(key, row_seeds),
        ids=jnp.full((b, output_capacity(cfg, insertion)), cfg.pad_id, jnp.int32),
        lengths=jnp.zeros((b,), jnp.int32),
        num_sampled=jnp.zeros((b,), jnp.int32),
        seen=seen,
        tail=jnp.full((b, cfg.max_stop_length), -1, jnp.int32),
        stopped=jnp.zeros((b,), bool),
        finished=jnp.zeros((b,), bool),
        forced_ptr=jnp.full((b,), _forced_count(insertion), jnp.int32),
        insertion_hidden=jnp.zeros((b, m, w, d), model.dtype),
        insertion_counts=jnp.zeros((b,), jnp.int32),
        insertion_positions=jnp.full((b, m), -1, jnp.int32),
    )


def _advance(graphdef, cfg: SamplingConfig, insertion: ForcedInsertion | None, params, state: DecodeState,
             limit) -> DecodeState:
    """Feed the chosen tokens and choose the next ones until every row is finished or `step == limit`."""
    model = nnx.merge(graphdef, params)

    def cond(s: DecodeState):
        return ~jnp.all(s.finished) & (s.step < limit)

    def body(s: DecodeState) -> DecodeState:
        running = ~s.finished
        out = model(inputs_embeds=s.next_embed[:, None], attention_mask=running[:, None],
                    position_ids=s.positions[:, None], cache=s.cache)
        s = s.replace(cache=out.cache, logits=out.logits[:, 0], hidden=out.hidden_states[:, 0],
                      positions=s.positions + running)
        s, token = _choose(s, cfg, insertion)
        return s.replace(next_embed=model.embed(token[:, None])[:, 0].astype(s.next_embed.dtype))

    return jax.lax.while_loop(cond, body, state)


_start_program = aot.Program(_start, static_argnums=(0, 1, 2))
_advance_program = aot.Program(_advance, static_argnums=(0, 1, 2), donate_argnums=(4,))


def _prepare(model, input_ids, inputs_embeds, prompt_mask, key, row_seeds):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("generate: pass exactly one of input_ids [B, Tp] or inputs_embeds [B, Tp, D]")
    prompt = input_ids if input_ids is not None else inputs_embeds
    b, tp = prompt.shape[:2]
    if prompt_mask is None:
        prompt_mask = np.ones((b, tp), bool)
    if prompt_mask.shape != (b, tp):
        raise ValueError(f"generate: prompt_mask has shape {prompt_mask.shape}, expected {(b, tp)}")
    if not isinstance(prompt_mask, jax.Array):  # a device mask is the caller's to vouch for (no host sync)
        mask = np.asarray(prompt_mask, bool)
        lengths = mask.sum(axis=1)
        bad = np.flatnonzero((lengths == 0) | np.any(mask != (np.arange(tp) < lengths[:, None]), axis=1))
        if bad.size:
            raise ValueError(f"generate: prompt_mask rows {bad.tolist()} are not a prefix of ones with at least "
                             "one 1 (prompts are right-padded)")
    if input_ids is not None:
        input_ids = _as(input_ids, np.int32)
    key = jax.random.key(0) if key is None else key
    row_seeds = np.arange(b, dtype=np.int32) if row_seeds is None else _as(row_seeds, np.int32)
    graphdef, params = model if isinstance(model, tuple) else nnx.split(model)
    return graphdef, params, (input_ids, inputs_embeds, _as(prompt_mask, np.bool_), key, row_seeds)


def _as(x, dtype):
    """`x` with `dtype`: device arrays converted on the device, host values kept on the host (the
    programs take them as they are; `jnp.asarray` of a host value runs one more small program)."""
    if isinstance(x, jax.Array):
        return x if x.dtype == dtype else x.astype(dtype)
    return np.asarray(x, dtype)


def generate(model, *, input_ids=None, inputs_embeds=None, prompt_mask=None, config: SamplingConfig,
             insertion: ForcedInsertion | None = None, key: jax.Array | None = None,
             row_seeds=None) -> GenerationOutput:
    """Decode a batch of right-padded prompts with `model` (a LlamaForCausalLM, or its `nnx.split`
    `(graphdef, state)`: a caller that decodes often splits once).

    The prompt is `input_ids [B, Tp]` or `inputs_embeds [B, Tp, D]`, with `prompt_mask [B, Tp]`
    (a prefix of at least one 1 per row; default all ones). `key` and `row_seeds [B]` (default `arange(B)`)
    seed each row's sampling. Returns ids `[B, N]` with `N = output_capacity(config, insertion)`.
    """
    graphdef, params, args = _prepare(model, input_ids, inputs_embeds, prompt_mask, key, row_seeds)
    state = _start_program(graphdef, config, insertion, params, *args)
    state = _advance_program(graphdef, config, insertion, params, state, np.int32(NO_LIMIT))
    return state.output()


def generate_stream(model, *, input_ids=None, inputs_embeds=None, prompt_mask=None, config: SamplingConfig,
                    insertion: ForcedInsertion | None = None, key: jax.Array | None = None, row_seeds=None,
                    chunk_steps: int = 8) -> Iterator[StreamChunk]:
    """`generate`, yielding the ids each row chose during every `chunk_steps` decode steps.

    The last chunk carries the complete `GenerationOutput`, equal to what `generate` returns for
    the same arguments.
    """
    if chunk_steps < 1:
        raise ValueError(f"generate_stream: chunk_steps={chunk_steps}, expected >= 1")
    graphdef, params, args = _prepare(model, input_ids, inputs_embeds, prompt_mask, key, row_seeds)
    state = _start_program(graphdef, config, insertion, params, *args)
    shown = np.zeros(state.lengths.shape, np.int64)
    done = False
    while not done:
        limit = state.step + jnp.int32(chunk_steps)
        state = _advance_program(graphdef, config, insertion, params, state, limit)
        ids, lengths = np.asarray(state.ids), np.asarray(state.lengths)
        new_ids = tuple(ids[r, shown[r]:lengths[r]] for r in range(ids.shape[0]))
        shown = lengths.astype(np.int64)
        done = bool(np.all(np.asarray(state.finished)))
        yield StreamChunk(new_ids=new_ids, output=state.output() if done else None)
