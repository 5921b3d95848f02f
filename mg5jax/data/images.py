"""Image loading and the original's two image transforms (LLM input side and SD output side).

numpy + PIL only. Resize and centre crop follow torchvision's PIL semantics (``Resize(int)`` scales the
shorter side, ``CenterCrop`` rounds the offsets), so results match the original's torchvision pipeline.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageLoadError(Exception):
    """An image file is missing or cannot be decoded; the message names the path."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` fully decoded as an RGB PIL image."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise ImageLoadError(f"image file not found: {os.fspath(path)}") from e
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot read image {os.fspath(path)}: {e}") from e


def expand2square(pil_img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Pad to a square of side max(w, h) filled with ``background``, content centred (LLaVA / MiniGPT-5)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` on PIL: shorter side -> size, longer -> int(size * long / short), bilinear."""
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` for an image at least ``size`` on both sides."""
    width, height = img.size
    if width < size or height < size:
        raise ValueError(f"center_crop: image {width}x{height} is smaller than the crop {size}")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _to_chw_uint8(img: Image.Image, flip: bool) -> np.ndarray:
    """RGB PIL -> uint8 [3, H, W], optionally mirrored left-right."""
    array = np.asarray(img.convert("RGB"))  # [H, W, 3]
    if flip:
        array = array[:, ::-1]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _unit(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1] (torchvision ``ToTensor``'s scaling)."""
    return pixels.astype(np.float32) / np.float32(255.0)


def _to_chw_unit(img: Image.Image, flip: bool) -> np.ndarray:
    """RGB PIL -> float32 [3, H, W] in [0, 1] (torchvision ``ToTensor``), optionally mirrored left-right."""
    return _unit(_to_chw_uint8(img, flip))


def input_image_pixels(img: Image.Image, size: int = 224, flip: bool = False) -> np.ndarray:
    """LLM-side image before normalization: resize shorter side, centre crop, optional h-flip -> uint8
    [3, size, size] (a quarter of the float bytes to send to a device; `clip_normalize` there)."""
    return _to_chw_uint8(center_crop(resize_shorter_side(img, size), size), flip)


def clip_normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels `[..., 3, H, W]` -> float32 CLIP-normalized (``ToTensor`` + ``Normalize``)."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]
    return (_unit(pixels) - mean) / std


@functools.cache
def clip_normalize_table() -> np.ndarray:
    """`clip_normalize` of every uint8 value per channel, `[3, 256]` float32: a device looks pixels up in it
    and gets the host's values exactly (XLA would turn the divisions into multiplications)."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (3, 256, 1))  # [3, H=256, W=1]
    return np.ascontiguousarray(clip_normalize(values)[..., 0])


def input_image_transform(img: Image.Image, size: int = 224, flip: bool = False) -> np.ndarray:
    """LLM-side image: resize shorter side, centre crop, optional h-flip, CLIP normalize -> float32 [3, size, size].

    The original flips with probability 0.5 in training only; pass the draw as ``flip``.
    """
    return clip_normalize(input_image_pixels(img, size, flip))


def output_image_transform(img: Image.Image, size: int = 512, flip: bool = False, normalize: bool = True) -> np.ndarray:
    """SD-side target image: expand2square (white), resize, centre crop, optional h-flip -> float32 [3, size, size].

    ``normalize=True`` maps to [-1, 1] (training target); ``normalize=False`` keeps [0, 1] (the original's
    test-time ground truth for metrics). The flip draw is independent of the input-side one.
    """
    array = _to_chw_unit(center_crop(resize_shorter_side(expand2square(img), size), size), flip)
    if normalize:
        array = (array - np.float32(0.5)) / np.float32(0.5)
    return array
