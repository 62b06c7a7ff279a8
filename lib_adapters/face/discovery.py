"""Finding the face detector and recognizer in a model folder the user filled.

The user unpacks insightface's released model packs into ``<models>/insightface/models/<pack>/``
(``buffalo_l``: det_10g.onnx, w600k_r50.onnx, ...; ``antelopev2``: scrfd_10g_bnkps.onnx,
glintr100.onnx, ...). Which file is which is read off each graph, as insightface's model_zoo does,
not off its name: an SCRFD detector has 6, 9, 10 or 15 outputs (scores, boxes and optionally
keypoints for 3 or 5 strides); an ArcFace recognizer takes 3x112x112 images and has one 512-wide
output. Landmark and gender/age models of the pack are recognised as neither and ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import FormatError, MissingFileError
from .onnx_info import GraphInfo, read_graph_info

DEFAULT_PACK = "buffalo_l"
RELEASES = "https://github.com/deepinsight/insightface/releases (v0.7: buffalo_l.zip, antelopev2.zip)"
LICENSE_NOTE = "InsightFace's released models are for non-commercial research use only."
EMBEDDING_DIM = 512
RECOGNIZER_SIZE = 112
# What each released pack calls its two models: only for messages, never to decide.
_EXPECTED = {"buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
             "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx")}
SCRFD_OUTPUT_COUNTS = (6, 9, 10, 15)


class FaceModelRole(str, Enum):
    DETECTOR = "detector"
    RECOGNIZER = "recognizer"


@dataclass(frozen=True)
class FaceModelFiles:
    pack: str
    folder: Path
    detector: Path
    recognizer: Path


def face_models_root(models_dir: str | Path) -> Path:
    """``<models>/insightface/models``, where insightface itself keeps its packs."""
    return Path(models_dir) / "insightface" / "models"


def available_packs(models_dir: str | Path) -> list[str]:
    """Pack folders that hold at least one ONNX file (for a dropdown), sorted."""
    root = face_models_root(models_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _onnx_files(p))


def classify_graph(info: GraphInfo) -> FaceModelRole | None:
    if len(info.outputs) in SCRFD_OUTPUT_COUNTS and info.inputs:
        return FaceModelRole.DETECTOR
    if len(info.inputs) >= 1 and len(info.outputs) == 1:
        shape = info.inputs[0].shape
        out = info.outputs[0].shape
        if len(shape) == 4 and tuple(shape[1:]) == (3, RECOGNIZER_SIZE, RECOGNIZER_SIZE) \
                and out and out[-1] == EMBEDDING_DIM:
            return FaceModelRole.RECOGNIZER
    return None


def _onnx_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.onnx") if p.is_file())


def _pack_folder(root: Path, pack: str) -> Path:
    folder = root / pack
    nested = folder / pack  # some unzip tools keep the archive's own top folder (antelopev2.zip does)
    if not _onnx_files(folder) and _onnx_files(nested):
        return nested
    return folder


def _where_to_get(pack: str, folder: Path) -> str:
    det, rec = _EXPECTED.get(pack, _EXPECTED[DEFAULT_PACK])
    return (f"Put {det} (the face detector) and {rec} (the face recognizer) from insightface's '{pack}' pack in "
            f"{folder} (download: {RELEASES}). {LICENSE_NOTE}")


def find_face_models(models_dir: str | Path, pack: str = DEFAULT_PACK) -> FaceModelFiles:
    """The detector and recognizer of ``pack``; ``MissingFileError`` saying which file goes where."""
    return find_pack_models(face_models_root(models_dir), pack)


def find_pack_models(root: str | Path, pack: str = DEFAULT_PACK) -> FaceModelFiles:
    """``find_face_models`` in a folder of packs given as such (``root/<pack>/``: the trainer's
    ``--ip-face-models``)."""
    folder = _pack_folder(Path(root), pack)
    if not folder.is_dir():
        raise MissingFileError(f"Face models not found: the folder {folder} does not exist. "
                               + _where_to_get(pack, folder))
    found: dict[FaceModelRole, Path] = {}
    unreadable: list[str] = []
    for path in _onnx_files(folder):  # sorted, so the first of two candidates wins, as in insightface
        try:
            role = classify_graph(read_graph_info(path))
        except FormatError:
            unreadable.append(path.name)
            continue
        if role is not None and role not in found:
            found[role] = path
    missing = [role for role in FaceModelRole if role not in found]
    if missing:
        names = " and ".join(f"no face {role.value}" for role in missing)
        damaged = f" (unreadable: {', '.join(unreadable)})" if unreadable else ""
        raise MissingFileError(f"{folder}: {names} found among its ONNX files{damaged}. " + _where_to_get(pack, folder))
    return FaceModelFiles(pack=pack, folder=folder, detector=found[FaceModelRole.DETECTOR],
                          recognizer=found[FaceModelRole.RECOGNIZER])
