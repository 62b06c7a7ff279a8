"""to_hwc_uint8: every accepted input kind becomes H x W x 3 uint8 RGB; anything else is an InputError."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from lib_adapters.errors import InputError
from lib_adapters.preprocess.resize import to_hwc_uint8


def sample_rgb() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- PIL

def test_pil_rgb_is_returned_as_is():
    rgb = sample_rgb()
    out = to_hwc_uint8(Image.fromarray(rgb))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, rgb)


def test_pil_grey_is_replicated():
    grey = np.arange(35, dtype=np.uint8).reshape(5, 7)
    out = to_hwc_uint8(Image.fromarray(grey, mode="L"))
    np.testing.assert_array_equal(out, np.stack([grey] * 3, axis=2))


def test_pil_rgba_drops_alpha_without_compositing():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = [[0, 255], [128, 255]]
    out = to_hwc_uint8(Image.fromarray(rgba, mode="RGBA"))
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_pil_palette_becomes_its_colours():
    image = Image.new("P", (3, 2))
    image.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    image.putpixel((1, 0), 1)
    out = to_hwc_uint8(image)
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[0, 1]) == (40, 50, 60)


def test_sixteen_bit_png_is_scaled_to_eight_bits():
    depth = np.array([[0, 257 * 100], [65535, 257 * 3]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(depth).save(buffer, format="PNG")
    out = to_hwc_uint8(Image.open(io.BytesIO(buffer.getvalue())))
    np.testing.assert_array_equal(out[..., 0], [[0, 100], [255, 3]])
    assert (out[..., 0] == out[..., 2]).all()


def test_pil_float_mode_in_unit_range():
    values = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    out = to_hwc_uint8(Image.fromarray(values, mode="F"))
    np.testing.assert_array_equal(out[..., 1], [[0, 128], [255, 64]])


# ----------------------------------------------------------------------------- numpy

def test_numpy_hw_and_hw1_are_replicated():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    expected = np.stack([grey] * 3, axis=2)
    np.testing.assert_array_equal(to_hwc_uint8(grey), expected)
    np.testing.assert_array_equal(to_hwc_uint8(grey[..., None]), expected)


def test_numpy_rgba_drops_alpha():
    rgba = np.concatenate([sample_rgb(), np.zeros((5, 7, 1), dtype=np.uint8)], axis=2)
    np.testing.assert_array_equal(to_hwc_uint8(rgba), rgba[..., :3])


def test_numpy_result_is_a_copy():
    rgb = sample_rgb()
    out = to_hwc_uint8(rgb)
    out[:] = 0
    assert rgb.any()


def test_numpy_float_unit_range_is_scaled_and_rounded():
    values = np.array([[0.0, 0.5, 1.0, 0.2]], dtype=np.float64)
    np.testing.assert_array_equal(to_hwc_uint8(values)[..., 0], [[0, 128, 255, 51]])


def test_numpy_bool_and_uint16():
    mask = np.array([[True, False]])
    np.testing.assert_array_equal(to_hwc_uint8(mask)[..., 0], [[255, 0]])
    wide = np.array([[65535, 257]], dtype=np.uint16)
    np.testing.assert_array_equal(to_hwc_uint8(wide)[..., 0], [[255, 1]])


@pytest.mark.parametrize(
    "array",
    [
        np.array([[0.0, 2.0]]),  # float outside [0, 1]
        np.array([[np.nan, 0.5]]),
        np.array([[300, 2]], dtype=np.int32),
        np.zeros((3, 4, 5), dtype=np.uint8),  # 5 channels
        np.zeros((1, 3, 4, 3), dtype=np.uint8),  # a batch
        np.zeros((0, 4, 3), dtype=np.uint8),
        np.zeros((2, 2), dtype=np.complex64),
    ],
)
def test_numpy_rejects(array):
    with pytest.raises(InputError):
        to_hwc_uint8(array)


# ----------------------------------------------------------------------------- base64 / bytes

def test_base64_plain_and_data_url():
    rgb = sample_rgb()
    payload = encode(Image.fromarray(rgb))
    np.testing.assert_array_equal(to_hwc_uint8(payload), rgb)
    np.testing.assert_array_equal(to_hwc_uint8("data:image/png;base64," + payload), rgb)


def test_base64_rgba_data_url_drops_alpha():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 1] = 90
    rgba[..., 3] = 0
    url = "data:image/png;base64," + encode(Image.fromarray(rgba, mode="RGBA"))
    out = to_hwc_uint8(url)
    assert out.shape == (4, 4, 3)
    assert (out == [0, 90, 0]).all()


def test_base64_with_line_breaks_and_missing_padding():
    rgb = sample_rgb()
    payload = encode(Image.fromarray(rgb)).rstrip("=")
    wrapped = "\n".join(payload[i:i + 60] for i in range(0, len(payload), 60))
    np.testing.assert_array_equal(to_hwc_uint8(wrapped), rgb)


def test_base64_jpeg_decodes_close_to_source():
    flat = np.full((16, 16, 3), (30, 140, 220), dtype=np.uint8)
    out = to_hwc_uint8(encode(Image.fromarray(flat), fmt="JPEG"))
    assert np.abs(out.astype(int) - flat).max() <= 3


def test_encoded_bytes():
    rgb = sample_rgb()
    np.testing.assert_array_equal(to_hwc_uint8(base64.b64decode(encode(Image.fromarray(rgb)))), rgb)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("this is not base64 !!!", "base64"),
        (base64.b64encode(b"plain text, not an image").decode(), "decoded"),
        ("data:image/png,rawdata", "base64"),
        ("", "decoded"),
    ],
)
def test_bad_strings_raise_input_error(text, needle):
    with pytest.raises(InputError, match=needle):
        to_hwc_uint8(text)


# ----------------------------------------------------------------------------- gradio dicts, others

def test_gradio_editor_dict_uses_the_image():
    rgb = sample_rgb()
    mask = np.full((5, 7, 3), 255, dtype=np.uint8)
    np.testing.assert_array_equal(to_hwc_uint8({"image": rgb, "mask": mask}), rgb)
    np.testing.assert_array_equal(to_hwc_uint8({"image": encode(Image.fromarray(rgb)), "mask": None}), rgb)


@pytest.mark.parametrize("value", [{"mask": np.zeros((2, 2))}, {"image": None}, None, 3, [[0, 1]], object()])
def test_other_inputs_raise_input_error(value):
    with pytest.raises(InputError):
        to_hwc_uint8(value)


# ----------------------------------------------------------------------------- pixel limit

MP = 1 << 20


def _no_decoding(monkeypatch):
    """Make any pixel decoding fail the test: the limit must act on the header alone."""
    from PIL import ImageFile

    def refuse(self, *args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)


@pytest.mark.parametrize("wrap", ["base64", "data-url", "bytes", "editor-dict"])
def test_a_huge_png_is_refused_from_its_header_without_decoding(monkeypatch, wrap):
    import tracemalloc

    from fixtures.images import huge_black_png

    raw = huge_black_png(12000, 12000)
    assert len(raw) < 20_000
    text = base64.b64encode(raw).decode("ascii")
    value = {"base64": text, "data-url": "data:image/png;base64," + text, "bytes": raw,
             "editor-dict": {"image": text, "mask": None}}[wrap]
    _no_decoding(monkeypatch)
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as info:
            to_hwc_uint8(value, max_pixels=16 * MP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # the decoded image would be 144 MB (1 byte per pixel), 432 MB as RGB
    message = str(info.value)
    assert "12000x12000" in message and "137.3 megapixels" in message and "16 megapixels" in message
    assert "Largest condition, reference or mask image" in message


def test_a_huge_jpeg_header_is_refused_too(monkeypatch):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, format="JPEG")
    raw = bytearray(buffer.getvalue())
    sof = raw.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    raw[sof + 5:sof + 9] = (9000).to_bytes(2, "big") + (9000).to_bytes(2, "big")
    _no_decoding(monkeypatch)
    with pytest.raises(InputError, match="9000x9000"):
        to_hwc_uint8(bytes(raw), max_pixels=16 * MP)


def test_decoded_arrays_and_pil_images_are_checked_by_their_shape():
    array = np.zeros((1025, 1024, 3), np.uint8)
    with pytest.raises(InputError, match="1024x1025"):
        to_hwc_uint8(array, max_pixels=MP)
    with pytest.raises(InputError, match="1024x1025"):
        to_hwc_uint8(Image.fromarray(array), max_pixels=MP)
    with pytest.raises(InputError, match="1024x1025"):
        to_hwc_uint8({"image": array[:, :, 0], "mask": None}, max_pixels=MP)


def test_images_at_the_limit_or_without_a_limit_pass():
    array = np.zeros((1024, 1024, 3), np.uint8)
    assert to_hwc_uint8(array, max_pixels=MP).shape == (1024, 1024, 3)
    assert to_hwc_uint8(encode(Image.fromarray(array)), max_pixels=MP).shape == (1024, 1024, 3)
    assert to_hwc_uint8(np.zeros((1025, 1024), np.uint8), max_pixels=None).shape == (1025, 1024, 3)
    assert to_hwc_uint8(np.zeros((1025, 1024), np.uint8), max_pixels=0).shape == (1025, 1024, 3)
