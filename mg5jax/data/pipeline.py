"""From dataset samples to static-shape training batches, with grain.

A `Sample` (source/target strings, image paths) becomes an example of numpy arrays — tokenized
ids and labels as the original builds them, transformed input and output images (or precomputed
features) — and examples become batches padded to a length bucket and a fixed number of images,
so the jitted train step sees only a few distinct shapes.

Batch layout (B = batch size, T = text bucket, M = max input images, G = max output images):
  input_ids [B,T] int32 (pad id), attention_mask [B,T] int32, labels [B,T] int32 (-100 = no loss)
  input_images [B,M,3,224,224] f32 | input_image_features [B,M,Q,D_llm] f32, input_image_mask [B,M] bool
  output_images [B,G,3,512,512] f32 in [-1,1] | output_moments [B,G,8,64,64] f32, output_image_mask [B,G] bool
  caption_ids [B,77] int32, caption_mask [B,77] int32, has_caption [B] bool
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pathlib
from collections.abc import Callable, Sequence

import grain
import jax
import numpy as np

from mg5jax.data import images as image_ops
from mg5jax.data.datasets import DataError, Sample, load_json
from mg5jax.data.tokenization import IGNORE_INDEX, MiniGPT5Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """Static shapes of a batch."""

    batch_size: int
    length_buckets: tuple[int, ...] = (128, 256, 512)  # text tokens (source + target, no BOS)
    max_input_images: int = 5  # M: <ImageHere> slots per sample (a VIST story has 5 steps)
    max_output_images: int = 1  # G: target images per sample
    input_image_size: int = 224
    output_image_size: int = 512
    caption_length: int = 77
    num_query_tokens: int = 32  # Q: LLM positions per input image (for precomputed features)
    llm_dim: int = 4096  # D_llm (for precomputed features)
    latent_size: int = 64  # h = w of VAE moments (for precomputed moments)

    def __post_init__(self):
        check_length_buckets(self.length_buckets)


def check_length_buckets(buckets, field: str = "data.length_buckets") -> None:
    """Text lengths a batch pads to: increasing (a sample takes the first that fits; one longer than the
    last is skipped), else an error naming `field`."""
    buckets = tuple(buckets)
    if not buckets or any(b < 1 for b in buckets) or any(a >= b for a, b in zip(buckets, buckets[1:])):
        fixed = tuple(sorted({b for b in buckets if b > 0}))
        raise ValueError(f"{field}={buckets}: expected increasing positive lengths, e.g. {fixed}")


LOGGED_SKIPS = 20  # skipped samples logged one by one; after that, a line per SKIP_REPORT_EVERY
SKIP_REPORT_EVERY = 1000
READ_AHEAD_BATCHES = 4  # batches of examples the training pipeline builds ahead of the steps


class ExampleBuilder:
    """Turns one `Sample` into a dict of numpy arrays (unpadded text; padded image slots).

    Returns None for a sample that cannot be built (unreadable image, too long, more images than
    slots, input images without a vision encoder or features) after logging why — or raises
    `DataError` when `strict`. `skipped` counts those as they are built (grain builds ahead of the
    training steps); `dropped`, as a `make_dataset` pipeline over this builder hands batches out.
    """

    def __init__(
        self,
        tokenizer: MiniGPT5Tokenizer,
        spec: BatchSpec,
        *,
        caption_tokenizer: Callable[[str], tuple[Sequence[int], Sequence[int]]] | None = None,
        train: bool = True,
        fix_img7_mask: bool = False,
        input_features_dir: str | None = None,
        output_moments_dir: str | None = None,
        vision_encoder: bool = True,
        strict: bool = False,
    ):
        self.tokenizer = tokenizer
        self.spec = spec
        self.caption_tokenizer = caption_tokenizer
        self.train = train
        self.fix_img7_mask = fix_img7_mask
        self.input_features_dir = pathlib.Path(input_features_dir) if input_features_dir else None
        self._feature_sources = read_feature_sources(input_features_dir) if input_features_dir else {}
        self.output_moments_dir = pathlib.Path(output_moments_dir) if output_moments_dir else None
        self._moment_sources = read_feature_sources(output_moments_dir) if output_moments_dir else {}
        # a folder encoded for another model or size fails every sample alike: refused here, once
        if self.input_features_dir is not None:
            check_precomputed(self.input_features_dir, (spec.num_query_tokens, spec.llm_dim),
                              "input features [query tokens, LLM width]")
        if self.output_moments_dir is not None:
            check_precomputed(self.output_moments_dir, (8, spec.latent_size, spec.latent_size),
                              f"VAE moments [8, latent, latent] of {spec.output_image_size} px targets")
        # without a vision encoder (and no precomputed features) image slots hold zero features, and a
        # sample with input images cannot be built (stage 1: CC3M has none)
        self.vision_encoder = vision_encoder
        self.strict = strict
        self.skipped = 0
        self.dropped = 0
        self._named: set[str] = set()  # the skips (sample and why) the log's lines name or count

    def _bad(self, sample: Sample, reason: str) -> None:
        msg = f"sample {sample.task_name}: {reason}"
        if self.strict:
            raise DataError(msg)
        self.skipped += 1
        if msg in self._named:  # met again (a later epoch, or built ahead twice): counted, not logged again
            return None
        self._named.add(msg)
        if len(self._named) <= LOGGED_SKIPS:
            log.warning("skipping %s%s", msg, "" if len(self._named) < LOGGED_SKIPS else
                        f" (the next skipped samples are counted: one line per {SKIP_REPORT_EVERY})")
        elif len(self._named) % SKIP_REPORT_EVERY == 0:
            log.warning("skipped %d samples so far; the latest: %s", len(self._named), msg)
        return None

    def __call__(self, sample: Sample, rng: np.random.Generator) -> dict | None:
        spec = self.spec
        ids = self.tokenizer.encode_example(sample.source, sample.target, self.fix_img7_mask)
        if len(ids.input_ids) > spec.length_buckets[-1]:
            return self._bad(sample, f"{len(ids.input_ids)} tokens exceed the largest length bucket "
                                     f"{spec.length_buckets[-1]}")
        n_slots = ids.input_ids.count(self.tokenizer.ids.image_placeholder_id)
        paths = [p for p in sample.input_images if p is not None]
        if n_slots > len(paths):
            return self._bad(sample, f"{n_slots} <ImageHere> slots but {len(paths)} input images")
        if n_slots > spec.max_input_images:
            return self._bad(sample, f"{n_slots} input images exceed max_input_images={spec.max_input_images}")
        example = {
            "input_ids": np.asarray(ids.input_ids, np.int32),
            "labels": np.asarray(ids.labels, np.int32),
            "input_image_mask": np.arange(spec.max_input_images) < n_slots,
            "output_image_mask": np.zeros((spec.max_output_images,), bool),
        }
        try:
            self._input_images(example, paths[:n_slots], rng)
            self._output_images(example, sample.output_image, rng)
        except (image_ops.ImageLoadError, OSError, ValueError) as e:
            return self._bad(sample, str(e))
        self._caption(example, sample.caption)
        return example

    def _input_images(self, example: dict, paths: Sequence[str], rng: np.random.Generator) -> None:
        spec = self.spec
        if self.input_features_dir is not None or not self.vision_encoder:
            if paths and self.input_features_dir is None:
                raise ValueError(f"{len(paths)} input image(s), but the model has no vision encoder "
                                 "(model.vision.kind='none') and data.input_features_dir is not set")
            feats = np.zeros((spec.max_input_images, spec.num_query_tokens, spec.llm_dim), np.float32)
            for m, p in enumerate(paths):
                file = _feature_file(self.input_features_dir, self._feature_sources, p, "features")
                feats[m] = _load_array(file, feats.shape[1:])
            example["input_image_features"] = feats
            return
        s = spec.input_image_size
        pixels = np.zeros((spec.max_input_images, 3, s, s), np.float32)
        for m, p in enumerate(paths):
            flip = self.train and bool(rng.random() < 0.5)
            pixels[m] = image_ops.input_image_transform(image_ops.load_image(p), size=s, flip=flip)
        example["input_images"] = pixels

    def _output_images(self, example: dict, path: str | None, rng: np.random.Generator) -> None:
        spec = self.spec
        if self.output_moments_dir is not None:
            moments = np.zeros((spec.max_output_images, 8, spec.latent_size, spec.latent_size), np.float32)
            if path is not None:
                file = _feature_file(self.output_moments_dir, self._moment_sources, path, "VAE moments")
                moments[0] = _load_array(file, moments.shape[1:])
                example["output_image_mask"][0] = True
            example["output_moments"] = moments
            return
        s = spec.output_image_size
        out = np.zeros((spec.max_output_images, 3, s, s), np.float32)
        if path is not None:
            flip = self.train and bool(rng.random() < 0.5)
            out[0] = image_ops.output_image_transform(image_ops.load_image(path), size=s, flip=flip)
            example["output_image_mask"][0] = True
        example["output_images"] = out

    def _caption(self, example: dict, caption: str | None) -> None:
        n = self.spec.caption_length
        ids, mask = np.zeros((n,), np.int32), np.zeros((n,), np.int32)
        if caption is not None and self.caption_tokenizer is not None:
            tok_ids, tok_mask = self.caption_tokenizer(caption)
            ids[:], mask[:] = tok_ids[:n], tok_mask[:n]
        example["caption_ids"], example["caption_mask"] = ids, mask
        example["has_caption"] = np.asarray(caption is not None and self.caption_tokenizer is not None)


def _feature_file(directory: pathlib.Path, sources: dict[str, str], image: str, what: str) -> pathlib.Path:
    """`<directory>/<stem>.npy` of `image`; an error when the folder's `sources.json` records that
    file as computed from another image (train and val images often share stems)."""
    stem = pathlib.Path(image).stem
    source = sources.get(stem)
    if source is not None and source != str(pathlib.Path(image).resolve()):
        raise ValueError(f"{directory / (stem + '.npy')} holds the {what} of {source}, not of {image} (validation "
                         "images need their own folder: data.val_input_features_dir / data.val_output_moments_dir)")
    return directory / f"{stem}.npy"


FEATURE_SOURCES = "sources.json"  # in a features folder: {stem: the image its <stem>.npy was computed from}
UNREADABLE_IMAGES = "unreadable.json"  # in a features folder: {image: why} of those encode_images could not read
ENCODING = "encoding.json"  # in a features folder: what its files hold ({"what", "size", "shape", "encoder"})


def read_feature_sources(features_dir: str | os.PathLike) -> dict[str, str]:
    """A features folder's record of which image each `<stem>.npy` came from ({} if it has none)."""
    path = pathlib.Path(features_dir) / FEATURE_SOURCES
    if not path.is_file():
        return {}
    sources = load_json(path)
    if not isinstance(sources, dict):
        raise DataError(f"{path}: expected an object {{stem: image path}}")
    return sources


def precomputed_shape(directory: str | os.PathLike, tries: int = 5) -> tuple[int, ...] | None:
    """The array shape of a precomputed folder's `<stem>.npy` files, read from the first readable one
    of the first `tries` (None when there is none: each sample then reports its own file)."""
    files = pathlib.Path(directory).glob("*.npy")
    for path in itertools.islice(files, tries):
        try:
            return tuple(np.load(path, mmap_mode="r").shape)
        except (ValueError, EOFError, OSError):  # an interrupted write: the sample that needs it says so
            continue
    return None


def check_precomputed(directory: pathlib.Path, shape: tuple[int, ...], what: str) -> None:
    """Refuse a folder whose arrays are not `shape` (judged by its first file)."""
    if not directory.is_dir():
        raise DataError(f"{directory}: no such folder of precomputed {what}")
    got = precomputed_shape(directory)
    if got is not None and got != tuple(shape):
        raise DataError(f"{directory} holds arrays of shape {got}, this run needs {what} of shape {tuple(shape)}: "
                        "encode the images with this run's models and sizes (python -m mg5jax.encode_images)")


def _load_array(path: pathlib.Path, shape: tuple[int, ...]) -> np.ndarray:
    if not path.is_file():
        listed = path.parent / UNREADABLE_IMAGES
        hint = f" (encode_images lists the images it could not read in {listed})" if listed.is_file() else ""
        raise ValueError(f"precomputed feature file not found: {path}{hint}")
    try:
        arr = np.load(path)
    except (ValueError, EOFError, OSError) as e:  # empty, truncated or not an .npy file
        raise ValueError(f"{path}: cannot read the precomputed array ({type(e).__name__}: {e})") from e
    if arr.shape != tuple(shape):
        raise ValueError(f"{path}: expected shape {tuple(shape)}, got {arr.shape}")
    if arr.dtype.kind not in "fiu":  # complex, object, bool …: nothing an encoder writes
        raise ValueError(f"{path}: expected a real-valued array, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: {int(np.size(arr) - np.isfinite(arr).sum())} non-finite values")
    return arr


def collate(examples: Sequence[dict], spec: BatchSpec, pad_id: int) -> dict:
    """Stack examples into a batch, padding text on the right to the smallest bucket that fits."""
    longest = max(len(e["input_ids"]) for e in examples)
    length = next(b for b in spec.length_buckets if b >= longest)
    batch = {}
    n = len(examples)
    batch["input_ids"] = np.full((n, length), pad_id, np.int32)
    batch["labels"] = np.full((n, length), IGNORE_INDEX, np.int32)
    batch["attention_mask"] = np.zeros((n, length), np.int32)
    for i, e in enumerate(examples):
        t = len(e["input_ids"])
        batch["input_ids"][i, :t] = e["input_ids"]
        batch["labels"][i, :t] = e["labels"]
        batch["attention_mask"][i, :t] = 1
    for key in examples[0]:
        if key not in batch:
            batch[key] = np.stack([e[key] for e in examples])
    return batch


def pad_text(batch: dict, length: int, pad_id: int) -> dict:
    """`batch` with its text arrays padded on the right to `length` tokens (as `collate` pads)."""
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fills = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {k: np.pad(v, ((0, 0), (0, extra)), constant_values=fills[k]) if k in fills else v
            for k, v in batch.items()}


class HostsInStep:
    """The batches of one host's pipeline, kept in step with the other hosts of a multi-process run.

    Each host picks its text bucket from its own rows, but a global array needs the same shape on every
    host: every batch is padded to the longest bucket any host chose for that step. And when any host
    runs out (an uneven validation split), iteration ends on every host, where the others would wait in
    a collective forever. One small all-gather per batch; `get_state()`/`set_state()` are the pipeline's.
    """

    def __init__(self, dataset, pad_id: int):
        self._it = iter(dataset)
        self._pad_id = pad_id

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        from jax.experimental import multihost_utils

        batch = next(self._it, None)
        length = -1 if batch is None else batch["input_ids"].shape[1]
        lengths = np.asarray(multihost_utils.process_allgather(np.int32(length)))
        if (lengths < 0).any():
            raise StopIteration
        return pad_text(batch, int(lengths.max()), self._pad_id)

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state) -> None:
        self._it.set_state(state)


def host_batches(dataset, pad_id: int):
    """An iterator over `dataset`'s batches for this host: `iter(dataset)`, kept in step with the other
    hosts (`HostsInStep`) when JAX runs several processes."""
    return HostsInStep(dataset, pad_id) if jax.process_count() > 1 else iter(dataset)


UNBUILT = "unbuilt"  # what the pipeline carries for an example that could not be built (grain drops a None
#                      before any filter sees it, and a sentinel object would not survive worker processes)


class _Built:
    """The filter after building: drops the examples that could not be built (each logged where it
    failed, and counted in `builder.dropped`), and stops the run once `limit` in a row fail, where a
    wrong path would have it search forever for a buildable example."""

    def __init__(self, builder: ExampleBuilder, limit: int = 1000):
        self.builder = builder
        self.limit = limit
        self.failed_in_a_row = 0

    def __call__(self, example) -> bool:
        if example != UNBUILT:
            self.failed_in_a_row = 0
            return True
        self.builder.dropped += 1
        self.failed_in_a_row += 1
        if self.failed_in_a_row >= self.limit:
            raise DataError(f"{self.limit} examples in a row could not be built (the warnings above say why): "
                            "check the data and feature paths")
        return False


def _or_unbuilt(example: dict | None):
    return UNBUILT if example is None else example


def make_dataset(
    samples: Sequence[Sample],
    builder: ExampleBuilder,
    *,
    seed: int = 42,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """A grain pipeline over `samples`: (shuffle) → repeat → build → this process's shard → filter → batch.

    Iterators of the result have `get_state()` / `set_state()` for exact resume. Each process of a
    multi-host run reads a disjoint slice (`jax.process_index()` of `jax.process_count()`).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not samples:
        raise DataError("the dataset has no samples")
    ds = grain.MapDataset.source(list(samples)).seed(seed)
    if shuffle:
        ds = ds.shuffle()  # before repeat: every epoch a permutation of its own (grain reseeds each one)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    # augmentation drawn per global index, before the slice
    ds = ds.random_map(lambda s, rng: _or_unbuilt(builder(s, rng)))
    ds = ds[process_index::process_count]
    spec = builder.spec
    pad_id = builder.tokenizer.ids.pad_id
    # a few batches built ahead (grain's default is 500 examples: gigabytes of full-size images)
    ahead = READ_AHEAD_BATCHES * spec.batch_size
    read = grain.ReadOptions(num_threads=min(16, ahead), prefetch_buffer_size=ahead)
    return (
        ds.to_iter_dataset(read)
        .filter(_Built(builder))
        .batch(spec.batch_size, drop_remainder=drop_remainder, batch_fn=lambda es: collate(es, spec, pad_id))
    )
