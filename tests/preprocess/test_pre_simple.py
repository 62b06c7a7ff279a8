"""The no-weights preprocessors, run through the public entry point, checked pixel by pixel."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from lib_adapters.errors import InputError
from lib_adapters.preprocess import run_preprocessor


def square(size: int = 64, lo: int = 16, hi: int = 48) -> np.ndarray:
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[lo:hi, lo:hi] = 255
    return image


def test_none_returns_the_image_unchanged_at_input_size():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    out = run_preprocessor("none", image, resolution=512)
    np.testing.assert_array_equal(out, image)


def test_invert_inverts_every_pixel():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    out = run_preprocessor("invert", image)
    np.testing.assert_array_equal(out.astype(int), 255 - image.astype(int))


def test_invert_of_greyscale_input_is_three_channel():
    grey = np.full((8, 8), 250, dtype=np.uint8)
    out = run_preprocessor("invert", grey)
    assert out.shape == (8, 8, 3) and (out == 5).all()


def test_canny_edges_lie_exactly_along_the_square_border():
    # Square occupies rows/cols 16..47; the step is between 15|16 and 47|48.
    out = run_preprocessor("canny", square(), resolution=64)
    assert out.shape == (64, 64, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert set(np.unique(out)) <= {0, 255}
    edges = out[..., 0] > 0
    band = np.zeros_like(edges)
    band[15:49, 15:49] = True
    band[17:47, 17:47] = False  # the 2-pixel band straddling the border, nothing else
    assert edges.any()
    assert not (edges & ~band).any(), "edge pixels away from the square's border"
    # Every side is traced along (almost) its whole length (corners may be cut by one pixel).
    for side in (edges[15:17, 16:48].any(axis=0), edges[47:49, 16:48].any(axis=0),
                 edges[16:48, 15:17].any(axis=1), edges[16:48, 47:49].any(axis=1)):
        assert side.sum() >= 30


def test_canny_thresholds_decide_which_steps_are_edges():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, 32:] = 60  # Sobel magnitude 4 * 60 = 240: above 200, below 250
    assert run_preprocessor("canny", image, resolution=64).any()
    assert not run_preprocessor("canny", image, resolution=64, threshold_a=250, threshold_b=255).any()


def test_canny_output_follows_resolution_and_aspect_ratio():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    assert run_preprocessor("canny", image, resolution=64).shape == (64, 128, 3)
    assert run_preprocessor("canny", image).shape == (512, 1024, 3)  # the default resolution


def test_threshold_is_white_only_where_every_channel_is_above():
    image = np.array([[[200, 200, 200], [200, 100, 200], [128, 128, 128], [127, 255, 255]]], dtype=np.uint8)
    image = np.repeat(np.repeat(image, 64, axis=0), 16, axis=1)  # 64 x 64, no resize at 64
    out = run_preprocessor("threshold", image, resolution=64, threshold_a=127)
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out[0, ::16, 0], [255, 0, 255, 0])
    assert (out == out[:1]).all()
    out = run_preprocessor("threshold", image, resolution=64, threshold_a=150)
    np.testing.assert_array_equal(out[0, ::16, 0], [255, 0, 0, 0])


def gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, (x * 3 + y) % 256], axis=2).astype(np.uint8)


def test_color_grid_is_constant_on_64px_cells_and_matches_bicubic_means():
    image = gradient(128, 192)
    out = run_preprocessor("color_grid", image, resolution=128)
    assert out.shape == (128, 192, 3)
    cells = out.reshape(2, 64, 3, 64, 3)
    assert (cells == cells[:, :1, :, :1, :]).all()
    expected = cv2.resize(image, (3, 2), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(cells[:, 0, :, 0, :], expected)


def test_color_grid_cells_stay_64px_when_the_size_is_not_a_multiple():
    out = run_preprocessor("color_grid", gradient(100, 150), resolution=100)
    assert out.shape == (100, 150, 3)
    for top in range(0, 100, 64):
        for left in range(0, 150, 64):
            cell = out[top:top + 64, left:left + 64]
            assert (cell == cell[0, 0]).all()
    assert len({tuple(out[r, c]) for r in (0, 64) for c in (0, 64, 128)}) > 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resolution": 10},
        {"resolution": 5000},
        {"resolution": 100.5},
        {"resolution": "512"},
        {"threshold_a": 0},
        {"threshold_b": 256},
        {"threshold_a": "low"},
    ],
)
def test_out_of_range_parameters_raise_input_error(kwargs):
    with pytest.raises(InputError):
        run_preprocessor("canny", square(), **kwargs)


def test_minus_one_means_default_like_the_controlnet_api():
    image = square(128, 32, 96)
    default = run_preprocessor("canny", image, resolution=128)
    minus_one = run_preprocessor("canny", image, resolution=128, threshold_a=-1, threshold_b=-1)
    np.testing.assert_array_equal(minus_one, default)
    assert run_preprocessor("canny", image, resolution=-1).shape == (512, 512, 3)


def test_numpy_scalars_are_accepted_as_parameters():
    out = run_preprocessor("canny", square(), resolution=np.int64(64), threshold_a=np.float32(100.0))
    np.testing.assert_array_equal(out, run_preprocessor("canny", square(), resolution=64))


def test_bad_image_raises_input_error():
    with pytest.raises(InputError):
        run_preprocessor("canny", "definitely not an image")
