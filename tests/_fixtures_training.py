"""A toy model with the trainer's `loss(batch, rng)` boundary, its trainable rules, and a
deterministic resumable data iterator (shared by the optimizer / checkpoint / trainer tests)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mg5jax.models import layers

VOCAB, DIM, HIDDEN = 16, 8, 16
VOKEN_ROWS = slice(12, 16)  # the "new token" rows of the embedding that may move

RULES = (
    (r"embed", 1.0),  # row-masked like the LLM's voken rows
    (r"head\..*", 10.0),  # like fc / mapper (×10 lr)
    (r"norm\..*", 1.0),
    (r"backbone\..*", None),  # frozen, like the pretrained parts
)


class ToyModel(nnx.Module):
    """ids [B], x [B, 8], y [B, 8] -> loss terms; `backbone` plays the frozen pretrained part."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (VOCAB, DIM)), out_sharding=("vocab", "embed"))
        self.norm = layers.LayerNorm(DIM)
        self.backbone = layers.linear(DIM, HIDDEN, ("embed", "mlp"), rngs=rngs)
        self.head = layers.linear(HIDDEN, DIM, ("mlp", "embed"), rngs=rngs)

    def loss(self, batch, rng):
        h = self.embed[...][batch["ids"]] + batch["x"]
        pred = self.head(jax.nn.gelu(self.backbone(self.norm(h))))
        text = jnp.mean(jnp.square(pred - batch["y"]))
        image = jnp.mean(jnp.square(pred - 0.5 * batch["y"] + 0.1 * jax.random.normal(rng, pred.shape)))
        caption = 0.1 * jnp.mean(jnp.square(pred))
        return {"loss": text + image + caption, "text_loss": text, "image_loss": image, "caption_loss": caption}


def voken_row_mask() -> np.ndarray:
    mask = np.zeros((VOCAB, 1), np.float32)
    mask[VOKEN_ROWS] = 1.0
    return mask


def make_batch(index: int, batch_size: int = 8) -> dict[str, np.ndarray]:
    r = np.random.default_rng(index)
    return {
        "ids": r.integers(0, VOCAB, (batch_size,)).astype(np.int32),
        "x": r.normal(size=(batch_size, DIM)).astype(np.float32),
        "y": r.normal(size=(batch_size, DIM)).astype(np.float32),
    }


class ToyIterator:
    """Batch i is a pure function of i; `nan_at` poisons one batch. Has grain's get/set_state."""

    def __init__(self, batch_size: int = 8, nan_at: int | None = None):
        self.batch_size = batch_size
        self.nan_at = nan_at
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = make_batch(self.index, self.batch_size)
        if self.index == self.nan_at:
            batch["x"][0, 0] = np.nan
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])
