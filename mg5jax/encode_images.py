"""Precompute what training reads from image folders, so a run can skip the frozen encoders:
every image of a folder -> `<out>/<stem>.npy`, float32.

* input features `[Q, D_llm]` (the post-llama_proj Q-Former output that MiniGPT-5 splices in place of
  `<ImageHere>`; `data.input_features_dir`), from the ViT + Q-Former:

      python -m mg5jax.encode_images --lavis-vit eva_vit_g.pth --lavis-qformer blip2_pretrained_flant5xxl.pth \\
          --minigpt4 prerained_minigpt4_7b.pth --images DIR --out DIR [--batch-size 16] [--dtype bfloat16]
      python -m mg5jax.encode_images --blip2-dir BLIP2_DIR [--minigpt4 CKPT] --images DIR --out DIR

* output VAE moments `[2C, S/8, S/8]` (mean ‖ logvar after quant_conv, `[8, 64, 64]` for SD at 512;
  `data.output_moments_dir`), from Stable Diffusion's VAE:

      python -m mg5jax.encode_images --vae SD_DIR [--size 512] --images DIR --out DIR

Input images get the test-time input transform (resize, centre crop, CLIP normalise); target images
the output transform at `--size` (white square padding, resize, centre crop, scaled to [-1, 1], as the
online path feeds the VAE; the original's preprocessing script stored moments of [0, 1] images, a bug).
Neither is flipped, so training on stored moments has no flip augmentation of the target (as the
original's). Files already written are skipped, so an interrupted run resumes. An image that cannot be
read (CC3M downloads hold truncated files and saved error pages) is logged, skipped and listed in
`<out>/unreadable.json`; training then skips the samples that need it (`--strict` stops instead). `<out>/sources.json`
records the image each `<stem>.npy` came from: a second folder whose stems collide with the first is
refused, and training checks that a sample's image is the one its file was computed from;
`<out>/encoding.json` records what the files hold (kind, size, shape, encoder weights and dtype), and
another is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mg5jax.convert.sources import CheckpointError, write_atomically
from mg5jax.data.datasets import DataError, load_json
from mg5jax.data.images import ImageLoadError, input_image_transform, load_image, output_image_transform
from mg5jax.data.pipeline import ENCODING, FEATURE_SOURCES, LOGGED_SKIPS, UNREADABLE_IMAGES, read_feature_sources
from mg5jax.models.vae import AutoencoderKL
from mg5jax.models.vision import VisionEncoder

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def list_images(image_dir: str | os.PathLike) -> list[pathlib.Path]:
    """The image files directly in `image_dir`, sorted; two images with the same stem are an error."""
    directory = pathlib.Path(image_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder not found: {directory}")
    images = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    stems: dict[str, pathlib.Path] = {}
    for p in images:
        if p.stem in stems:
            raise ValueError(f"{stems[p.stem]} and {p} would both be written as {p.stem}.npy")
        stems[p.stem] = p
    return images


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How a folder's images become arrays: `pixels` reads one image file as float32 `[3, size, size]`,
    `encode` is a jitted `[B, 3, size, size] -> float32 [B, ...]` (one compile per batch size)."""

    what: str  # progress-bar label
    size: int
    pixels: Callable[[pathlib.Path], np.ndarray]
    encode: Callable[[np.ndarray], jax.Array]
    source: str = ""  # the encoder's weights and dtype, recorded with the folder

    @property
    def shape(self) -> tuple[int, ...]:
        """One image's array shape (traced, not run)."""
        batch = jax.ShapeDtypeStruct((1, 3, self.size, self.size), jnp.float32)
        return tuple(jax.eval_shape(self.encode, batch).shape[1:])


def _jitted(module: nnx.Module, fn: Callable[[nnx.Module, jax.Array], jax.Array]) -> Callable[[np.ndarray], jax.Array]:
    graphdef, state = nnx.split(module)

    @jax.jit
    def encode(state, pixels):
        return fn(nnx.merge(graphdef, state), pixels).astype(jnp.float32)

    return lambda pixels: encode(state, pixels)


def input_features(encoder: VisionEncoder, source: str = "") -> Encoding:
    """Input images -> `[Q, D_llm]` LLM-input features (ViT + Q-Former + llama_proj)."""
    size = encoder.config.vision.image_size
    return Encoding("input features", size, lambda path: input_image_transform(load_image(path), size=size),
                    _jitted(encoder, lambda m, x: m(x)), source)


def output_moments(vae: AutoencoderKL, size: int = 512, source: str = "") -> Encoding:
    """Target images at `size` -> VAE moments `[2C, size/f, size/f]` (mean ‖ logvar, what
    `DiagonalGaussian.from_moments` takes)."""
    factor = vae.config.downsample_factor
    if size < factor or size % factor:
        raise ValueError(f"--size {size}: expected a positive multiple of the VAE's downsample factor {factor}")
    return Encoding("VAE moments", size, lambda path: output_image_transform(load_image(path), size=size),
                    _jitted(vae, lambda m, x: m.encode(x).moments), source)


def _describe(record: dict) -> str:
    return (f"{record.get('what')} at {record.get('size')} px, shape {tuple(record.get('shape') or ())}, "
            f"from {record.get('encoder') or '?'}")


def _check_encoding(out: pathlib.Path, encoding: Encoding) -> None:
    """Record what `out` holds, or refuse to add another kind, size, shape or encoder to it (its finished
    files would be skipped as done, and training would read a mix)."""
    path = out / ENCODING
    this = {"what": encoding.what, "size": encoding.size, "shape": list(encoding.shape), "encoder": encoding.source}
    if path.is_file():
        try:
            held = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: not readable JSON ({e})") from e
        known = {k: v for k, v in this.items() if v not in ("", None)}  # a call without a source compares the rest
        if not isinstance(held, dict) or any(held.get(k) not in ("", None) and held[k] != v for k, v in known.items()):
            what = _describe(held) if isinstance(held, dict) else repr(held)
            raise ValueError(f"{out} holds {what}; this run makes {_describe(this)}: use another --out folder")
        this = {**held, **known}  # a record from before the shape and encoder were kept gains them
        if held == this:
            return
    write_atomically(path, json.dumps(this))


def _record_sources(out: pathlib.Path, images: Sequence[pathlib.Path]) -> None:
    """Add this folder's images to `out/sources.json`; an image whose stem already stands for another
    image's features is an error (features are found by file stem alone)."""
    sources = read_feature_sources(out)
    for p in images:
        known = sources.setdefault(p.stem, str(p.resolve()))
        if known != str(p.resolve()):
            raise ValueError(f"{out / (p.stem + '.npy')} holds the features of {known}, not of {p}: "
                             "use one --out folder per image folder")
    write_atomically(out / FEATURE_SOURCES, json.dumps(sources, indent=0, sort_keys=True))


def _save(paths: Sequence[pathlib.Path], features: jax.Array, out_dir: pathlib.Path) -> None:
    """Write each image's `[Q, D]` row block atomically (a partial file never looks finished)."""
    for path, feature in zip(paths, np.asarray(features)):
        buffer = io.BytesIO()
        np.save(buffer, feature)
        write_atomically(out_dir / f"{path.stem}.npy", buffer.getvalue())


@dataclasses.dataclass
class FolderResult:
    """What `encode_folder` did: the images it encoded and those it skipped as unreadable (with why)."""

    encoded: list[pathlib.Path]
    unreadable: dict[pathlib.Path, str]


def _record_unreadable(out: pathlib.Path, folder: pathlib.Path, images: Sequence[pathlib.Path],
                       unreadable: dict[pathlib.Path, str]) -> None:
    """Update `out/unreadable.json` ({image path: why}) for the images this run tried in `folder`: the
    unreadable ones in, the rest out (and those of `folder` no longer there; another folder's stay)."""
    path = out / UNREADABLE_IMAGES
    try:
        held = load_json(path) if path.is_file() else {}
    except DataError:  # a damaged record of an earlier run: this run's replaces it
        held = {}
    tried, here = {str(p.resolve()) for p in images}, folder.resolve()
    held = {k: v for k, v in held.items() if k not in tried and (pathlib.Path(k).parent != here or os.path.exists(k))} \
        if isinstance(held, dict) else {}
    held.update({str(p.resolve()): why for p, why in unreadable.items()})
    if held:
        write_atomically(path, json.dumps(held, indent=0, sort_keys=True))
    elif path.is_file():
        path.unlink()


def encode_folder(encoding: Encoding, image_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  batch_size: int = 16, *, progress: bool = True, strict: bool = False) -> FolderResult:
    """Encode every image in `image_dir` not yet in `out_dir` (`input_features(...)` or
    `output_moments(...)`). An image that cannot be read is logged and skipped (training then skips the
    samples that need it) and listed in `out_dir/unreadable.json`; with `strict`, it stops the run.

    Batches have the static size `batch_size` (the last one is zero-padded), so one compile serves the
    whole folder; decoding the next batch overlaps with the device computing the current one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = pathlib.Path(out_dir)
    images = list_images(image_dir)  # a wrong image folder is named before the output folder is made
    out.mkdir(parents=True, exist_ok=True)
    _check_encoding(out, encoding)
    _record_sources(out, images)
    todo = [p for p in images if not (out / f"{p.stem}.npy").is_file()]
    log.info("%d images in %s, %d already encoded", len(images), image_dir, len(images) - len(todo))
    size = encoding.size
    result = FolderResult([], {})

    def batches():
        """Readable images in `[batch_size, 3, size, size]` blocks (zero-padded), with their paths."""
        paths, pixels = [], np.zeros((batch_size, 3, size, size), np.float32)
        for path in todo:
            try:
                pixels[len(paths)] = encoding.pixels(path)
            except ImageLoadError as e:
                if strict:
                    raise
                result.unreadable[path] = str(e)
                if len(result.unreadable) <= LOGGED_SKIPS:
                    log.warning("skipping %s", e)
                elif len(result.unreadable) == LOGGED_SKIPS + 1:
                    log.warning("more than %d unreadable images: the rest are counted (all are listed in %s)",
                                LOGGED_SKIPS, out / UNREADABLE_IMAGES)
                bar.update(1)
                bar.set_postfix(unreadable=len(result.unreadable))
                continue
            paths.append(path)
            if len(paths) == batch_size:
                yield paths, pixels
                paths, pixels = [], np.zeros((batch_size, 3, size, size), np.float32)
        if paths:
            yield paths, pixels

    def save(paths: list[pathlib.Path], features: jax.Array) -> None:
        _save(paths, features, out)
        result.encoded.extend(paths)
        bar.update(len(paths))

    pending: tuple[list[pathlib.Path], jax.Array] | None = None
    with tqdm(total=len(todo), desc=f"encoding {encoding.what}", unit="img", disable=not progress) as bar:
        try:
            for paths, pixels in batches():
                features = encoding.encode(pixels)
                if pending is not None:
                    save(*pending)
                pending = (paths, features)
        finally:  # keep the finished batch even when a later image fails
            if pending is not None:
                save(*pending)
            _record_unreadable(out, pathlib.Path(image_dir), [*result.encoded, *result.unreadable], result.unreadable)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mg5jax.encode_images", description=__doc__.split("\n\n")[0])
    p.add_argument("--lavis-vit", help="input features: LAVIS eva_vit_g.pth")
    p.add_argument("--lavis-qformer", help="input features: LAVIS BLIP-2 stage checkpoint "
                                           "(e.g. blip2_pretrained_flant5xxl.pth)")
    p.add_argument("--minigpt4", help="input features: MiniGPT-4 checkpoint holding llama_proj (required with --lavis-*)")
    p.add_argument("--blip2-dir", help="input features: transformers BLIP-2 directory (instead of the LAVIS files)")
    p.add_argument("--vae", help="output moments: a Stable Diffusion directory (its vae/) or a diffusers vae/ directory")
    p.add_argument("--size", type=int, help="output moments: target image size (data.output_image_size; default "
                                            "512); input features take the encoder's")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--out", required=True, help="folder for the <stem>.npy files")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="storage and compute dtype of the encoder (the original runs both in bf16)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first image that cannot be read (default: log it, skip it and go on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _encoding(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Encoding:
    """The encoding the flags ask for, its weights loaded."""
    lavis = [args.lavis_vit, args.lavis_qformer]
    dtype = DTYPES[args.dtype]
    if args.vae is not None:
        if any(lavis) or args.blip2_dir or args.minigpt4:
            parser.error("--vae (output moments) takes no input-feature encoder flags")
        vae_dir = pathlib.Path(args.vae)
        vae_dir = vae_dir / "vae" if (vae_dir / "vae" / "config.json").is_file() else vae_dir
        if not (vae_dir / "config.json").is_file():
            raise FileNotFoundError(f"--vae {args.vae}: neither a diffusers vae/ directory nor an SD directory "
                                    "holding one (no config.json)")
        return output_moments(AutoencoderKL.from_pretrained(vae_dir, dtype=dtype, param_dtype=dtype),
                              512 if args.size is None else args.size, source=f"{vae_dir.resolve()} ({args.dtype})")
    if args.size is not None:
        parser.error("--size is for output moments (--vae); input features take the vision encoder's image size")
    if args.blip2_dir is not None and any(lavis):
        parser.error("give either --blip2-dir or --lavis-vit/--lavis-qformer/--minigpt4, not both")
    if args.blip2_dir is None and not (all(lavis) and args.minigpt4):
        parser.error("need --lavis-vit, --lavis-qformer and --minigpt4, or --blip2-dir (input features), "
                     "or --vae (output moments)")
    files = [args.blip2_dir] if args.blip2_dir is not None else lavis
    source = ", ".join(str(pathlib.Path(f).resolve()) for f in [*files, args.minigpt4] if f) + f" ({args.dtype})"
    if args.blip2_dir is not None:
        encoder = VisionEncoder.from_pretrained(args.blip2_dir, proj=args.minigpt4, dtype=dtype, param_dtype=dtype)
    else:
        encoder = VisionEncoder.from_lavis(args.lavis_vit, args.lavis_qformer, args.minigpt4, dtype=dtype,
                                           param_dtype=dtype)
    return input_features(encoder, source)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    was = os.environ.get("TQDM_DISABLE")
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"  # the weight loaders' bars too
    try:
        encoding = _encoding(parser, args)
        done = encode_folder(encoding, args.images, args.out, args.batch_size, progress=not args.no_progress,
                             strict=args.strict)
    except (CheckpointError, ImageLoadError, FileNotFoundError, ValueError) as e:
        print(f"encode_images: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"encode_images: interrupted: run the same command again to go on (files already written to "
              f"{args.out} are kept)", file=sys.stderr)
        return 130
    finally:
        if was is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = was
    print(f"encoded {len(done.encoded)} images ({encoding.what}) into {args.out}")
    if done.unreadable:
        print(f"skipped {len(done.unreadable)} images that could not be read (listed in "
              f"{pathlib.Path(args.out) / UNREADABLE_IMAGES}; training skips the samples that need them)")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(main())
