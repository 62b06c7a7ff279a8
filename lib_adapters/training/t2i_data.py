"""T2I-Adapter datasets: image + condition + caption records, generation of missing conditions, condition pixels.

Two layouts, both with the TencentARC naming (``x.png``, its condition ``x.<condition>.png``, its
caption ``x.txt``):

* a folder, scanned like the LoRA dataset (kohya ``N_name`` repeat folders included), where
  condition files are not training images;
* a TencentARC meta ``.txt`` file: one image path per line, relative to the meta file's folder or
  absolute (``ldm/data/dataset_depth.py`` reads its ``laion_depth_meta_v1.txt`` so).

A missing condition is generated once with the chosen preprocessor, at the image's size, and kept in
the run's cache folder (``TrainConfig.cache_dir``/t2i-conditions/<preprocessor>/, under the output folder:
the dataset folder is never written); it is made again when the image is newer. Everything is checked
before training: ``load_t2i_records`` raises one ``DatasetInvalidError`` naming every bad file, or the
preprocessor's own ``MissingFileError`` when its weights are not there.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import AdapterError, FormatError, InputError, MissingFileError
from ..preprocess.registry import PreprocessorCache, get_preprocessor, run_preprocessor
from ..preprocess.resize import resize_exact
from .buckets import Placement, fit_to_bucket
from .config import T2IConfig, TrainConfig
from .data import (IMAGE_EXTENSIONS, DatasetInvalidError, DatasetProblem, ImageRecord, ProblemKind, read_record,
                   scan_dataset)

log = logging.getLogger(__name__)

CACHE_FOLDER = "t2i-conditions"  # inside TrainConfig.cache_dir
_ASPECT_TOLERANCE = 0.02  # a condition saved at a slightly rounded size still fits its image


def is_condition_file(path: Path, condition: str) -> bool:
    """``x.<condition>.<image extension>``: a condition, not a training image."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.stem.lower().endswith("." + condition.lower())


def find_condition(image: Path, condition: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        candidate = image.with_name(f"{image.stem}.{condition}{ext}")
        if candidate.is_file():
            return candidate
    return None


def _meta_records(meta: Path, min_size: int) -> tuple[Path, list[ImageRecord], list[DatasetProblem]]:
    """A meta file's records. Its lines are quoted in problems only when they name images: any .txt file can be
    given as a dataset (also by an API client), and a file that is not a meta file must not be read back."""
    root = meta.parent
    records: list[ImageRecord] = []
    problems: list[DatasetProblem] = []
    try:
        text = meta.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"the dataset {meta} is not a readable meta file ({type(exc).__name__}); give a folder or "
                         "a UTF-8 text file with one image path per line") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not any(Path(line).suffix.lower() in IMAGE_EXTENSIONS for _, line in lines):
        raise DatasetInvalidError(root, [DatasetProblem(meta, ProblemKind.EMPTY_FOLDER, "no line of it is an image "
                                                        f"path ({', '.join(IMAGE_EXTENSIONS)}); a TencentARC meta file "
                                                        "lists one image per line")])
    for number, line in lines:
        if Path(line).suffix.lower() not in IMAGE_EXTENSIONS:
            problems.append(DatasetProblem(meta, ProblemKind.MISSING_IMAGE, f"line {number} is not an image path"))
            continue
        image = Path(line) if Path(line).is_absolute() else root / line
        if not image.is_file():
            problems.append(DatasetProblem(image, ProblemKind.MISSING_IMAGE, f"listed in {meta.name} but not there"))
            continue
        record, found = read_record(image, 1, meta.stem, min_size)
        problems.extend(found)
        if record is not None:
            records.append(record)
    return root, records, problems


def _scan(config: TrainConfig) -> tuple[Path, list[ImageRecord], list[DatasetProblem]]:
    path = config.dataset_dir
    if path.is_file() and path.suffix.lower() == ".txt":
        return _meta_records(path, config.min_image_size)
    condition = config.t2i.condition
    records, problems = scan_dataset(path, config.min_image_size, exclude=lambda p: is_condition_file(p, condition))
    return path, records, problems


class ConditionMaker:
    """Generates missing conditions with one preprocessor; the detector is loaded on first use."""

    def __init__(self, t2i: T2IConfig, root: Path, cache_dir: Path):
        self.name = get_preprocessor(t2i.preprocessor).name  # InputError for an unknown name, before any work
        self.weights_dir = t2i.preprocessor_weights_dir
        self.condition = t2i.condition
        self.folder = cache_dir / CACHE_FOLDER / self.name
        self.root = root
        self._cache = PreprocessorCache()

    def cached_path(self, image: Path) -> Path:
        try:
            relative = image.resolve().relative_to(self.root.resolve())
        except ValueError:  # a meta file may list images outside its folder
            relative = Path(image.resolve().as_posix().lstrip("/").replace(":", ""))
        return self.folder / relative.parent / f"{image.stem}.{self.condition}.png"

    def get(self, record: ImageRecord) -> tuple[Path | None, DatasetProblem | None]:
        """The cached condition of ``record`` (made now if missing or older than the image)."""
        target = self.cached_path(record.path)
        if target.is_file() and target.stat().st_mtime_ns >= record.path.stat().st_mtime_ns:
            return target, None
        self._cache.get(self.name, self.weights_dir)  # MissingFileError/FormatError as in the panel: not per file
        try:
            with Image.open(record.path) as im:
                source = np.asarray(im.convert("RGB"))
            result = run_preprocessor(self.name, source, weights_dir=self.weights_dir, cache=self._cache)
        except (MissingFileError, FormatError):
            raise
        except (AdapterError, OSError) as exc:
            return None, DatasetProblem(record.path, ProblemKind.PREPROCESSOR_FAILED, f"{self.name}: {exc}")
        _save_png(resize_exact(result, record.width, record.height), target)
        log.info("made the %s condition of %s with %s", self.condition, record.path.name, self.name)
        return target, None


def _save_png(array: np.ndarray, target: Path) -> None:
    """Atomic, so that an interrupted run never leaves a half-written condition to be trusted next time."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_condition(path: Path, record: ImageRecord) -> DatasetProblem | None:
    try:
        with Image.open(path) as im:
            im.load()
            width, height = im.size
    except Exception as exc:  # PIL raises many types for bad files
        return DatasetProblem(path, ProblemKind.UNREADABLE_CONDITION, f"{type(exc).__name__}: {exc}")
    if abs(width / height - record.width / record.height) > _ASPECT_TOLERANCE * record.width / record.height:
        return DatasetProblem(path, ProblemKind.CONDITION_MISMATCH,
                              f"{width}x{height} but its image is {record.width}x{record.height}; a condition must "
                              "have its image's aspect ratio (best: the same size)")
    return None


def _attach(records: list[ImageRecord], maker: ConditionMaker | None, condition: str,
            problems: list[DatasetProblem], generate_later: bool) -> list[ImageRecord]:
    out = []
    for record in records:
        path = find_condition(record.path, condition)
        if path is None and maker is not None:
            path, problem = maker.get(record)
            problems.extend([problem] if problem is not None else [])
        elif path is None and not generate_later:
            problems.append(DatasetProblem(record.path, ProblemKind.MISSING_CONDITION,
                                           f"no {record.path.stem}.{condition}.png next to it; add it, or choose a "
                                           "preprocessor to make the missing conditions"))
        problem = _check_condition(path, record) if path is not None else None
        if problem is not None:
            problems.append(problem)
        elif path is not None:
            out.append(dataclasses.replace(record, condition=path))
    return out


def load_t2i_records(config: TrainConfig) -> list[ImageRecord]:
    """The records of a T2I-Adapter run, each with its condition; every problem is raised at once."""
    if not config.dataset_dir.exists():
        raise MissingFileError(f"the dataset {config.dataset_dir} does not exist; give a folder or a meta .txt file")
    root, records, problems = _scan(config)
    t2i = config.t2i
    # Generating conditions is slow; do it only for a dataset that is otherwise fine.
    maker = ConditionMaker(t2i, root, config.cache_dir) if t2i.preprocessor and not problems else None
    records = _attach(records, maker, t2i.condition, problems, generate_later=bool(t2i.preprocessor) and maker is None)
    if problems:
        raise DatasetInvalidError(root, problems)
    return records


def load_condition(path: Path, placement: Placement, channels: int) -> torch.Tensor:
    """The condition as ``[channels, H, W]`` in [0, 1], fitted exactly as its image was (``placement``)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != placement.original:
            im = im.resize(placement.original, Image.BICUBIC)
        array = np.asarray(fit_to_bucket(im, placement), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    return tensor[:1] if channels == 1 else tensor  # edge/sketch adapters read the first channel, as at inference
