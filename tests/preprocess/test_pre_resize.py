"""Resize modes: parsing, exact output sizes, content geometry and the interpolation choice."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from lib_adapters.errors import InputError
from lib_adapters.preprocess.resize import ResizeMode, fit_image

RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


def bars(height: int = 60, width: int = 120, frame_rows: int = 0) -> np.ndarray:
    """Red | green | blue vertical bars (1/4, 1/2, 1/4 of the width), optional grey top/bottom rows."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    quarter = width // 4
    image[:, :quarter] = RED
    image[:, quarter:width - quarter] = GREEN
    image[:, width - quarter:] = BLUE
    if frame_rows:
        image[:frame_rows] = GREY
        image[-frame_rows:] = GREY
    return image


# ----------------------------------------------------------------------------- parse

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Just Resize", ResizeMode.JUST_RESIZE),
        ("Crop and Resize", ResizeMode.CROP_AND_RESIZE),
        ("Resize and Fill", ResizeMode.RESIZE_AND_FILL),
        ("  crop AND resize ", ResizeMode.CROP_AND_RESIZE),
        ("JUST_RESIZE", ResizeMode.JUST_RESIZE),
        ("resize_and_fill", ResizeMode.RESIZE_AND_FILL),
        (0, ResizeMode.JUST_RESIZE),
        (1, ResizeMode.CROP_AND_RESIZE),
        (2, ResizeMode.RESIZE_AND_FILL),
        (np.int64(2), ResizeMode.RESIZE_AND_FILL),
        ("Scale to Fit (Inner Fit)", ResizeMode.CROP_AND_RESIZE),
        ("Envelope (Outer Fit)", ResizeMode.RESIZE_AND_FILL),
        ("Inner Fit (Scale to Fit)", ResizeMode.CROP_AND_RESIZE),
        ("Outer Fit (Shrink to Fit)", ResizeMode.RESIZE_AND_FILL),
        (ResizeMode.CROP_AND_RESIZE, ResizeMode.CROP_AND_RESIZE),
    ],
)
def test_parse_accepts(value, expected):
    assert ResizeMode.parse(value) is expected


@pytest.mark.parametrize("value", [3, -1, True, False, 1.0, None, "", "stretch", "Crop", b"Just Resize"])
def test_parse_rejects_and_lists_valid_values(value):
    with pytest.raises(InputError) as info:
        ResizeMode.parse(value)
    message = str(info.value)
    for label in ("Just Resize", "Crop and Resize", "Resize and Fill"):
        assert label in message


def test_enum_is_a_str_with_the_label():
    assert ResizeMode.CROP_AND_RESIZE == "Crop and Resize"
    assert [m.value for m in ResizeMode] == ["Just Resize", "Crop and Resize", "Resize and Fill"]


# ----------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("mode", list(ResizeMode))
@pytest.mark.parametrize(("src", "dst"), [((60, 120), (64, 64)), ((61, 37), (512, 768)), ((100, 100), (7, 3)),
                                          ((1, 1), (17, 9)), ((480, 640), (640, 480))])
def test_output_size_is_exact(mode, src, dst):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*src, 3), dtype=np.uint8)
    width, height = dst
    out = fit_image(image, width, height, mode)
    assert out.shape == (height, width, 3)
    assert out.dtype == np.uint8


@pytest.mark.parametrize("mode", list(ResizeMode))
def test_single_channel_maps_keep_their_channel_axis(mode):
    image = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30, 1)
    assert fit_image(image, 50, 40, mode).shape == (40, 50, 1)


# ----------------------------------------------------------------------------- geometry

def test_just_resize_keeps_every_bar_stretched():
    out = fit_image(bars(60, 120), 60, 60, ResizeMode.JUST_RESIZE)
    # 4 colours -> nearest, so the bars stay pure and proportional: 15 | 30 | 15 columns.
    assert (out[:, :15] == RED).all()
    assert (out[:, 15:45] == GREEN).all()
    assert (out[:, 45:] == BLUE).all()


def test_crop_and_resize_removes_the_sides():
    # Scale by max(120/120, 120/60) = 2 -> 240 x 120, centre crop 120 columns = source cols 30..89.
    out = fit_image(bars(60, 120), 120, 120, ResizeMode.CROP_AND_RESIZE)
    assert out.shape == (120, 120, 3)
    assert (out == GREEN).all()


def test_crop_and_resize_crops_rows_of_a_tall_target():
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    image[:10], image[10:30], image[30:] = RED, GREEN, BLUE
    out = fit_image(image, 20, 40, ResizeMode.CROP_AND_RESIZE)  # wide source... tall target
    # k = max(0.5, 1) = 1: no scaling, keep the centre 20 columns, all rows.
    np.testing.assert_array_equal(out, image[:, 10:30])


def test_resize_and_fill_pads_with_the_border_median():
    # Border: 2 x 120 grey rows + 2 x 60 side pixels (10 grey each) -> median is grey.
    image = bars(60, 120, frame_rows=5)
    out = fit_image(image, 240, 360, ResizeMode.RESIZE_AND_FILL)
    # k = min(240/120, 360/60) = 2 -> 240 x 120 content, centred vertically at rows 120..239.
    assert out.shape == (360, 240, 3)
    assert (out[:120] == GREY).all() and (out[240:] == GREY).all()
    np.testing.assert_array_equal(out[120:240], np.repeat(np.repeat(image, 2, axis=0), 2, axis=1))


def test_resize_and_fill_pads_columns_with_odd_remainder_centred():
    image = np.full((10, 10, 3), 200, dtype=np.uint8)
    image[0, 0] = 0  # a single odd border pixel does not move the median
    out = fit_image(image, 15, 10, ResizeMode.RESIZE_AND_FILL)
    # 5 columns of padding: 2 left, 3 right.
    assert (out[:, :2] == 200).all() and (out[:, 12:] == 200).all()
    np.testing.assert_array_equal(out[:, 2:12], image)


# ----------------------------------------------------------------------------- interpolation

def gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    channels = [x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256]
    return np.stack(channels, axis=2).astype(np.uint8)


def test_many_colours_downscale_uses_area():
    image = gradient(256, 256)
    out = fit_image(image, 100, 90, ResizeMode.JUST_RESIZE)
    np.testing.assert_array_equal(out, cv2.resize(image, (100, 90), interpolation=cv2.INTER_AREA))


def test_many_colours_upscale_uses_cubic():
    image = gradient(256, 256)
    out = fit_image(image, 300, 400, ResizeMode.JUST_RESIZE)
    np.testing.assert_array_equal(out, cv2.resize(image, (300, 400), interpolation=cv2.INTER_CUBIC))


def test_few_colours_use_nearest_and_invent_no_colour():
    rng = np.random.default_rng(1)
    palette = np.array([RED, GREEN, BLUE, GREY], dtype=np.uint8)
    image = palette[rng.integers(0, 4, size=(33, 47))]
    out = fit_image(image, 101, 77, ResizeMode.JUST_RESIZE)
    np.testing.assert_array_equal(out, cv2.resize(image, (101, 77), interpolation=cv2.INTER_NEAREST))
    assert {tuple(c) for c in out.reshape(-1, 3)} <= {tuple(c) for c in palette}


@pytest.mark.parametrize(
    ("image", "width", "height"),
    [
        (np.zeros((4, 4), dtype=np.uint8), 4, 4),
        (np.zeros((4, 4, 3), dtype=np.float32), 4, 4),
        (np.zeros((0, 4, 3), dtype=np.uint8), 4, 4),
        (np.zeros((4, 4, 3), dtype=np.uint8), 0, 4),
        (np.zeros((4, 4, 3), dtype=np.uint8), 4, 2.5),
        ("not an array", 4, 4),
    ],
)
def test_fit_image_rejects_bad_arguments(image, width, height):
    with pytest.raises(InputError):
        fit_image(image, width, height, ResizeMode.JUST_RESIZE)
