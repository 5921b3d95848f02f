"""MiniGPT-5: the LLM with generative vokens, the input-image encoder, the voken feature mapper and
the frozen Stable Diffusion parts, composed into the training objective.

Shapes: B batch, T text bucket, M input-image slots, Q image tokens per input image (32),
L = 1 + T + (Q-1)·M spliced length, D LLM width, G voken groups per sample, S = B·G voken groups per batch
sent to the U-Net (static), W voken window (8), C conditioning width (1024), N conditioning tokens (77).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mg5jax.data.images import clip_normalize_table
from mg5jax.data.tokenization import IGNORE_INDEX
from mg5jax.diffusion import schedulers
from mg5jax.models.clip_text import CLIPTextModel
from mg5jax.models.llama import LlamaForCausalLM
from mg5jax.models.mapper import VokenMapper
from mg5jax.models.unet import UNet2DConditionModel
from mg5jax.models.vae import AutoencoderKL, DiagonalGaussian
from mg5jax.models.vision import VisionEncoder


class Buffer(nnx.Variable):
    """A constant the model carries (never trained, never checkpointed)."""


@dataclasses.dataclass(frozen=True)
class MiniGPT5Config:
    """How the parts are wired and weighted (REFERENCE §1.6–1.7, §4)."""

    voken_ids: tuple[int, ...]  # [IMG0] … [IMG{n-1}]
    image_placeholder_id: int  # <ImageHere>
    bos_id: int = 1  # the tokenizer's <s>, embedded first in every sequence
    num_query_tokens: int = 32  # LLM positions per input image
    groups_per_sample: int = 1  # G: voken groups searched per sample
    text_loss_weight: float = 0.01
    image_loss_weight: float = 1.0
    caption_loss_weight: float = 0.1  # 0 disables the caption loss (stage 2)
    cfg_drop: float = 0.1  # probability of replacing a voken group by zeros (classifier-free guidance)
    snr_gamma: float | None = 5.0  # min-SNR-γ weighting of the latent loss; None = plain MSE
    loss_group_rows: int = 0  # rows whose loss is one mean, then averaged over groups (the original's
    #                           per-GPU batch under DDP, 2); 0 = one mean over the whole batch

    @property
    def num_vokens(self) -> int:
        return len(self.voken_ids)


class MiniGPT5(nnx.Module):
    """The composition. `loss(batch, rng)` is the whole training objective."""

    # the image terms of a batch are means over its loss groups with an image: averaged over batches
    # (validation, a metrics line), each counts by that number, a batch without images not at all
    weighted_terms = {"image_loss": "image_groups", "caption_loss": "image_groups"}

    def __init__(
        self,
        config: MiniGPT5Config,
        *,
        llm: LlamaForCausalLM,
        mapper: VokenMapper,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        noise_schedule: schedulers.NoiseSchedule,
        vision: VisionEncoder | None = None,
        text_encoder: CLIPTextModel | None = None,
        empty_text_feature: jax.Array | None = None,
    ):
        self.config = config
        self.llm = llm
        self.vision = vision
        self.mapper = mapper
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.alphas_cumprod = Buffer(jnp.asarray(noise_schedule.alphas_cumprod, jnp.float32))
        self.empty_text_feature = (
            Buffer(jnp.asarray(empty_text_feature, jnp.float32)) if empty_text_feature is not None else None
        )

    # ----------------------------------------------------------------------------------------- inputs

    def image_embeddings(self, batch: dict) -> jax.Array:
        """Input-image embeddings `[B, M, Q, D]` from pixels (frozen encoder) or precomputed features."""
        return embed_images(self.vision, batch, self.llm.dtype)

    def splice(self, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Embed `<s>` + text with each `<ImageHere>` replaced by its image's Q embeddings.

        Returns `inputs_embeds [B,L,D]`, `attention_mask [B,L]`, `labels [B,L]` (−100 on `<s>`, image
        and padding positions). Static shapes: every row is laid out in `L = 1 + T + (Q-1)·M`.
        """
        return splice_inputs(batch, self.config, self.llm.embed, self.image_embeddings(batch))

    # ---------------------------------------------------------------------------------------- vokens

    def voken_windows(self, hidden: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """For the first G `[IMG0]` of each row at position p: hidden states p−1 … p+W−2.

        Returns `windows [B,G,W,D]` and `found [B,G]`. The first vector is the hidden state that
        predicts `[IMG0]`; the last voken's state is not used (REFERENCE §4.1).
        """
        g, w = self.config.groups_per_sample, self.config.num_vokens
        starts, found = jax.vmap(
            lambda lab: _first_positions(lab == self.config.voken_ids[0], g))(labels)
        idx = jnp.clip(starts[:, :, None] - 1 + jnp.arange(w), 0, hidden.shape[1] - 1)  # [B, G, W]
        windows = jax.vmap(lambda h, i: h[i])(hidden, idx)
        return windows, found

    def conditioning(self, windows: jax.Array, drop: jax.Array | None = None) -> jax.Array:
        """Voken windows `[S,W,D]` → U-Net conditioning `[S,N,C]`; dropped groups use zeros."""
        return map_vokens(self.mapper, windows, drop)

    def draw_cfg_drop(self, key: jax.Array, n: int) -> jax.Array:
        """Which of `n` voken groups are replaced by zeros: independent draws with p = `cfg_drop`."""
        return jax.random.bernoulli(key, self.config.cfg_drop, (n,))

    def uncond_conditioning(self, n: int) -> jax.Array:
        """The classifier-free-guidance negative: the mapped all-zero voken window, `[n,N,C]`."""
        return uncond_vokens(self.mapper, n, self.config.num_vokens, self.llm.config.hidden_size)

    def encode_captions(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Frozen CLIP-text features of captions (with their attention mask, as the original)."""
        return self.text_encoder(ids, attention_mask=mask).astype(jnp.float32)

    # ------------------------------------------------------------------------------------------ loss

    def loss(
        self,
        batch: dict,
        rng: jax.Array,
        *,
        cfg_drop: jax.Array | None = None,
        noise: jax.Array | None = None,
        timesteps: jax.Array | None = None,
        posterior_noise: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """The MiniGPT-5 objective on a batch (layout in `mg5jax.data.pipeline`).

        `cfg_drop [S]`, `noise [S,4,h,w]`, `timesteps [S]` and `posterior_noise [S,4,h,w]` override the
        random draws (for parity tests). Returns fp32 scalars `loss`, `text_loss`, `image_loss` and,
        when the caption loss is enabled, `caption_loss`: each a mean within every group of
        `loss_group_rows` rows, then over the groups (the image terms over the groups with an image,
        whose number is `image_groups`).
        """
        cfg = self.config
        k_drop, k_post, k_noise, k_t = jax.random.split(rng, 4)
        embeds, att, labels = self.splice(batch)
        out = self.llm(inputs_embeds=embeds, attention_mask=att)
        b = labels.shape[0]
        # loss groups; every term below is a mean within a group, then over groups. A batch that is not
        # a whole number of groups (a short last validation batch) takes the largest size that divides it
        rows = math.gcd(cfg.loss_group_rows, b) if cfg.loss_group_rows else b
        n = b // rows
        text_loss = _causal_lm_loss(out.logits, labels, n)  # [n]

        windows, found = self.voken_windows(out.hidden_states, labels)  # [B,G,W,D], [B,G]
        g = found.shape[1]
        # every group goes to the U-Net in place (S = B·G, group s is sample s // G); groups without a
        # target image are masked out of the means. No gather: S stays split like the batch
        s = b * g
        valid = (found & batch["output_image_mask"][:, :g]).reshape(s)  # [S]
        n_valid = valid.reshape(n, -1).sum(axis=1)  # [n]
        windows = windows.reshape(s, *windows.shape[2:])
        if cfg_drop is None:
            cfg_drop = self.draw_cfg_drop(k_drop, s)
        cond = self.conditioning(windows, cfg_drop)  # [S, N, C]

        latents = self._target_latents(batch, g, k_post, posterior_noise)  # [S, 4, h, w]
        if noise is None:
            noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        if timesteps is None:
            timesteps = jax.random.randint(k_t, (s,), 0, self.alphas_cumprod.shape[0])
        noisy = schedulers.add_noise(self.alphas_cumprod[...], latents, noise, timesteps)
        pred = self.unet(noisy, timesteps, cond)
        per_group = jnp.mean(jnp.square(pred.astype(jnp.float32) - noise), axis=(1, 2, 3))
        if cfg.snr_gamma is not None:
            per_group = per_group * schedulers.min_snr_weights(self.alphas_cumprod[...], timesteps, cfg.snr_gamma)

        def group_mean(per_voken_group):  # [S] -> [n], over the valid voken groups of each loss group
            return jnp.where(valid, per_voken_group, 0.0).reshape(n, -1).sum(axis=1) / jnp.maximum(n_valid, 1)

        image_loss = group_mean(per_group)
        terms = {"text_loss": text_loss, "image_loss": image_loss}
        voken_terms = cfg.image_loss_weight * image_loss
        if cfg.caption_loss_weight > 0:
            ids, mask = (jnp.repeat(batch[k], g, axis=0) for k in ("caption_ids", "caption_mask"))
            target = self.encode_captions(ids, mask)
            target = jnp.where(cfg_drop[:, None, None], self.empty_text_feature[...][None], target)
            use_caption = jnp.all(batch["has_caption"].reshape(n, rows), axis=1)  # only if no caption is missing
            caption_loss = jnp.where(use_caption, group_mean(jnp.mean(jnp.square(cond - target), axis=(1, 2))), 0.0)
            terms["caption_loss"] = caption_loss
            voken_terms = voken_terms + cfg.caption_loss_weight * caption_loss
        text_term = cfg.text_loss_weight * text_loss
        terms["loss"] = jnp.where(n_valid > 0, text_term + voken_terms, text_term)
        # the image terms are reported over the groups that have an image (the others add none to the loss)
        image_groups = jnp.sum(n_valid > 0)
        out = {k: jnp.sum(v) / jnp.maximum(image_groups, 1) if k in self.weighted_terms else jnp.mean(v)
               for k, v in terms.items()}
        return dict(out, image_groups=image_groups.astype(jnp.float32))

    def _target_latents(self, batch, g, key, posterior_noise) -> jax.Array:
        """Scaled VAE latents of the first G target images of every sample `[B·G,4,h,w]` (posterior samples)."""
        if "output_moments" in batch:
            moments = batch["output_moments"]
            moments = moments[:, :g].reshape(-1, *moments.shape[2:])
            dist = DiagonalGaussian.from_moments(moments.astype(jnp.float32))
        else:
            images = batch["output_images"]
            images = images[:, :g].reshape(-1, *images.shape[2:])
            dist = self.vae.encode(images)
        if posterior_noise is None:
            latents = dist.sample(key)
        else:
            latents = dist.mean.astype(jnp.float32) + dist.std.astype(jnp.float32) * posterior_noise
        return latents * self.vae.config.scaling_factor


def _first_positions(flags: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Indices of the first `n` True entries of a 1-D mask (padded with 0) and which are real."""
    (idx,) = jnp.nonzero(flags, size=n, fill_value=0)
    return idx.astype(jnp.int32), jnp.arange(n) < jnp.sum(flags)


def _causal_lm_loss(logits: jax.Array, labels: jax.Array, groups: int) -> jax.Array:
    """Shifted cross-entropy (logits[t] predicts labels[t+1]), fp32: the mean over supervised tokens
    of each of `groups` equal row groups `[groups]`."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(supervised, targets, 0))
    total = jnp.where(supervised, ce, 0.0).reshape(groups, -1).sum(axis=1)
    return total / jnp.maximum(supervised.reshape(groups, -1).sum(axis=1), 1)


def embed_images(vision: VisionEncoder | None, batch: dict, dtype) -> jax.Array:
    """Input-image embeddings `[B, M, Q, D]` in `dtype`: precomputed `input_image_features`, or
    `input_images [B, M, 3, H, W]` through the vision encoder, CLIP-normalized float32 or uint8 pixels
    (resized and cropped; normalized here to exactly the values `input_image_transform` gives on the host)."""
    if "input_image_features" in batch:
        return batch["input_image_features"].astype(dtype)
    pixels = batch["input_images"]
    b, m = pixels.shape[:2]
    if vision is None:
        raise ValueError("batch has input_images but the model has no vision encoder")
    if pixels.dtype == jnp.uint8:
        pixels = jnp.asarray(clip_normalize_table())[jnp.arange(3)[:, None, None], pixels]
    feats = vision(pixels.reshape(b * m, *pixels.shape[2:]))
    return feats.reshape(b, m, *feats.shape[1:]).astype(dtype)


def splice_inputs(batch: dict, config: MiniGPT5Config, embed: Callable[[jax.Array], jax.Array],
                  image_embeds: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`MiniGPT5.splice` given the LLM's token embedding (`[B, T]` ids → `[B, T, D]`) and the images'
    embeddings `[B, M, Q, D]`."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    b, t = ids.shape
    q = config.num_query_tokens
    m = image_embeds.shape[1]
    length = 1 + t + (q - 1) * m
    text_embeds = embed(ids)  # [B, T, D]
    bos = embed(jnp.full((b, 1), config.bos_id, jnp.int32))

    is_slot = (ids == config.image_placeholder_id) & (mask > 0)
    slots_before = jnp.cumsum(is_slot, axis=1) - is_slot
    out_pos = 1 + jnp.arange(t)[None] + (q - 1) * slots_before  # [B, T]
    text_pos = jnp.where(is_slot, length, out_pos)  # slot tokens themselves are dropped
    slot_start = jnp.full((b, m), length, jnp.int32)
    slot_start = jax.vmap(lambda s, idx, pos: s.at[idx].set(pos, mode="drop"))(
        slot_start, jnp.where(is_slot, slots_before, m), out_pos)
    image_pos = (slot_start[:, :, None] + jnp.arange(q)).reshape(b, m * q)  # [B, M·Q]

    def row(bos_e, txt_e, img_e, tpos, ipos, tmask, tlab):
        emb = jnp.zeros((length, txt_e.shape[-1]), txt_e.dtype).at[0].set(bos_e[0])
        emb = emb.at[tpos].set(txt_e, mode="drop").at[ipos].set(img_e, mode="drop")
        att = jnp.zeros((length,), jnp.int32).at[0].set(1)
        att = att.at[tpos].set(tmask, mode="drop").at[ipos].set(1, mode="drop")
        lab = jnp.full((length,), IGNORE_INDEX, jnp.int32).at[tpos].set(tlab, mode="drop")
        return emb, att, lab

    embeds, att, lab = jax.vmap(row)(
        bos, text_embeds, image_embeds.reshape(b, m * q, image_embeds.shape[-1]), text_pos, image_pos, mask, labels)
    chex.assert_shape(embeds, (b, length, text_embeds.shape[-1]))
    return embeds, att, lab


def map_vokens(mapper: VokenMapper, windows: jax.Array, drop: jax.Array | None = None) -> jax.Array:
    """Voken windows `[S,W,D]` → U-Net conditioning `[S,N,C]`; dropped groups (`drop [S]`) use zeros."""
    windows = windows.astype(jnp.float32)
    if drop is not None:
        windows = jnp.where(drop[:, None, None], 0.0, windows)
    return mapper(windows)


def uncond_vokens(mapper: VokenMapper, n: int, window: int, dim: int) -> jax.Array:
    """The classifier-free-guidance negative `[n,N,C]`: the mapped all-zero voken window `[window, dim]`."""
    return map_vokens(mapper, jnp.zeros((n, window, dim), jnp.float32))


class PromptEncoder(nnx.Module):
    """A MiniGPT5's prompt side alone, sharing its weights: the LLM's token embedding and the input-image
    encoder. `splice(batch)` is `MiniGPT5.splice`; a program that only splices takes this small graph
    (no LLM layers, U-Net or VAE to key and pass)."""

    def __init__(self, model: MiniGPT5):
        self.config = model.config
        self.embed_tokens = model.llm.model.embed_tokens
        self.vision = model.vision
        self.dtype = model.llm.dtype

    def splice(self, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        return splice_inputs(batch, self.config, self.embed_tokens, embed_images(self.vision, batch, self.dtype))
