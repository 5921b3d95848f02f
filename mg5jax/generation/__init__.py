"""Generation: logits processors (`sampling`), the jitted KV-cache decode loop with forced voken
insertion (`decode`), and interleaved text-and-image responses of a MiniGPT-5 model (`interleaved`)."""

from mg5jax.generation.decode import (
    ForcedInsertion,
    GenerationOutput,
    StreamChunk,
    generate,
    generate_stream,
    output_capacity,
)
from mg5jax.generation.sampling import SamplingConfig

_INTERLEAVED = ("GenerationSettings", "InterleavedGenerator", "Prompt", "Response")


def __getattr__(name: str):
    """The interleaved generator's names, imported when first asked for (they bring the whole model stack)."""
    if name in _INTERLEAVED:
        from mg5jax.generation import interleaved

        return getattr(interleaved, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ForcedInsertion",
    "GenerationOutput",
    "GenerationSettings",
    "InterleavedGenerator",
    "Prompt",
    "Response",
    "SamplingConfig",
    "StreamChunk",
    "generate",
    "generate_stream",
    "output_capacity",
]
