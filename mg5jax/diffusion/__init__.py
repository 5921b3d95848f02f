"""Diffusion: noise schedules and schedulers, the jitted guided sampler, the Stable Diffusion pipeline."""

from mg5jax.diffusion.schedulers import NoiseSchedule, make_scheduler

__all__ = ["NoiseSchedule", "StableDiffusionPipeline", "make_scheduler"]


def __getattr__(name: str):
    # the pipeline pulls in the U-Net, VAE, CLIP and transformers' tokenizer: import it on first use only
    if name == "StableDiffusionPipeline":
        from mg5jax.diffusion.pipeline import StableDiffusionPipeline

        return StableDiffusionPipeline
    raise AttributeError(f"module 'mg5jax.diffusion' has no attribute {name!r}")
