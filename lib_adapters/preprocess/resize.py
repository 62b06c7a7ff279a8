"""Resize modes and image normalisation for control images.

Owns two things every unit needs before an adapter sees its hint:

* ``to_hwc_uint8``: whatever the UI or the API hands us (PIL image, numpy array, base64 string,
  gradio 3.41 image-editor dict) becomes one canonical form, an ``H x W x 3`` uint8 RGB array.
* ``fit_image``: that array is brought to exactly the generation size under one of the three
  resize modes the ecosystem knows (stretch, crop, pad), with the interpolation choice
  sd-webui-controlnet made popular, so hints look the way users expect.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from enum import Enum
from types import MappingProxyType
from typing import Any, Mapping, Union

import cv2
import numpy as np
from PIL import Image, ImageOps

from ..errors import InputError


class ResizeMode(str, Enum):
    """How a control image is fitted to the generation size."""

    JUST_RESIZE = "Just Resize"
    CROP_AND_RESIZE = "Crop and Resize"
    RESIZE_AND_FILL = "Resize and Fill"

    @classmethod
    def parse(cls, value: Union[ResizeMode, str, int]) -> ResizeMode:
        """Accept a label, an enum name, an index 0/1/2 or a legacy sd-webui-controlnet alias."""
        if isinstance(value, cls):
            return value
        # bool is an int subclass; True/False as a resize mode is a caller bug, not index 1/0.
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            members = list(cls)
            if 0 <= int(value) < len(members):
                return members[int(value)]
        elif isinstance(value, str):
            found = _MODE_LOOKUP.get(value.strip().casefold())
            if found is not None:
                return cls(found)
        valid = ", ".join(repr(m.value) for m in cls)
        raise InputError(
            f"Unknown resize mode {value!r}. Use one of {valid} "
            f"(or the enum names {', '.join(m.name for m in cls)}, or the indices 0, 1, 2)."
        )


# Label/name/alias (case-folded) -> label. Built once, read-only; ``ResizeMode.parse`` reads it.
_MODE_LOOKUP: Mapping[str, str] = MappingProxyType({
    **{m.value.casefold(): m.value for m in ResizeMode},
    **{m.name.casefold(): m.value for m in ResizeMode},
    # sd-webui-controlnet's own enum names and the labels older API clients still send.
    "resize": ResizeMode.JUST_RESIZE.value,
    "inner_fit": ResizeMode.CROP_AND_RESIZE.value,
    "outer_fit": ResizeMode.RESIZE_AND_FILL.value,
    "scale to fit (inner fit)": ResizeMode.CROP_AND_RESIZE.value,
    "inner fit (scale to fit)": ResizeMode.CROP_AND_RESIZE.value,
    "envelope (outer fit)": ResizeMode.RESIZE_AND_FILL.value,
    "outer fit (shrink to fit)": ResizeMode.RESIZE_AND_FILL.value,
})


# ---------------------------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------------------------

def _unique_colour_count(image: np.ndarray) -> int:
    """Number of distinct pixel values, counting whole pixels (not channels) as one colour."""
    flat = image.reshape(-1, image.shape[2]).astype(np.uint32)
    if flat.shape[1] == 1:
        packed = flat[:, 0]
    else:
        # Pack up to 3 channels into one integer so np.unique works on a 1-D array (much faster
        # than np.unique(axis=0)). Extra channels only matter for rare 4-channel maps.
        packed = flat[:, 0] << 16 | flat[:, 1] << 8 | flat[:, min(2, flat.shape[1] - 1)]
    return int(np.unique(packed).size)


def _interpolation(image: np.ndarray, width: int, height: int) -> int:
    """Pick the interpolation the way sd-webui-controlnet does, so hints match user expectations.

    A handful of distinct colours means a segmentation or pose map: blending would invent colours
    that mean nothing (or another class), so nearest. Otherwise area when shrinking (no aliasing)
    and cubic when enlarging (sharper than linear).
    """
    if 2 < _unique_colour_count(image) < 200:
        return cv2.INTER_NEAREST
    if width * height < image.shape[0] * image.shape[1]:
        return cv2.INTER_AREA
    return cv2.INTER_CUBIC


def resize_exact(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Stretch ``image`` (HWC) to exactly ``height x width`` with the high-quality interpolation."""
    if image.shape[0] == height and image.shape[1] == width:
        return image.copy()
    channels = image.shape[2]
    out = cv2.resize(image, (width, height), interpolation=_interpolation(image, width, height))
    # cv2 drops a trailing channel axis of size 1; keep the HWC contract.
    return out.reshape(height, width, channels)


def short_side_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(height, width) with the short side equal to ``resolution`` and the aspect ratio kept."""
    k = resolution / min(height, width)
    return max(1, int(round(height * k))), max(1, int(round(width * k)))


def _check_fit_args(image: np.ndarray, width: int, height: int) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.dtype != np.uint8:
        got = getattr(image, "shape", type(image).__name__)
        raise InputError(f"fit_image needs an H x W x C uint8 array, got {got}.")
    if min(image.shape[:2]) < 1:
        raise InputError(f"fit_image got an empty image of shape {image.shape}.")
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"fit_image {name} must be a positive integer, got {value!r}.")


def fit_image(image: np.ndarray, width: int, height: int, mode: ResizeMode) -> np.ndarray:
    """Return ``image`` (HWC uint8) fitted to exactly ``(height, width, C)``.

    * Just Resize: stretch, the aspect ratio is not kept.
    * Crop and Resize: scale so the image covers the target, then crop the centre.
    * Resize and Fill: scale so the image fits inside the target, then pad the centred image with
      the median colour of its border (the padding then reads as "more background").
    """
    _check_fit_args(image, width, height)
    width, height = int(width), int(height)
    mode = ResizeMode.parse(mode)
    old_h, old_w = image.shape[:2]
    if mode is ResizeMode.JUST_RESIZE:
        return resize_exact(image, width, height)

    kw, kh = width / old_w, height / old_h
    if mode is ResizeMode.CROP_AND_RESIZE:
        k = max(kw, kh)
        # Never below the target: float rounding must not leave a 1-px gap to crop into.
        new_w, new_h = max(width, int(round(old_w * k))), max(height, int(round(old_h * k)))
        scaled = resize_exact(image, new_w, new_h)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return scaled[top:top + height, left:left + width].copy()

    k = min(kw, kh)
    new_w = min(width, max(1, int(round(old_w * k))))
    new_h = min(height, max(1, int(round(old_h * k))))
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0)
    fill = np.median(border, axis=0).round().astype(np.uint8)
    out = np.empty((height, width, image.shape[2]), dtype=np.uint8)
    out[:] = fill
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top:top + new_h, left:left + new_w] = resize_exact(image, new_w, new_h)
    return out


# ---------------------------------------------------------------------------------------------
# Normalising inputs
# ---------------------------------------------------------------------------------------------

# 16 x 1024 x 1024 pixels: 4096 x 4096 passes. A 17 KB PNG can declare 12000 x 12000 pixels (3.4 GB once
# decoded and converted), so encoded images are measured from their header, before any pixel is decoded.
MEGAPIXEL = 1 << 20
DEFAULT_MAX_MEGAPIXELS = 16
LIMIT_SETTING = "Settings -> Adapters -> Largest condition, reference or mask image (megapixels)"


def check_pixel_count(width: int, height: int, max_pixels: int | None) -> None:
    """InputError when a ``width x height`` image is above ``max_pixels`` (None or 0: no limit)."""
    if max_pixels and width * height > max_pixels:
        raise InputError(
            f"The image is {width}x{height} ({width * height / MEGAPIXEL:.1f} megapixels), above the limit of "
            f"{max_pixels / MEGAPIXEL:g} megapixels set in {LIMIT_SETTING}; it was refused before decoding. "
            "Use a smaller image, or raise the limit."
        )


def _decode_base64(text: str, max_pixels: int | None = None) -> Image.Image:
    payload = text.strip()
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InputError(
                f"Image data URL {header[:40]!r}... is not base64-encoded; expected "
                "'data:image/png;base64,<data>'."
            )
    payload = "".join(payload.split())  # clients wrap long base64 lines
    payload += "=" * (-len(payload) % 4)  # and some drop the padding
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"The image string is not valid base64 ({exc}).") from None
    return _open_image_bytes(raw, max_pixels)


def _open_image_bytes(raw: bytes, max_pixels: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            if max_pixels:  # our own, stricter limit decides below: no "decompression bomb" warning first
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))  # lazy: reads the header (format, size), no pixels yet
        check_pixel_count(image.width, image.height, max_pixels)
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(
            f"The image data ({len(raw)} bytes) could not be decoded as PNG, JPEG, WebP or another "
            f"format Pillow reads: {exc}"
        ) from None
    # Phone photos carry their rotation in EXIF; honour it as every image viewer does.
    return ImageOps.exif_transpose(image)


def _pil_to_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("RGB", "RGBA", "L"):
        return np.asarray(image)
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit PNGs (typical for exported depth maps) open as "I;16" or "I" with a 0..65535
        # range; "I" can also hold 8-bit data, and "F" either [0, 1] or 0..255 data.
        array = np.asarray(image).astype(np.float64)
        peak = float(array.max(initial=0.0))
        if mode.startswith("I;16") or (mode == "I" and peak > 255.0):
            scale = 65535.0
        elif mode == "F" and peak <= 1.0:
            scale = 1.0
        else:
            scale = 255.0
        return np.clip(array / scale, 0.0, 1.0)
    has_alpha = "A" in mode or "transparency" in image.info
    return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError("The image array holds NaN or infinite values.")
        lo, hi = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise InputError(
                f"A float image must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}]; pass uint8 "
                "for 0..255 data."
            )
        return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.dtype == np.uint16:
        return (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise InputError(
                f"An integer image of dtype {array.dtype} must hold values in 0..255, got "
                f"{array.min()}..{array.max()}."
            )
        return array.astype(np.uint8)
    raise InputError(f"Unsupported image array dtype {array.dtype}.")


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise InputError(
            f"An image array must be H x W, H x W x 1, H x W x 3 or H x W x 4, got shape "
            f"{array.shape}."
        )
    if min(array.shape[:2]) < 1:
        raise InputError(f"The image is empty (shape {array.shape}).")
    array = _array_to_uint8(array)
    channels = array.shape[2]
    if channels <= 2:  # grey, or grey + alpha: alpha is dropped like RGBA's
        return np.repeat(array[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def to_hwc_uint8(image: Any, max_pixels: int | None = None) -> np.ndarray:
    """Return any supported image as a new ``H x W x 3`` uint8 RGB array.

    Accepts a PIL image (any mode), a numpy array (H x W, H x W x 1/3/4, uint8 / bool /
    uint16 / float in [0, 1]), a base64 string (optionally a ``data:image/...;base64,`` URL),
    encoded image bytes, or a gradio 3.41 image-editor dict ``{"image": ..., "mask": ...}`` (only
    the image is used). Alpha channels are dropped, not composited. An image of more than
    ``max_pixels`` pixels is refused (``InputError``): encoded data by its header, before decoding.
    """
    if isinstance(image, dict):
        if image.get("image") is None:
            raise InputError(
                "The image-editor value has no 'image' entry; expected {'image': ..., 'mask': ...}."
            )
        return to_hwc_uint8(image["image"], max_pixels)
    if isinstance(image, str):
        image = _decode_base64(image, max_pixels)
    elif isinstance(image, (bytes, bytearray)):
        image = _open_image_bytes(bytes(image), max_pixels)
    if isinstance(image, Image.Image):
        check_pixel_count(image.width, image.height, max_pixels)
        return np.array(_array_to_rgb(_pil_to_array(image)), copy=True)
    if isinstance(image, np.ndarray):
        if image.ndim >= 2:
            check_pixel_count(image.shape[1], image.shape[0], max_pixels)
        return np.array(_array_to_rgb(image), copy=True)
    if image is None:
        raise InputError("No image was given.")
    raise InputError(
        f"Unsupported image type {type(image).__name__}: expected a PIL image, a numpy array, a "
        "base64 string or a {'image': ..., 'mask': ...} dict."
    )
