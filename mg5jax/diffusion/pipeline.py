"""Stable Diffusion text-to-image from a local diffusers directory, on the one jitted guided sampler.

    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-2-1-base", param_dtype=jnp.bfloat16)
    images = pipe(prompt=["a photo of a cat"], num_inference_steps=50, guidance_scale=7.5)   # [B, H, W, 3]

It behaves as diffusers' `StableDiffusionPipeline` with `output_type="np"`: prompts are tokenized to
77 tokens and encoded without an attention mask (unless the text encoder's config asks for one);
with guidance the negative conditioning defaults to the encoding of "" ; the initial noise is scaled
by the scheduler's `init_noise_sigma`; images are `decode(latents / scaling_factor) / 2 + 0.5`
clipped to [0, 1]. Initial noise differs from diffusers' (JAX PRNG, one stream per row's seed), so
pass `latents` to reproduce a diffusers run exactly.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mg5jax.data.tokenization import load_hf_tokenizer
from mg5jax.diffusion.sampler import GuidedSampler
from mg5jax.diffusion.schedulers import Scheduler, make_scheduler
from mg5jax.models.clip_text import CLIPTextModel, encode_prompts
from mg5jax.models.unet import UNet2DConditionModel
from mg5jax.models.vae import AutoencoderKL

log = logging.getLogger(__name__)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, params, ids, mask):
    return nnx.merge(graphdef, params)(ids, mask).astype(jnp.float32)


class StableDiffusionPipeline:
    """U-Net + VAE + CLIP text encoder + tokenizer + a scheduler config, sampling with `GuidedSampler`."""

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel | None,
                 tokenizer, scheduler_config: dict, *, use_attention_mask: bool = False):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.use_attention_mask = use_attention_mask
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.sampler = GuidedSampler(unet, vae)
        self._schedulers: dict[str, Scheduler] = {}
        self._text_params = nnx.split(text_encoder) if text_encoder is not None else None

    @classmethod
    def from_pretrained(cls, sd_dir: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                        mesh: jax.sharding.Mesh | None = None) -> StableDiffusionPipeline:
        """Load `unet/ vae/ text_encoder/ tokenizer/ scheduler/` of a local diffusers directory
        (safetensors or .bin weights); `mesh` shards every part's parameters by their logical names."""
        from transformers.models.clip.tokenization_clip import CLIPTokenizer  # the class: no torch

        root = pathlib.Path(sd_dir)
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not (root / part).is_dir():
                raise FileNotFoundError(f"{root}: no {part}/ folder (expected a diffusers Stable Diffusion directory)")
        kw = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh)
        text_config = json.loads((root / "text_encoder" / "config.json").read_text())
        return cls(
            unet=UNet2DConditionModel.from_pretrained(root / "unet", **kw),
            vae=AutoencoderKL.from_pretrained(root / "vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", **kw),
            tokenizer=load_hf_tokenizer(CLIPTokenizer, root / "tokenizer", "CLIP"),
            scheduler_config=json.loads((root / "scheduler" / "scheduler_config.json").read_text()),
            use_attention_mask=bool(text_config.get("use_attention_mask", False)),
        )  # fmt: skip

    def scheduler(self, name: str) -> Scheduler:
        """The named scheduler ('pndm', 'ddim', 'dpm++2m', 'euler') built from this model's scheduler config."""
        if name not in self._schedulers:
            self._schedulers[name] = make_scheduler(name, self.scheduler_config)
        return self._schedulers[name]

    def encode_prompt(self, texts: str | Sequence[str]) -> jax.Array:
        """CLIP text features `[B, 77, D]` (fp32) of prompts, as the SD pipeline computes them."""
        if self._text_params is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds instead of prompt")
        ids, mask = encode_prompts(self.tokenizer, texts)
        return _encode(*self._text_params, jnp.asarray(ids), jnp.asarray(mask) if self.use_attention_mask else None)

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        prompt_embeds: jax.Array | np.ndarray | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_embeds: jax.Array | np.ndarray | None = None,
        latents: jax.Array | np.ndarray | None = None,
        seed: int | Sequence[int] = 0,
        num_inference_steps: int = 50,
        guidance_scale: float | Sequence[float] = 7.5,
        scheduler: str = "pndm",
        height: int | None = None,
        width: int | None = None,
    ) -> np.ndarray:
        """Images `[B, H, W, 3]` float32 in [0, 1].

        Conditioning: `prompt` (text) or `prompt_embeds [B, 77, D]`. Guidance: a scale or one per row;
        rows with scale ≤ 1 are conditional-only and when all are, no unconditional pass is traced.
        Noise: `latents [B, 4, H/8, W/8]`, else row b uses seed `seed + b` (or `seed[b]`).
        """
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        cond = self.encode_prompt(prompt) if prompt is not None else jnp.asarray(prompt_embeds, jnp.float32)
        b = cond.shape[0]
        guidance = np.broadcast_to(np.asarray(guidance_scale, np.float32), (b,))
        uncond = None
        if (guidance > 1).any():
            if negative_prompt_embeds is not None:
                uncond = jnp.asarray(negative_prompt_embeds, jnp.float32)
            else:
                negative = [""] * b if negative_prompt is None else negative_prompt
                uncond = self.encode_prompt([negative] * b if isinstance(negative, str) else negative)
            if uncond.shape != cond.shape:
                raise ValueError(f"negative conditioning {tuple(uncond.shape)} does not match {tuple(cond.shape)}")
        seeds = np.asarray(seed, np.int64)
        seeds = seeds + np.arange(b) if seeds.ndim == 0 else seeds
        default = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default, width or default
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        f = self.vae_scale_factor
        images = self.sampler(self.scheduler(scheduler), num_inference_steps, cond, uncond, guidance, latents=latents,
                              seeds=seeds.astype(np.uint32), latent_size=(height // f, width // f))
        log.info("pipeline: %d image(s) %dx%d, compile %.2f s, run %.2f s", b, height, width,
                 self.sampler.timings["compile_s"], self.sampler.timings["run_s"])  # fmt: skip
        return np.asarray(images)
