"""Image transforms match torchvision's documented Resize / CenterCrop / ToTensor / Normalize on PIL images."""

import numpy as np
import pytest
from PIL import Image

from mg5jax.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImageLoadError,
    clip_normalize,
    clip_normalize_table,
    expand2square,
    input_image_pixels,
    input_image_transform,
    load_image,
    output_image_transform,
)


@pytest.fixture(scope="module")
def vist_image(samples_dir) -> Image.Image:
    return load_image(samples_dir / "VIST" / "val_images" / "000000005.jpg")


def _reference(img: Image.Image, resized_wh: tuple[int, int], left: int, top: int, size: int) -> np.ndarray:
    """torchvision by hand: bilinear resize to the given size, crop at (left, top), ToTensor in float64. [3,s,s]."""
    array = np.asarray(img.resize(resized_wh, Image.BILINEAR), dtype=np.float64) / 255.0
    return array[top : top + size, left : left + size].transpose(2, 0, 1)


def _clip_normalize(x: np.ndarray) -> np.ndarray:
    return (x - np.array(CLIP_MEAN)[:, None, None]) / np.array(CLIP_STD)[:, None, None]


def test_input_transform_square_sample(vist_image):
    assert vist_image.size == (256, 256)
    out = input_image_transform(vist_image)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    expected = _clip_normalize(_reference(vist_image, (224, 224), 0, 0, 224))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "box, resized_wh, left, top",
    [
        ((0, 30, 256, 210), (318, 224), 47, 0),  # 256x180 wide: long side int(224*256/180)=318, left round(94/2)
        ((40, 0, 190, 256), (224, 382), 0, 79),  # 150x256 tall: long side int(224*256/150)=382, top round(158/2)
        ((0, 0, 256, 223), (257, 224), 16, 0),  # 256x223: left = int(round(33/2)) = 16 (round half to even)
    ],
)
def test_input_transform_resize_and_center_crop(vist_image, box, resized_wh, left, top):
    img = vist_image.crop(box)
    out = input_image_transform(img)
    expected = _clip_normalize(_reference(img, resized_wh, left, top, 224))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_input_transform_flip(vist_image):
    img = vist_image.crop((0, 30, 256, 210))
    np.testing.assert_array_equal(input_image_transform(img, flip=True), input_image_transform(img)[:, :, ::-1])


def test_uint8_pixels_normalized_later_are_the_transform(vist_image):
    """Generation sends uint8 pixels to the device and normalizes them there."""
    img = vist_image.crop((40, 0, 190, 256))
    for flip in (False, True):
        pixels = input_image_pixels(img, flip=flip)
        assert pixels.dtype == np.uint8 and pixels.shape == (3, 224, 224)
        np.testing.assert_array_equal(clip_normalize(pixels), input_image_transform(img, flip=flip))
    table = clip_normalize_table()  # what a device looks the pixels up in
    np.testing.assert_array_equal(table[np.arange(3)[:, None, None], pixels], clip_normalize(pixels))


def test_expand2square_centres_content():
    wide = Image.new("RGB", (10, 4), (1, 2, 3))
    square = np.asarray(expand2square(wide))
    assert square.shape == (10, 10, 3)
    assert (square[3:7] == (1, 2, 3)).all()  # pasted at (0, (10-4)//2)
    assert (square[:3] == 255).all() and (square[7:] == 255).all()
    tall = Image.new("RGB", (3, 8), (9, 9, 9))
    square = np.asarray(expand2square(tall, background=(0, 0, 0)))
    assert square.shape == (8, 8, 3)
    assert (square[:, 2:5] == 9).all() and (square[:, :2] == 0).all() and (square[:, 5:] == 0).all()
    same = Image.new("RGB", (5, 5))
    assert expand2square(same) is same


def test_output_transform_non_square(vist_image):
    img = vist_image.crop((0, 30, 256, 210))  # 256x180 -> white bands of 38 rows above and below
    canvas = np.full((256, 256, 3), 255, dtype=np.uint8)
    canvas[38:218] = np.asarray(img)
    unit = _reference(Image.fromarray(canvas), (512, 512), 0, 0, 512)
    out = output_image_transform(img)
    assert out.shape == (3, 512, 512) and out.dtype == np.float32
    np.testing.assert_allclose(out, (unit - 0.5) / 0.5, atol=1e-5, rtol=0)
    assert (out[:, :70] == 1.0).all()  # white padding maps to +1
    np.testing.assert_allclose(output_image_transform(img, normalize=False), unit, atol=1e-6, rtol=0)
    flipped = output_image_transform(img, flip=True, normalize=False)
    np.testing.assert_array_equal(flipped, output_image_transform(img, normalize=False)[:, :, ::-1])


def test_output_transform_square_sample_range(vist_image):
    out = output_image_transform(vist_image)
    assert -1.0 <= out.min() and out.max() <= 1.0
    small = output_image_transform(vist_image, size=128, normalize=False)
    np.testing.assert_allclose(small, _reference(vist_image, (128, 128), 0, 0, 128), atol=1e-6, rtol=0)


def test_load_image_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match="nope.jpg"):
        load_image(missing)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="garbage.jpg"):
        load_image(garbage)


def test_decompression_bomb_is_an_image_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64×64 > 2× the limit: PIL refuses to decode it
    with pytest.raises(ImageLoadError, match="big.png"):
        load_image(path)


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (4, 3), 77).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (4, 3)
    assert (np.asarray(img) == 77).all()
