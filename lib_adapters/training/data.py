"""The folder dataset: images with same-stem captions, kohya-style ``N_name`` repeat folders, validation.

Layout (the kohya DreamBooth layout, plus images directly in the root)::

    dataset/
      a.png  a.txt             repeats 1
      10_cat/ b.jpg b.caption  repeats 10 (the folder name's leading integer)
      misc/ c.png c.txt        repeats 1 (a folder without a leading number)

A caption is the first non-empty line of ``<stem>.txt`` or, failing that, ``<stem>.caption``, capped at
``CAPTION_MAX_CHARS`` (what the model reads; ``cap_caption``): a caption file is read only up to what that
needs, so a huge one costs no memory, and the record says it was cut so the run can warn once per file.
Folders whose names start with "." are skipped (caches, ``.ipynb_checkpoints``); deeper folders are
not read. ``load_records`` reads every image and caption once and reports *all* problems, file by
file (one ``DatasetInvalidError``), before any training starts; ``scan_dataset`` returns them.
"""
from __future__ import annotations

import codecs
import re
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

from PIL import Image

from ..errors import InputError, MissingFileError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")

# What a caption can usefully hold. The WebUI's text encoder reads a prompt in chunks of 75 tokens
# (``sd_hijack_clip``: 77 with the start and end tokens), each chunk one more text-encoder pass per step and 77
# more tokens for every cross-attention; it sets no limit, so a 5 MB caption grew the process to 18.8 GB. We keep
# 3 chunks (225 tokens, kohya's longest ``max_token_length``; diffusers reads 77) and, without a tokenizer at
# hand, cap characters: a CLIP token covers about 4 characters of English text, so 10 per token keeps 225 tokens
# of any ordinary caption.
CAPTION_CHUNK_TOKENS = 75
CAPTION_MAX_CHUNKS = 3
CAPTION_MAX_CHARS = CAPTION_CHUNK_TOKENS * CAPTION_MAX_CHUNKS * 10  # 2,250
_CAPTION_READ_BYTES = CAPTION_MAX_CHARS * 4 + 4  # UTF-8: at most 4 bytes a character


class ProblemKind(str, Enum):
    UNREADABLE_IMAGE = "unreadable image"
    MISSING_CAPTION = "missing caption"
    EMPTY_CAPTION = "empty caption"
    UNREADABLE_CAPTION = "unreadable caption"
    TOO_SMALL = "image too small"
    EMPTY_FOLDER = "empty folder"
    ZERO_REPEATS = "zero repeats"
    MISSING_IMAGE = "missing image"  # listed in a meta file but not there
    MISSING_CONDITION = "missing condition"
    UNREADABLE_CONDITION = "unreadable condition"
    CONDITION_MISMATCH = "condition does not fit the image"
    PREPROCESSOR_FAILED = "preprocessor failed"
    NO_FACE = "no face"  # IP-Adapter FaceID: the face analysis found none


@dataclass(frozen=True)
class DatasetProblem:
    path: Path
    kind: ProblemKind
    detail: str

    def describe(self, root: Path | None = None) -> str:
        shown = self.path
        if root is not None:
            try:
                shown = self.path.relative_to(root)
            except ValueError:
                pass
        return f"{shown if str(shown) != '.' else self.path}: {self.kind.value} ({self.detail})"


@dataclass(frozen=True)
class ImageRecord:
    """One training image: where it is, its caption, how often it repeats per epoch, its size."""

    path: Path
    caption: str
    repeats: int
    width: int
    height: int
    folder: str  # the image's folder name (the root's own name for root images): kohya's tag-frequency key
    condition: Path | None = None  # T2I-Adapter: the condition image of this sample
    caption_file: Path | None = None  # where the caption was read (a .txt/.caption file, or a JSON list)
    caption_capped: bool = False  # the caption was longer than CAPTION_MAX_CHARS and was cut (the run warns once)


class DatasetInvalidError(InputError):
    """The dataset has problems; ``problems`` lists each file and what is wrong with it."""

    def __init__(self, root: Path, problems: list[DatasetProblem]):
        self.problems = problems
        lines = "\n".join(f"  - {p.describe(root)}" for p in problems)
        super().__init__(f"the dataset {root} has {len(problems)} problem(s); fix them and start again:\n{lines}")


def dataset_root(dataset: Path) -> Path:
    """The folder a dataset's messages name files relative to: the folder itself, or a list file's folder."""
    return dataset if dataset.is_dir() else dataset.parent


def find_caption(image: Path) -> Path | None:
    """``<stem>.txt`` if it exists, else ``<stem>.caption``, else None."""
    for ext in CAPTION_EXTENSIONS:
        candidate = image.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _folders(root: Path) -> list[tuple[Path, int, str]]:
    """(folder, repeats, name) for the root (only if it holds images) and each visible sub-folder."""
    out = []
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if any(_is_image(p) for p in root.iterdir()) or not subfolders:
        out.append((root, 1, root.name))
    for folder in subfolders:
        match = _REPEAT_FOLDER.match(folder.name)
        out.append((folder, int(match.group(1)) if match else 1, folder.name))
    return out


def cap_caption(text: str) -> tuple[str, bool]:
    """(the caption cut to ``CAPTION_MAX_CHARS``, at a word or tag boundary when there is one near; whether it was
    cut)."""
    if len(text) <= CAPTION_MAX_CHARS:
        return text, False
    cut = text[:CAPTION_MAX_CHARS]
    boundary = max(cut.rfind(" "), cut.rfind(","))
    if boundary >= CAPTION_MAX_CHARS * 0.9:
        cut = cut[:boundary]
    return cut.rstrip(" ,"), True


def _read_text_start(path: Path) -> tuple[str, bool]:
    """The file's text, read only as far as a capped caption needs (``UnicodeDecodeError`` for bad UTF-8); whether
    there was more."""
    with path.open("rb") as f:
        data = f.read(_CAPTION_READ_BYTES)
        more = bool(f.read(1))
    text = codecs.getincrementaldecoder("utf-8")().decode(data, final=not more)  # a cut character is dropped
    return text, more


def _read_caption(image: Path) -> tuple[str | None, Path | None, bool, DatasetProblem | None]:
    """(caption, its file, whether it was capped, problem)."""
    caption_file = find_caption(image)
    if caption_file is None:
        return None, None, False, DatasetProblem(image, ProblemKind.MISSING_CAPTION,
                                                 f"no {image.stem}.txt or {image.stem}.caption next to it")
    try:
        text, more = _read_text_start(caption_file)
    except (OSError, UnicodeDecodeError) as exc:
        return None, caption_file, False, DatasetProblem(caption_file, ProblemKind.UNREADABLE_CAPTION,
                                                         f"{type(exc).__name__}: {exc}")
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        detail = f"no caption in its first {_CAPTION_READ_BYTES} bytes" if more else "the caption file is empty"
        return None, caption_file, False, DatasetProblem(caption_file, ProblemKind.EMPTY_CAPTION, detail)
    caption, capped = cap_caption(lines[first].strip())
    goes_on = more and first == len(lines) - 1  # the line continues past what was read
    return caption, caption_file, capped or goes_on, None


def _read_size(image: Path) -> tuple[tuple[int, int] | None, DatasetProblem | None]:
    """Decode the whole image once (a truncated file often passes a header-only check)."""
    try:
        with Image.open(image) as im:
            im.load()
            return im.size, None
    except Exception as exc:  # PIL raises many types for bad files
        return None, DatasetProblem(image, ProblemKind.UNREADABLE_IMAGE, f"{type(exc).__name__}: {exc}")


def read_record(image: Path, repeats: int, folder: str,
                min_size: int) -> tuple[ImageRecord | None, list[DatasetProblem]]:
    """One image with its caption as a record (None if unusable), and its problems."""
    size, problem = _read_size(image)
    caption, caption_file, capped, caption_problem = _read_caption(image)
    problems = [p for p in (problem, caption_problem) if p is not None]
    if size is not None and min(size) < min_size:
        problems.append(DatasetProblem(image, ProblemKind.TOO_SMALL,
                                       f"{size[0]}x{size[1]}, the shorter side must be at least {min_size}"))
    elif size is not None and caption is not None:
        return ImageRecord(image, caption, repeats, size[0], size[1], folder, caption_file=caption_file,
                           caption_capped=capped), problems
    return None, problems


def scan_dataset(root: Path | str, min_size: int = 64, exclude: Callable[[Path], bool] | None = None
                 ) -> tuple[list[ImageRecord], list[DatasetProblem]]:
    """Every usable image as a record, and every problem found; raises only if ``root`` is missing.

    ``exclude`` skips images that are not training images (e.g. a T2I-Adapter's ``x.depth.png``)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"the dataset folder {root} does not exist or is not a folder")
    records: list[ImageRecord] = []
    problems: list[DatasetProblem] = []
    for folder, repeats, name in _folders(root):
        images = sorted((p for p in folder.iterdir() if _is_image(p) and not (exclude and exclude(p))),
                        key=lambda p: p.name)
        if not images:
            problems.append(DatasetProblem(folder, ProblemKind.EMPTY_FOLDER,
                                           f"no images ({', '.join(IMAGE_EXTENSIONS)}) in it"))
            continue
        if repeats == 0:
            problems.append(DatasetProblem(folder, ProblemKind.ZERO_REPEATS,
                                           "the folder name starts with 0, so its images would never be used"))
            continue
        for image in images:
            record, found = read_record(image, repeats, name, min_size)
            problems.extend(found)
            if record is not None:
                records.append(record)
    if problems and not records and all(p.kind is ProblemKind.EMPTY_FOLDER for p in problems):
        # Not a dataset at all: say so once, without naming the folders inside (an API client may name any folder).
        problems = [DatasetProblem(root, ProblemKind.EMPTY_FOLDER,
                                   f"no images ({', '.join(IMAGE_EXTENSIONS)}) in it or in its sub-folders")]
    return records, problems


def load_records(path: Path | str, min_size: int = 64) -> list[ImageRecord]:
    """The dataset's records, after validation (``DatasetInvalidError`` if anything is wrong)."""
    records, problems = scan_dataset(path, min_size)
    if problems:
        raise DatasetInvalidError(Path(path), problems)
    return records


def tag_frequency(records: list[ImageRecord]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per folder, how many captions contain each comma-separated tag."""
    out: dict[str, Counter] = {}
    for record in records:
        counter = out.setdefault(record.folder, Counter())
        for tag in record.caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counter[tag] += 1
    return {folder: dict(counter) for folder, counter in out.items()}

