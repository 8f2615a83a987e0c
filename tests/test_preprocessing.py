"""The one preprocessing definition: numbers, sizes, and clear errors on bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import colour_image, image_bytes
from PIL import Image

from food_classifier.preprocessing import (
    ImageDecodeError,
    ImageTooLarge,
    PreprocessSpec,
    normalize,
    open_image,
    preprocess,
    resize_crop,
)

LITE0 = PreprocessSpec(resize=256, crop=224)


def test_spec_round_trip_and_key():
    spec = PreprocessSpec(resize=320, crop=288, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), interpolation="bilinear")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert spec.key != LITE0.key


@pytest.mark.parametrize("size", [(512, 300), (300, 512), (256, 256), (100, 60)])
def test_resize_crop_gives_square_crop(size):
    out = resize_crop(Image.new("RGB", size, (10, 20, 30)), LITE0)
    assert out.size == (224, 224)


def test_normalize_is_x_over_127_5_minus_1_for_half_mean_std():
    img = Image.fromarray(np.array([[[0, 127, 255]]], dtype=np.uint8).repeat(4, 0).repeat(4, 1))
    x = normalize(img, LITE0)
    assert x.shape == (3, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], np.array([0, 127, 255]) / 127.5 - 1, atol=1e-6)


def test_preprocess_accepts_path_bytes_and_pil(tmp_path):
    img = colour_image("red", size=(400, 300))
    path = tmp_path / "a.png"
    img.save(path)
    a = preprocess(path, LITE0)
    b = preprocess(path.read_bytes(), LITE0)
    c = preprocess(img, LITE0)
    assert a.shape == (3, 224, 224)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert a[0].mean() > a[1].mean()  # red stays red: channel order is RGB


def test_transparent_png_is_composited_on_white():
    rgba = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    img = open_image(image_bytes(rgba, "PNG"))
    assert img.mode == "RGB" and img.getpixel((10, 10)) == (255, 255, 255)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (200, 100), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert open_image(buf.getvalue()).size == (100, 200)


def test_jpeg_draft_keeps_both_sides_at_least_the_resize():
    img = open_image(image_bytes(colour_image("blue", size=(1024, 600))), draft=256)
    assert min(img.size) >= 256 and img.size[0] <= 1024


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is not an image at all", "not a readable image"),
])
def test_bad_bytes_give_clear_errors(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        open_image(data)


def test_truncated_jpeg_is_refused():
    data = image_bytes(colour_image("green", size=(300, 300)))
    with pytest.raises(ImageDecodeError):
        open_image(data[: len(data) // 3])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="no such image file"):
        open_image(tmp_path / "nope.jpg")


def test_decompression_bomb_is_refused_before_decoding():
    bomb = image_bytes(Image.new("1", (6000, 6000)), "PNG")  # tiny file, 36 M pixels
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLarge, match="pixels"):
        open_image(bomb, max_pixels=10_000_000)


def test_layout_and_scale_default_to_todays_pixels_and_old_dicts_load():
    old = {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    spec = PreprocessSpec.from_dict(old)
    assert spec == LITE0 and spec.layout == "NCHW" and spec.scale == 1.0 and spec.input_shape == (3, 224, 224)
    assert spec.to_dict() == old  # bundles that do not need the new keys are written as before
    assert spec.key == "p2-r256-c224-bicubic-m0.5,0.5,0.5-s0.5,0.5,0.5"


def test_nhwc_raw_pixels_for_keras_style_models():
    img = colour_image("red", size=(300, 200))
    keras = PreprocessSpec(resize=256, crop=224, mean=(0, 0, 0), std=(1, 1, 1), layout="NHWC", scale=255)
    x = preprocess(img, keras)
    assert x.shape == (224, 224, 3) == keras.input_shape and x.dtype == np.float32
    np.testing.assert_array_equal(x, np.asarray(resize_crop(img, keras), dtype=np.float32))  # 0-255, untouched
    caffe = PreprocessSpec(mean=(123.0, 117.0, 104.0), std=(1, 1, 1), scale=255)  # mean in the 0-255 range
    np.testing.assert_allclose(preprocess(img, caffe).transpose(1, 2, 0), x - [123.0, 117.0, 104.0], atol=1e-4)
    nhwc = PreprocessSpec(layout="NHWC")
    np.testing.assert_array_equal(preprocess(img, nhwc), preprocess(img, LITE0).transpose(1, 2, 0))
    assert PreprocessSpec.from_dict(keras.to_dict()) == keras and keras.key != LITE0.key
    with pytest.raises(ValueError, match="layout must be one of NCHW, NHWC"):
        PreprocessSpec(layout="CHW")
