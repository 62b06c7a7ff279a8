"""IP-Adapter training data: the reference's JSON list dataset, the CLIP vision encoder of a run, and the CLIP
image features of dataset images (optionally cached on disk).

A dataset is either the usual image + caption folder (``data.py``; the reference image of each sample is
the image itself) or the JSON list of tencent-ailab's ``tutorial_train.py``::

    [{"image_file": "1.png", "text": "A dog"}, ...]   # image paths relative to a root folder

CLIP input is prepared from the raw file as the reference's ``CLIPImageProcessor`` does (shortest side to
the encoder's size, centre crop), so features depend on the file alone, not on the training bucket: the
cache key is the encoder's identity (a fingerprint of its weights), which output is read, and the file
(path, byte size, modification time). A changed image or encoder gives a new key.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ..arch import BaseArch
from ..catalog import EncoderCatalog
from ..errors import InputError, MissingFileError
from ..formats.clip_vision import load_clip_vision
from ..models.clip_vision import ClipVisionEncoder, CropMode, EncoderNeed
from .config import IPAdapterConfig, IPProjection
from .data import DatasetInvalidError, DatasetProblem, ImageRecord, ProblemKind, _read_size, cap_caption
from .latent_cache import module_fingerprint, save_cache_file

CROP = CropMode.CENTER  # the reference's CLIPImageProcessor


# -- the JSON list dataset -------------------------------------------------------------------------------
def _entry_problem(path: Path, index: int, entry: object) -> DatasetProblem | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("image_file"), str) or not entry["image_file"]:
        return DatasetProblem(path, ProblemKind.UNREADABLE_CAPTION,
                              f"entry {index} is not an object with an \"image_file\" string")
    if not isinstance(entry.get("text"), str):
        return DatasetProblem(path, ProblemKind.MISSING_CAPTION, f"entry {index} ({entry['image_file']}) has no "
                              "\"text\" string (use \"\" for no caption)")
    return None


def scan_json_dataset(path: Path | str, data_root: Path | None = None, min_size: int = 64
                      ) -> tuple[list[ImageRecord], list[DatasetProblem]]:
    """Records and problems of a JSON list; images resolve against ``data_root`` (default: the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"the dataset list {path} does not exist")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"the dataset list {path} is not readable JSON ({type(exc).__name__}: {exc}); it must be "
                         "a list like [{\"image_file\": \"1.png\", \"text\": \"a dog\"}, ...]") from exc
    if not isinstance(entries, list) or not entries:
        raise InputError(f"the dataset list {path} must be a non-empty JSON list of "
                         "{\"image_file\": ..., \"text\": ...} objects")
    root = Path(data_root) if data_root is not None else path.parent
    records, problems = [], []
    for index, entry in enumerate(entries):
        problem = _entry_problem(path, index, entry)
        if problem is not None:
            problems.append(problem)
            continue
        image = root / entry["image_file"]
        if not image.is_file():
            problems.append(DatasetProblem(image, ProblemKind.MISSING_IMAGE, f"listed in {path.name} but not there"))
            continue
        size, problem = _read_size(image)
        if problem is not None:
            problems.append(problem)
        elif min(size) < min_size:
            problems.append(DatasetProblem(image, ProblemKind.TOO_SMALL,
                                           f"{size[0]}x{size[1]}, the shorter side must be at least {min_size}"))
        else:
            caption, capped = cap_caption(entry["text"].strip())
            records.append(ImageRecord(image, caption, 1, size[0], size[1], path.stem, caption_file=path,
                                       caption_capped=capped))
    return records, problems


def load_json_records(path: Path | str, data_root: Path | None = None, min_size: int = 64) -> list[ImageRecord]:
    """The JSON list's records after validation (``DatasetInvalidError`` naming every bad entry or file)."""
    records, problems = scan_json_dataset(path, data_root, min_size)
    if problems:
        raise DatasetInvalidError(Path(path), problems)
    return records


# -- the CLIP vision encoder ------------------------------------------------------------------------------
def reference_encoder(projection: IPProjection, arch: BaseArch) -> EncoderNeed:
    """What the released adapters were trained with: ViT-H/14 (image_embeds 1024 for SD1.5 plain, hidden states
    1280 for every plus), ViT-bigG/14 image_embeds (1280) for SDXL plain."""
    if projection is IPProjection.PLUS:
        return EncoderNeed(hidden_states=True, width=1280)
    return EncoderNeed(hidden_states=False, width=1280 if arch is BaseArch.SDXL else 1024)


def encoder_width(encoder: ClipVisionEncoder, hidden_states: bool) -> int:
    return encoder.shape.hidden_size if hidden_states else encoder.shape.projection_dim


def load_training_encoder(config: IPAdapterConfig, need: EncoderNeed) -> ClipVisionEncoder:
    """The configured encoder file, or the one the catalog finds for ``need`` (the panel's lookup)."""
    path = config.image_encoder
    if path is None:
        if not config.encoder_folders:
            raise InputError(f"IP-Adapter training needs a CLIP vision encoder: a {need.description} one. Choose "
                             "its file, or the folder that holds it (the WebUI's models/clip_vision).")
        path = EncoderCatalog(list(config.encoder_folders)).find(need.hidden_states, need.width, need.description)
    if not Path(path).is_file():
        raise MissingFileError(f"the CLIP vision encoder {path} does not exist. For ViT-H/14 use "
                               "models/image_encoder/model.safetensors of h94/IP-Adapter, for ViT-bigG/14 "
                               "sdxl_models/image_encoder/model.safetensors; any file name.")
    return load_clip_vision(path)


# -- features ---------------------------------------------------------------------------------------------
def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class ImageFeatures:
    """CLIP features [N, ...] (fp32, CPU) of image files: pooled ``image_embeds`` or penultimate hidden states."""

    def __init__(self, encoder: ClipVisionEncoder, hidden_states: bool, cache_dir: Path | None = None):
        self.encoder, self.hidden_states = encoder, hidden_states
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._identity = f"{module_fingerprint(encoder.model)}:{'hidden-2' if hidden_states else 'embeds'}:{CROP.name}"
        self._empty: torch.Tensor | None = None
        self.hits = self.misses = 0

    def key(self, path: Path) -> str:
        stat = Path(path).stat()
        fields = dict(encoder=self._identity, image=str(Path(path).resolve()), size=stat.st_size,
                      mtime_ns=stat.st_mtime_ns)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]

    def empty(self) -> torch.Tensor:
        """The "no image" features the reference trains its dropout with: zero embeddings, or the hidden states
        of an all-zero (normalised) input, the encoder's own "no image" that the panel uses too."""
        if self._empty is None:
            if self.hidden_states:
                with self._fp32():
                    self._empty = self.encoder.empty_hidden_states()[0]
            else:
                self._empty = torch.zeros(self.encoder.shape.projection_dim)
        return self._empty

    def _fp32(self):
        """fp32 features whatever the run's precision (they are cached)."""
        device = next(self.encoder.model.parameters()).device
        return torch.autocast(device.type, enabled=False)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._fp32():
            return self.encoder.encode(pixels, self.hidden_states)

    def get(self, paths: list[Path]) -> torch.Tensor:
        out: list[torch.Tensor | None] = [self._cached(p) for p in paths]
        missing = [i for i, t in enumerate(out) if t is None]
        if missing:
            encoded = self._encode(self.encoder.preprocess([read_rgb(paths[i]) for i in missing], CROP))
            for i, features in zip(missing, encoded):
                out[i] = features
                self._store(paths[i], features)
        return torch.stack(out)  # type: ignore[arg-type]

    def _file(self, path: Path) -> Path:
        return self.cache_dir / f"{self.key(path)}.clipfeat"  # safetensors inside; not named so (no model lists)

    def _cached(self, path: Path) -> torch.Tensor | None:
        if self.cache_dir is None or not self._file(path).is_file():
            self.misses += self.cache_dir is not None
            return None
        try:
            features = load_file(str(self._file(path)))["features"]
        except Exception:  # a damaged cache file is recomputed, never trusted
            self.misses += 1
            return None
        self.hits += 1
        return features

    def _store(self, path: Path, features: torch.Tensor) -> None:
        if self.cache_dir is not None:
            save_cache_file(self._file(path), {"features": features.contiguous()}, {"image": str(path)})
