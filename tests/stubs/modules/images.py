"""Fake of ``modules/images.py``: resizing, grids and image saving.

``resize_image`` follows v1.10.1 for modes 0 (stretch), 1 (crop) and 2 (fill); upscalers are only
the PIL ones ("None"/"Lanczos" -> LANCZOS, "Nearest" -> NEAREST). ``save_image`` writes
``<path>/<NNNNN>-<seed><suffix>.<ext>`` with the infotext in the PNG ``parameters`` chunk and runs the
``before_image_saved``/``image_saved`` callbacks; filename patterns and subdirectories are left out.
"""
from __future__ import annotations

import math
import os

from PIL import Image, ImageOps, PngImagePlugin

from modules import script_callbacks, shared

LANCZOS = Image.Resampling.LANCZOS if hasattr(Image, "Resampling") else Image.LANCZOS
NEAREST = Image.Resampling.NEAREST if hasattr(Image, "Resampling") else Image.NEAREST


def _resize(im: Image.Image, w: int, h: int, upscaler_name: str | None) -> Image.Image:
    resample = NEAREST if upscaler_name == "Nearest" and im.mode != "L" else LANCZOS
    return im.resize((w, h), resample=resample)


def resize_image(resize_mode: int, im: Image.Image, width: int, height: int, upscaler_name: str | None = None) -> Image.Image:
    """0: stretch to WxH; 1: keep aspect, fill and crop the excess; 2: keep aspect, fit and fill the borders
    with stretched edge strips of the image."""
    upscaler_name = upscaler_name or shared.opts.upscaler_for_img2img
    if resize_mode == 0:
        return _resize(im, width, height, upscaler_name)
    ratio, src_ratio = width / height, im.width / im.height
    if resize_mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = _resize(im, src_w, src_h, upscaler_name)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = _resize(im, src_w, src_h, upscaler_name)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + src_w, 0))
    return res


def flatten(img: Image.Image, bgcolor: str) -> Image.Image:
    """Composite transparency onto ``bgcolor``; returns RGB."""
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, bgcolor)
        background.paste(img, mask=img)
        img = background
    return img.convert("RGB")


def image_grid(imgs: list[Image.Image], batch_size: int = 1, rows: int | None = None) -> Image.Image:
    if rows is None:
        rows = max(1, round(math.sqrt(len(imgs)))) if batch_size == 1 else batch_size
        rows = min(rows, len(imgs))
    cols = math.ceil(len(imgs) / rows)
    params = script_callbacks.ImageGridLoopParams(imgs, cols, rows)
    script_callbacks.image_grid_callback(params)
    w, h = imgs[0].size
    grid = Image.new("RGB", size=(params.cols * w, params.rows * h), color="black")
    for i, img in enumerate(params.imgs):
        grid.paste(img, box=(i % params.cols * w, i // params.cols * h))
    return grid


def read(fp, **kwargs) -> Image.Image:
    image = Image.open(fp, **kwargs)
    return ImageOps.exif_transpose(image) or image


def save_image(image: Image.Image, path: str, basename: str, seed=None, prompt=None, extension: str = "png", info=None,
               short_filename: bool = False, no_prompt: bool = False, grid: bool = False,
               pnginfo_section_name: str = "parameters", p=None, existing_info=None, forced_filename=None,
               suffix: str = "", save_to_dirs=None) -> tuple[str, str | None]:
    """Save ``image`` under ``path``; returns ``(fullfn, txt_fullfn)`` like the real one (txt is None)."""
    os.makedirs(path, exist_ok=True)
    if forced_filename is None:
        count = len([x for x in os.listdir(path) if not x.endswith(".tmp")])
        decoration = "" if short_filename or seed is None else f"-{seed}"
        stem = f"{count:05}" if basename == "" else f"{basename}-{count:04}"
        fullfn = os.path.join(path, f"{stem}{decoration}{suffix}.{extension}")
    else:
        fullfn = os.path.join(path, f"{forced_filename}.{extension}")
    pnginfo = existing_info or {}
    if info is not None:
        pnginfo[pnginfo_section_name] = info
    params = script_callbacks.ImageSaveParams(image, p, fullfn, pnginfo)
    script_callbacks.before_image_saved_callback(params)
    png = PngImagePlugin.PngInfo()
    if shared.opts.enable_pnginfo:
        for k, v in params.pnginfo.items():
            png.add_text(k, str(v))
    params.image.save(params.filename, pnginfo=png if extension.lower() == "png" else None)
    script_callbacks.image_saved_callback(params)
    return params.filename, None
