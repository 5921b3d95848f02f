"""The jitted guided sampler and StableDiffusionPipeline against diffusers' StableDiffusionPipeline on the
tiny SD-2.1-shaped model: PNDM and DDIM with CFG, the prompt (tokenizer) path, the no-CFG program,
per-row guidance and per-row seeds.

Sampler programs compiled here (the expensive part): PNDM B=2 CFG, DDIM B=2 CFG, PNDM B=1 CFG, PNDM B=1
without CFG (the last two from seeds)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fixtures_sd import tiny_sd_dir  # noqa: F401  (session fixture)

from mg5jax.diffusion import StableDiffusionPipeline
from mg5jax.diffusion import sampler as sampler_lib
from mg5jax.diffusion.sampler import initial_latents

pytestmark = pytest.mark.xdist_group("sd")

STEPS, SIZE, LATENT = 10, 64, (4, 8, 8)
TOL = 2e-3


@pytest.fixture(scope="module")
def pipes(tiny_sd_dir):  # noqa: F811
    import torch
    from diffusers import StableDiffusionPipeline as TorchPipeline

    # the reference's tiny ops run 5-10x faster single-threaded on a shared 2-core machine (no OpenMP spinning)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch_pipe = TorchPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None, local_files_only=True)
    torch_pipe.set_progress_bar_config(disable=True)
    yield torch_pipe, StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    cond, uncond = (rng.standard_normal((2, 77, 32)).astype(np.float32) for _ in range(2))
    # the noise our seed path draws for seeds 0 and 1, so the seed path can be checked against diffusers
    latents = np.array(initial_latents(jax.random.key(0), jnp.arange(2, dtype=jnp.uint32), LATENT))
    return cond, uncond, latents


def _diffusers(torch_pipe, scheduler, guidance, latents, **conditioning):
    import torch
    from diffusers import DDIMScheduler, PNDMScheduler

    cls = {"pndm": PNDMScheduler, "ddim": DDIMScheduler}[scheduler]
    torch_pipe.scheduler = cls.from_config(torch_pipe.scheduler.config)
    conditioning = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in conditioning.items()}
    return torch_pipe(latents=torch.from_numpy(latents), num_inference_steps=STEPS, guidance_scale=guidance,
                      height=SIZE, width=SIZE, output_type="np", **conditioning).images  # fmt: skip


def _check(ours, ref, what):
    chex.assert_shape(ours, (ref.shape[0], SIZE, SIZE, 3))
    assert ours.dtype == np.float32
    err = np.abs(ours - ref).max()
    inside = ((ref > 0.01) & (ref < 0.99)).mean()
    print(f"{what}: max-abs {err:.2e} ({inside:.0%} of pixels unclipped)")
    assert inside > 0.3, "the reference images are saturated: the comparison would be vacuous"
    assert err <= TOL


@pytest.mark.parametrize("scheduler", ["pndm", "ddim"])
def test_pipeline_matches_diffusers_with_cfg(pipes, inputs, scheduler):
    torch_pipe, pipe = pipes
    cond, uncond, latents = inputs
    ref = _diffusers(torch_pipe, scheduler, 7.5, latents, prompt_embeds=cond, negative_prompt_embeds=uncond)
    ours = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents, num_inference_steps=STEPS,
                guidance_scale=7.5, scheduler=scheduler)  # fmt: skip
    _check(ours, ref, f"{scheduler} CFG 7.5")
    assert pipe.sampler.timings["run_s"] > 0


def test_prompt_through_the_tokenizer(pipes, inputs):
    torch_pipe, pipe = pipes
    prompts = ["a photo of a cat sitting on a table", "two dogs running across a green field"]
    ref = _diffusers(torch_pipe, "pndm", 7.5, inputs[2], prompt=prompts)
    ours = pipe(prompt=prompts, latents=inputs[2], num_inference_steps=STEPS, guidance_scale=7.5)
    _check(ours, ref, "prompt= text, negative ''")


def test_no_guidance_runs_the_conditional_batch_only(pipes, inputs):
    """guidance ≤ 1: no unconditional conditioning is needed or traced; equals diffusers' conditional-only
    loop; the seed path draws the same noise as `initial_latents`."""
    torch_pipe, pipe = pipes
    cond, _, latents = inputs
    before = set(sampler_lib._sampler_program._by_id)
    ours = pipe(prompt_embeds=cond[1:], seed=1, num_inference_steps=STEPS, guidance_scale=1.0)
    ref = _diffusers(torch_pipe, "pndm", 1.0, latents[1:], prompt_embeds=cond[1:])
    _check(ours, ref, "guidance 1.0 (no CFG), seed 1")
    # the program this call used (static args: unet, vae, scheduler, use_cfg, latent shape) has no CFG
    held = sampler_lib._sampler_program._by_id
    new = [held[k][0] for k in set(held) - before] or [static for static, _ in held.values()][-1:]
    assert [static[3] for static in new] == [False]


def test_per_row_guidance_equals_rows_run_separately(pipes, inputs):
    _, pipe = pipes
    cond, uncond, latents = inputs
    both = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents, num_inference_steps=STEPS,
                guidance_scale=[7.5, 1.0])  # fmt: skip
    first = pipe(prompt_embeds=cond[:1], negative_prompt_embeds=uncond[:1], seed=0, num_inference_steps=STEPS,
                 guidance_scale=7.5)  # fmt: skip
    second = pipe(prompt_embeds=cond[1:], seed=1, num_inference_steps=STEPS, guidance_scale=1.0)
    err = max(np.abs(both[:1] - first).max(), np.abs(both[1:] - second).max())
    print(f"per-row guidance [7.5, 1.0] vs rows alone: max-abs {err:.2e}")
    assert err <= 1e-5
    assert np.abs(both[0] - both[1]).max() > 0.05


def test_row_noise_depends_only_on_its_seed():
    key = jax.random.key(0)
    batch = np.asarray(initial_latents(key, jnp.array([3, 7], jnp.uint32), LATENT))
    alone = np.asarray(initial_latents(key, jnp.array([7], jnp.uint32), LATENT))
    np.testing.assert_array_equal(batch[1], alone[0])
    assert abs(batch.std() - 1) < 0.1 and np.abs(batch[0] - batch[1]).max() > 1


def test_argument_errors(pipes, inputs):
    _, pipe = pipes
    cond, uncond, _ = inputs
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds"):
        pipe(prompt="a cat", prompt_embeds=cond)
    with pytest.raises(ValueError, match="does not match"):
        pipe(prompt_embeds=cond, negative_prompt_embeds=uncond[:1], guidance_scale=7.5)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe(prompt_embeds=cond, guidance_scale=1.0, height=60)
