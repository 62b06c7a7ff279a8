"""FaceID training data: the face embedding of each dataset image, computed once and cached.

The reference (tencent-ailab ``tutorial_train_faceid.py``) reads one precomputed embedding per image: the
normed ArcFace embedding of the image's face as insightface's ``FaceAnalysis`` gives it. Here the run makes
them itself with the panel's face analysis (``lib_adapters.face``: insightface's released detector and
recognizer run on onnxruntime, no insightface package), from the model pack ``ip_face_pack`` in the folder of
packs ``face_models`` (the WebUI's models/insightface/models). Where an image shows several faces the largest
is used, as in the panel.

Each image's result is cached in ``<cache_dir>/face-embeddings``, keyed by the file's content (SHA-256) and the
pack, so a second run, a resumed one, or the check of a grown dataset analyses only new or changed images. A
"no face" result is cached too: ``problems`` names every image without a face before the run starts (a
``DatasetInvalidError`` like an unreadable image's), since the reference's recipe has no embedding to give it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from safetensors import safe_open

from ..errors import MissingFileError
from ..face import FaceAnalyzer, FaceDevice, FaceResult, NoFaceError, SessionOptions
from ..face.discovery import LICENSE_NOTE, RELEASES, FaceModelFiles, find_pack_models
from ..models.faceid import FACE_EMBEDDING_DIM
from .config import IPAdapterConfig
from .data import DatasetProblem, ProblemKind
from .ip_data import read_rgb
from .latent_cache import save_cache_file

log = logging.getLogger(__name__)

CACHE_FOLDER = "face-embeddings"  # in TrainConfig.cache_dir
_FORMAT = 1  # the cached record's layout: a change gives new keys, never a misread file
NO_FACE = ("no face was found, and FaceID learns from the face in each image: remove the image, or crop it so that "
           "one face is large and clearly visible")


class FaceSource(Protocol):
    """What the embeddings need of a face analyzer: ``FaceAnalyzer.analyze`` (the largest face by default)."""

    def analyze(self, image: Any) -> FaceResult: ...


def face_models_folder(ip: IPAdapterConfig) -> Path:
    """The folder of packs, or a ``MissingFileError`` saying where the models go."""
    if ip.face_models is None:
        raise MissingFileError(
            f"FaceID training needs insightface's face models: put the '{ip.face_pack}' pack in "
            f"models/insightface/models/{ip.face_pack}/ of the WebUI, or give the folder that holds it to the command "
            f"line as --ip-face-models DIR (download: {RELEASES}). {LICENSE_NOTE}")
    return ip.face_models


def find_face_pack(ip: IPAdapterConfig) -> FaceModelFiles:
    """The detector and recognizer of the configured pack (``MissingFileError`` naming the files and folder)."""
    return find_pack_models(face_models_folder(ip), ip.face_pack)


def open_face_analyzer(ip: IPAdapterConfig) -> FaceSource:
    """The analyzer of the configured pack: on the GPU where onnxruntime has CUDA and torch sees one, else the CPU."""
    device = FaceDevice.CUDA if torch.cuda.is_available() else FaceDevice.CPU
    return FaceAnalyzer(find_face_pack(ip), SessionOptions(device=device))


@dataclass(frozen=True)
class FaceRecord:
    """One image's analysis: the normed embedding of its largest face, or None when it has no face."""

    embedding: torch.Tensor | None  # [512] float32
    faces: int


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FaceEmbeddings:
    """Normed face embeddings [N, 512] (fp32, CPU) of image files, analysed once each (memory, then disk)."""

    def __init__(self, ip: IPAdapterConfig, cache_dir: Path | None = None):
        self.pack = ip.face_pack
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._open: Callable[[], FaceSource] = lambda: open_face_analyzer(ip)  # looked up when first needed
        self._analyzer: FaceSource | None = None
        self._records: dict[tuple, FaceRecord] = {}
        self.hits = self.analysed = 0

    def key(self, path: Path) -> str:
        fields = dict(content=content_hash(path), pack=self.pack, format=_FORMAT)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]

    def record(self, path: Path) -> FaceRecord:
        path = Path(path)
        stat = path.stat()
        seen = (path.resolve(), stat.st_size, stat.st_mtime_ns)  # in memory: no hashing per batch, no stale entry
        found = self._records.get(seen)
        if found is None:
            key = self.key(path)
            found = self._cached(key)
            if found is None:
                found = self._analyse(path)
                self._store(key, path, found)
            self._records[seen] = found
        return found

    def _analyse(self, path: Path) -> FaceRecord:
        if self._analyzer is None:
            self._analyzer = self._open()
        self.analysed += 1
        try:
            face = self._analyzer.analyze(read_rgb(path))
        except NoFaceError:
            return FaceRecord(None, 0)
        embedding = torch.from_numpy(face.normed_embedding.astype("float32").copy()).reshape(FACE_EMBEDDING_DIM)
        return FaceRecord(embedding, int(face.faces_found))

    def problems(self, paths: list[Path]) -> list[DatasetProblem]:
        """Every image without a face (each file once), analysing those not seen before."""
        problems = [DatasetProblem(p, ProblemKind.NO_FACE, NO_FACE) for p in dict.fromkeys(map(Path, paths))
                    if self.record(p).embedding is None]
        several = sum(1 for r in self._records.values() if r.faces > 1)
        if several:
            log.info("FaceID: %d image(s) show several faces; the largest face of each is used", several)
        return problems

    def get(self, paths: list[Path]) -> torch.Tensor:
        out = []
        for path in paths:
            embedding = self.record(path).embedding
            if embedding is None:
                raise NoFaceError(f"{path}: {NO_FACE}")
            out.append(embedding)
        return torch.stack(out)

    def empty(self) -> torch.Tensor:
        """The reference's "no image" input (its image dropout and the samples' uncond): a zero embedding."""
        return torch.zeros(FACE_EMBEDDING_DIM)

    def release(self) -> None:
        """Drop the analyzer's sessions (the embeddings stay)."""
        self._analyzer = None

    # -- the disk cache ---------------------------------------------------------------------------------
    def _file(self, key: str) -> Path:
        return self.cache_dir / f"{key}.faceemb"  # safetensors inside; not named so (no model list shows it)

    def _cached(self, key: str) -> FaceRecord | None:
        if self.cache_dir is None or not self._file(key).is_file():
            return None
        try:
            with safe_open(str(self._file(key)), framework="pt") as f:
                embedding, faces = f.get_tensor("embedding"), int(f.metadata()["faces"])
        except Exception:  # a damaged cache file is recomputed, never trusted
            return None
        if embedding.shape != (FACE_EMBEDDING_DIM,) and faces:
            return None
        self.hits += 1
        return FaceRecord(embedding if faces else None, faces)

    def _store(self, key: str, path: Path, record: FaceRecord) -> None:
        if self.cache_dir is not None:
            embedding = record.embedding if record.embedding is not None else torch.zeros(0)
            save_cache_file(self._file(key), {"embedding": embedding.contiguous()},
                            {"faces": str(record.faces), "pack": self.pack, "image": str(path)})
