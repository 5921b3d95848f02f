"""LLM decoding: logits processors (`sampling`) and the jitted KV-cache decode loop with forced
voken insertion (`decode`)."""

from mg5jax.generation.decode import (
    ForcedInsertion,
    GenerationOutput,
    StreamChunk,
    generate,
    generate_stream,
    output_capacity,
)
from mg5jax.generation.sampling import SamplingConfig

__all__ = [
    "ForcedInsertion",
    "GenerationOutput",
    "SamplingConfig",
    "StreamChunk",
    "generate",
    "generate_stream",
    "output_capacity",
]
