"""The one jitted guided sampler: initial latents -> denoising loop -> VAE decode, in a single XLA program.

Classifier-free guidance concatenates the conditioning as `[uncond, cond]` once and doubles the
latents at every step, so each step is one U-Net call on `2B` rows; the guidance scale is an array
`[B]` (one scale per row; a row with scale ≤ 1 takes the conditional prediction, as diffusers does
without CFG). When every scale is ≤ 1 the program is traced without the unconditional half at all
(`use_cfg=False`, a static choice made on the host). The loop is a `lax.fori_loop` over the
scheduler's steps with its state carried through; nothing runs in Python per step.

`GuidedSampler` compiles that program once per (scheduler, steps, batch, latent and context shapes,
use_cfg) and reports compile time apart from run time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mg5jax import aot
from mg5jax.diffusion.schedulers import Scheduler, SchedulerState

log = logging.getLogger(__name__)


def initial_latents(key: jax.Array, seeds: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Standard-normal latents `[B, *shape]`, row b drawn from `fold_in(key, seeds[b])`, so a row's
    noise depends only on its own seed, not on the batch it is in."""
    return jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(key, s), tuple(shape), jnp.float32))(seeds)


def guided_sample(unet, vae, scheduler: Scheduler, state: SchedulerState, latents: jax.Array, context: jax.Array,
                  guidance: jax.Array, use_cfg: bool) -> jax.Array:
    """Denoise `latents [B, C, h, w]` (unit-variance noise) and decode them to images `[B, H, W, 3]` in [0, 1].

    Traceable (call it inside jit). `context` is `[2B, L, D]` = `[uncond; cond]` when `use_cfg`,
    else the conditional `[B, L, D]`; `guidance [B]` is the per-row scale (used only with CFG).
    """
    x = latents.astype(jnp.float32) * state.init_noise_sigma
    scale = guidance.astype(jnp.float32)[:, None, None, None]

    def body(i, carry):
        state, x = carry
        x_in = scheduler.scale_model_input(state, x, i)
        t = state.timesteps[i]
        if use_cfg:
            eps = unet(jnp.concatenate([x_in, x_in]), t, context).astype(jnp.float32)
            eps_uncond, eps_cond = jnp.split(eps, 2)
            eps = jnp.where(scale > 1, eps_uncond + scale * (eps_cond - eps_uncond), eps_cond)
        else:
            eps = unet(x_in, t, context).astype(jnp.float32)
        return scheduler.step(state, eps, i, x)

    _, x = jax.lax.fori_loop(0, state.timesteps.shape[0], body, (state, x))
    images = vae.decode((x / vae.config.scaling_factor).astype(vae.dtype)).astype(jnp.float32)
    return jnp.transpose(jnp.clip(images / 2 + 0.5, 0.0, 1.0), (0, 2, 3, 1))


def _program(unet_def, vae_def, scheduler, use_cfg, latent_shape, unet_params, vae_params, state, cond, uncond,
             guidance, latents, seeds, key):
    unet, vae = nnx.merge(unet_def, unet_params), nnx.merge(vae_def, vae_params)
    if latents is None:
        latents = initial_latents(key, seeds, latent_shape)
    context = jnp.concatenate([uncond, cond]) if use_cfg else cond
    return guided_sample(unet, vae, scheduler, state, latents, context, guidance, use_cfg)


_sampler_program = aot.Program(_program, static_argnums=(0, 1, 2, 3, 4))


class GuidedSampler:
    """Runs `guided_sample` for a U-Net and VAE; one compiled program per distinct call signature."""

    def __init__(self, unet, vae):
        self.unet_def, self.unet_params = nnx.split(unet)
        self.vae_def, self.vae_params = nnx.split(vae)
        self.unet_config = unet.config
        self.timings: dict[str, float] = {}

    def __call__(
        self,
        scheduler: Scheduler,
        num_inference_steps: int,
        cond: jax.Array,
        uncond: jax.Array | None,
        guidance_scale: float | Sequence[float] | np.ndarray = 7.5,
        *,
        latents: jax.Array | None = None,
        seeds: Sequence[int] | np.ndarray | None = None,
        key: jax.Array | None = None,
        latent_size: tuple[int, int] | None = None,
        wait: bool = True,
    ) -> jax.Array:
        """Images `[B, H, W, 3]` in [0, 1] for conditioning `cond [B, L, D]` (and `uncond`, needed when
        some row's guidance is > 1). Initial noise: `latents [B, C, h, w]`, or drawn per row from
        `seeds [B]` (default 0..B-1) under `key` (default key 0) at `latent_size (h, w)`. `wait=False`
        returns once the program is dispatched (`timings` then hold its compile time only)."""
        b = cond.shape[0]
        guidance = np.broadcast_to(np.asarray(guidance_scale, np.float32), (b,)).copy()
        use_cfg = bool((guidance > 1).any())
        if use_cfg and uncond is None:
            raise ValueError("guidance_scale > 1 needs the unconditional conditioning (uncond)")
        uncond = uncond if use_cfg else None
        channels = self.unet_config.in_channels
        if latents is not None:
            latents = latents if isinstance(latents, jax.Array) else np.asarray(latents, np.float32)
            seeds, latent_shape = None, tuple(latents.shape[1:])
            if latents.shape[0] != b:
                raise ValueError(f"latents have batch {latents.shape[0]}, conditioning has {b}")
        else:
            if latent_size is None:
                latent_size = (self.unet_config.sample_size,) * 2
            latent_shape = (channels, *latent_size)
            seeds = np.asarray(np.arange(b) if seeds is None else seeds, np.uint32)
            if seeds.shape != (b,):
                raise ValueError(f"seeds must have one entry per row ({b}), got shape {tuple(seeds.shape)}")
        key = jax.random.key(0) if key is None else key
        state = scheduler.set_timesteps(num_inference_steps, (b, *latent_shape))
        args = (self.unet_params, self.vae_params, state, cond, uncond, guidance, latents, seeds, key)
        start = time.perf_counter()
        compiled = _sampler_program.compile(self.unet_def, self.vae_def, scheduler, use_cfg, latent_shape, *args)
        compile_s = time.perf_counter() - start
        if not wait:
            self.timings = {"compile_s": compile_s}
            return compiled(*args)
        start = time.perf_counter()
        images = jax.block_until_ready(compiled(*args))
        self.timings = {"compile_s": compile_s, "run_s": time.perf_counter() - start}
        return images
