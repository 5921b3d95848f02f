"""mg5jax: MiniGPT-5 (interleaved image-and-text generation with generative vokens) in JAX / Flax NNX."""

import flax

# Variables carry logical axis names; mg5jax places them on a mesh explicitly (mg5jax.parallel),
# never at construction time.
flax.config.update("flax_always_shard_variable", False)
