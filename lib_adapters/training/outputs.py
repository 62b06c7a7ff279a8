"""Writing a run's files so that nothing is lost: atomic writes, a full disk said in words, no silent overwrite.

* ``atomic_write(path, write)``: ``write(tmp)`` fills ``.<name>.<8 random>.tmp`` beside ``path``, then one
  ``os.replace`` puts it in place, so a reader never sees half a file and a failed write leaves the old
  one as it was. The temporary file is created as a plain ``open()`` would (0666 less the process umask,
  0644 usually), not 0600 as ``mkstemp`` makes it. A kill between the two steps leaves the temporary
  file behind: ``remove_temp_files`` clears those of one file name at the next start of that run.
* A write that fails for lack of space (``ENOSPC``/``EDQUOT``, or a library's own words for it, or a disk
  left with almost nothing free) raises ``DiskFullError`` naming the file and the free space.
* A published file names the run that wrote it (its session id in the metadata: ``ss_session_id``
  for LoRA, ``session_id`` for IP-Adapters, ``t2i_adapter.session_id`` for T2I-Adapters). ``check_replace``
  refuses to replace an existing file of another run unless the user asked to overwrite; a resumed run
  keeps its session id, so it may replace what it published itself when it was interrupted.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable

from ..errors import DiskFullError, InputError

RUN_ID_KEYS = ("ss_session_id", "session_id", "t2i_adapter.session_id")
_TEMP_SUFFIX = r"\.[a-z0-9_]{8}\.tmp"  # mkstemp's 8 characters (older files) and our 8 hex digits
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# safetensors (Rust) and torch report a full disk in their own exception types; these say it in words.
_DISK_FULL_WORDS = ("no space left on device", "storagefull", "os error 28", "disk quota exceeded")
_NEARLY_FULL = 1 << 20  # torch.save says only "unexpected pos ..."; a disk this full at that moment is the cause


class OutputExistsError(InputError):
    """The output file exists and was not written by this run; nothing was started."""


def _temp_path(path: Path) -> Path:
    """A new empty file beside ``path``, created with the process umask applied (as ``open()`` creates files)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` then move the result over ``path`` in one step (no half-written file, ever).
    ``DiskFullError`` when the disk is full; the file that was at ``path`` stays as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(path)
    except OSError as exc:
        raise disk_full_error(exc, path) or exc
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except Exception as exc:
        full = disk_full_error(exc, path)  # measured while the partial file still holds its space
        if full is not None:
            raise full from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def free_bytes(path: Path) -> int | None:
    """Free space on the disk holding ``path`` (its nearest existing folder), or None if unknown."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full_error(exc: BaseException, path: Path | str | None = None) -> DiskFullError | None:
    """``exc`` as a ``DiskFullError`` when it comes from a full disk, else None."""
    if isinstance(exc, DiskFullError):
        return exc
    where = Path(path if path is not None else getattr(exc, "filename", None) or ".")
    words = str(exc).lower()
    full = (isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS) or any(w in words for w in _DISK_FULL_WORDS)
    free = free_bytes(where)
    if not full and not (isinstance(exc, RuntimeError) and free is not None and free < _NEARLY_FULL):
        return None
    return DiskFullError(where, free)


# -- which run wrote a file -------------------------------------------------------------------------------
def file_run_id(path: Path) -> str | None:
    """The session id in a .safetensors file's metadata (None: no such key, or not a readable file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001  (an unreadable file was not written by any run of ours)
        return None
    return next((metadata[k] for k in RUN_ID_KEYS if metadata.get(k)), None)


def check_replace(target: Path, run_id: str | None, overwrite: bool, how_to_overwrite: str) -> None:
    """``OutputExistsError`` unless ``target`` is free, ``overwrite`` is set, or ``target`` was written by the run
    ``run_id`` (a resumed run replacing the file it published when interrupted)."""
    target = Path(target)
    if overwrite or not target.exists():
        return
    if run_id is not None and file_run_id(target) == run_id:
        return
    raise OutputExistsError(
        f"{target} already exists and was not written by this run, so it is left as it is. Choose another output "
        f"name, or {how_to_overwrite} to replace it.")


# -- temporary files left by a kill -----------------------------------------------------------------------------
def temp_file_pattern(file_pattern: str) -> re.Pattern:
    """The temporary files ``atomic_write`` makes for files whose names match the regex ``file_pattern``."""
    return re.compile(r"\." + file_pattern + _TEMP_SUFFIX + r"\Z")


def remove_temp_files(folder: Path, pattern: re.Pattern) -> list[Path]:
    """Delete the files in ``folder`` (not below it) whose names match ``pattern``; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if pattern.match(entry.name) and entry.is_file():
            entry.unlink()
            removed.append(entry)
    return removed


def remove_output_temp_files(folders: Iterable[Path], output_name: str) -> list[Path]:
    """Leftovers of ``<output_name>.safetensors`` being written in each folder (another name's are left alone)."""
    pattern = temp_file_pattern(re.escape(f"{output_name}.safetensors"))
    return [p for folder in folders for p in remove_temp_files(folder, pattern)]
