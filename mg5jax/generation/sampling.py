"""Logits processors and token selection for LLM decoding, with transformers semantics.

Every function is pure and jittable and works on a batch of next-token logits `[B, V]` (fp32).
The order is the one transformers 4.31 `generate` uses: logits processors first (here: an additive
logit bias, then the repetition penalty), then — only when sampling — the warpers temperature →
top-k → top-p, then greedy argmax or a categorical draw.

Which ids count as "seen" for the repetition penalty is a per-row boolean presence mask `[B, V]`
that the decode loop maintains, so the penalty never gathers over a growing id buffer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How next tokens are chosen and when a row stops (hashable: a static argument of the jitted loop).

    The original MiniGPT-5 (REFERENCE §7) decodes with `do_sample=True, top_k=50, top_p=0.9,
    temperature=1.0, repetition_penalty=2.0, max_new_tokens=256, eos_ids=(1,),
    stop_sequences=((835,), (2277, 29937)), seen_ids=(0,)`.
    """

    do_sample: bool = False  # False: greedy argmax (warpers are not applied, as in transformers)
    temperature: float = 1.0  # > 0; logits are divided by it before top-k / top-p
    top_k: int = 0  # keep the k largest logits (ties at the k-th value kept); 0 disables
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p; 1 disables
    repetition_penalty: float = 1.0  # seen ids: logit < 0 -> logit * penalty, else logit / penalty; 1 disables
    penalize_prompt: bool = False  # prompt ids (when the prompt is given as ids) count as seen
    seen_ids: tuple[int, ...] = ()  # ids seen from the start in every row (transformers 4.31 prefixes the
    #                                 sequences of an embeddings prompt with the generation-config BOS id)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (id, bias) added to the raw logits before everything else
    max_new_tokens: int = 32  # sampled tokens per row (forced insertion tokens do not count)
    eos_ids: tuple[int, ...] = ()  # a sampled id in this set ends its row (the id is kept in the output)
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # a row ends when its sampled ids end with one of these
    pad_id: int = 0  # fills the output ids after a row's end

    def __post_init__(self):
        def bad(field, value, expected):
            raise ValueError(f"SamplingConfig.{field}={value!r}: expected {expected}")

        if not self.temperature > 0:
            bad("temperature", self.temperature, "a value > 0 (use do_sample=False for greedy)")
        if self.top_k < 0:
            bad("top_k", self.top_k, "an int >= 0 (0 disables)")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "a value in (0, 1]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", self.repetition_penalty, "a value > 0")
        if self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "an int >= 1")
        if any(len(s) == 0 for s in self.stop_sequences):
            bad("stop_sequences", self.stop_sequences, "non-empty tuples of token ids")

    @property
    def max_stop_length(self) -> int:
        return max((len(s) for s in self.stop_sequences), default=0)


def add_logit_bias(logits: jax.Array, bias: tuple[tuple[int, float], ...]) -> jax.Array:
    """`[B, V] -> [B, V]`: add `bias` values at their ids."""
    if not bias:
        return logits
    ids = jnp.asarray([i for i, _ in bias], jnp.int32)
    values = jnp.asarray([b for _, b in bias], logits.dtype)
    return logits.at[:, ids].add(values)


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """transformers RepetitionPenaltyLogitsProcessor: `[B, V]` logits, `[B, V]` bool presence -> `[B, V]`."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def temperature(logits: jax.Array, value: float) -> jax.Array:
    """transformers TemperatureLogitsWarper: `logits / value`."""
    return logits / value


def _order_keys(logits: jax.Array) -> jax.Array:
    """uint32 keys whose unsigned order is the float order of `logits` (-0.0 and +0.0 equal)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(logits == 0, 0.0, logits), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _kth_largest_key(keys: jax.Array, k: int) -> jax.Array:
    """The k-th largest of each row of `keys [B, V]` (counting repeats): `[B]`. A bisection over the
    32 key bits, each step one count over the row: XLA:CPU sorts a 32000-wide row ~50x slower."""

    def step(_, bounds):
        lo, hi = bounds  # invariant: at least k keys >= lo; fewer than k keys > hi
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        enough = jnp.sum(keys >= mid[:, None], axis=-1) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    b = keys.shape[0]
    bounds = (jnp.zeros((b,), jnp.uint32), jnp.full((b,), 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, step, bounds)[0]


def _top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """`[B, V]` bool: the logits at least as large as the k-th largest of their row."""
    keys = _order_keys(logits)
    return keys >= _kth_largest_key(keys, min(k, logits.shape[-1]))[:, None]


def top_k(logits: jax.Array, k: int) -> jax.Array:
    """transformers TopKLogitsWarper: logits below the k-th largest of their row become -inf."""
    return jnp.where(_top_k_mask(logits, k), logits, NEG_INF)


def top_p(logits: jax.Array, p: float, min_tokens_to_keep: int = 1) -> jax.Array:
    """transformers TopPLogitsWarper: sort ascending, remove tokens whose cumulative probability is
    <= 1 - p, always keeping the `min_tokens_to_keep` most probable ones; removed logits become -inf."""
    order = jnp.argsort(logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= 1 - p
    remove_sorted = remove_sorted.at[..., -min_tokens_to_keep:].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, logits)


MAX_TOP_K_SLOTS = 512  # top_k_top_p orders at most this many kept logits pairwise (top_k <= 256)


def top_k_top_p(logits: jax.Array, k: int, p: float, min_tokens_to_keep: int = 1) -> jax.Array:
    """`top_p(top_k(logits, k), p)` without sorting the vocabulary: top-p runs on the logits top-k
    keeps (k, or more on ties at the k-th value, up to 2k; beyond that, or for k > 256, on the whole
    row). Exactly the same result, 10-25x faster on XLA:CPU at a 32000-token vocabulary."""
    v = logits.shape[-1]
    k = min(k, v)
    cap = min(2 * k, v)
    if cap > MAX_TOP_K_SLOTS:  # the pairwise order of the kept logits would outgrow a sort
        return top_p(top_k(logits, k), p, min_tokens_to_keep)
    keep = _top_k_mask(logits, k)
    filtered = jnp.where(keep, logits, NEG_INF)

    def among_kept():
        b = logits.shape[0]
        rows = jnp.arange(b)[:, None]
        slot = jnp.where(keep, jnp.cumsum(keep, axis=-1) - 1, cap)  # kept ids packed in order; others dropped
        ids = jnp.full((b, cap), v, jnp.int32).at[rows, slot].set(
            jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), (b, v)), mode="drop")  # empty slots: id v
        vals = jnp.take_along_axis(logits, ids, axis=-1, mode="fill", fill_value=NEG_INF)
        # slot j comes at or before slot i in top_p's ascending stable sort (empty slots first)
        before = (vals[:, None, :] < vals[:, :, None]) | (
            (vals[:, None, :] == vals[:, :, None]) & (ids[:, None, :] <= ids[:, :, None]))
        probs = jax.nn.softmax(vals, axis=-1)
        cumulative = jnp.sum(jnp.where(before, probs[:, None, :], 0.0), axis=-1)
        rank = jnp.sum(before, axis=-1) - 1
        remove = (cumulative <= 1 - p) & (rank < cap - min_tokens_to_keep)
        return jnp.full_like(logits, NEG_INF).at[rows, ids].set(jnp.where(remove, NEG_INF, vals), mode="drop")

    fits = jnp.all(jnp.sum(keep, axis=-1) <= cap)
    return jax.lax.cond(fits, among_kept, lambda: top_p(filtered, p, min_tokens_to_keep))


def process_logits(logits: jax.Array, seen: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """All of `cfg`'s processors (and, when sampling, warpers) in transformers order: `[B, V] -> [B, V]`."""
    logits = add_logit_bias(logits.astype(jnp.float32), cfg.logit_bias)
    if cfg.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            logits = temperature(logits, cfg.temperature)
        if cfg.top_k > 0 and cfg.top_p < 1.0:
            logits = top_k_top_p(logits, cfg.top_k, cfg.top_p)
        elif cfg.top_k > 0:
            logits = top_k(logits, cfg.top_k)
        elif cfg.top_p < 1.0:
            logits = top_p(logits, cfg.top_p)
    return logits


def choose_tokens(logits: jax.Array, keys: jax.Array, do_sample: bool) -> jax.Array:
    """Processed logits `[B, V]` and one key per row `[B]` -> token ids `[B]` int32.

    Each row draws with its own key, so a row's sample does not depend on the rest of the batch.
    """
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
