"""mg5jax: MiniGPT-5 (interleaved image-and-text generation with generative vokens) in JAX / Flax NNX."""

import importlib.metadata
import os
import sys

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _xla_cpu_defaults() -> None:
    """Let XLA:CPU hand only reductions to YNNPACK. By default it also takes the convolutions,
    where it is up to 2.3x slower than XLA's own kernels at the U-Net's and VAE's shapes
    (benchmarks/sd_sampler.py at batch 4: 0.96x -> 1.09x torch; the train step 12% faster).
    Takes effect only if JAX has not started its backends yet; never overrides a user's own setting
    of the flag, and only for the jaxlib releases known to have it (an unknown flag aborts XLA)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG in flags:
        return
    if "jax" in sys.modules:  # XLA reads its flags once: after that the setting would only mislabel programs
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return
    try:
        release = tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return
    if (0, 10) <= release < (0, 12):
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=reduce".strip()


_xla_cpu_defaults()

import flax  # noqa: E402

# Variables carry logical axis names; mg5jax places them on a mesh explicitly (mg5jax.parallel),
# never at construction time.
flax.config.update("flax_always_shard_variable", False)
