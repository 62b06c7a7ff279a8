"""Run by the WebUI's launcher at every start: installs only what the WebUI lacks.

Packages the WebUI already has are never upgraded or downgraded: every install runs with a
constraints file that pins the versions currently installed of the WebUI's own packages, so pip
either finds a solution around them or fails. A failure is reported, never fatal: the panel then
offers only the preprocessors that need nothing extra.

controlnet-aux 0.0.10 requires ``opencv-python-headless``, but the WebUI ships ``opencv-python``:
two distributions that both write the one ``cv2`` package, so installing the second overwrites
the first's files and removing either later breaks ``import cv2``. When any OpenCV distribution is
installed, controlnet-aux goes in with ``--no-deps`` and then only its other missing requirements
(pip's own check will then say controlnet-aux misses opencv-python-headless: the ``cv2`` it needs
is there under the WebUI's name).

onnxruntime (face analysis for IP-Adapter FaceID) has the same trap: ``onnxruntime``,
``onnxruntime-gpu``, ``onnxruntime-directml``... all write the one ``onnxruntime`` package, so
nothing is added when any of them is installed. When none is, the CPU wheel goes in, unless the
WebUI's torch is a CUDA build whose CUDA and cuDNN a PyPI ``onnxruntime-gpu`` was built for:
1.18 and older are CUDA 11.8 + cuDNN 8 builds, 1.19 and newer CUDA 12 + cuDNN 9. torch 2.1.2+cu121,
the WebUI 1.10's own, ships cuDNN 8, which no PyPI ``onnxruntime-gpu`` loads: there the CPU wheel
is installed (``onnxruntime-gpu`` would only fall back to the CPU, after a 200 MB download and an
error in the console at every session). torch is imported only when onnxruntime is missing.
"""
from __future__ import annotations

import importlib.metadata
import os
import tempfile
from dataclasses import dataclass

import launch

CONTROLNET_AUX = "controlnet-aux==0.0.10"
# distribution name -> requirement installed when it is missing
REQUIREMENTS = {
    "controlnet-aux": CONTROLNET_AUX,
    "diffusers": "diffusers>=0.27,<0.32",  # the range that works with the WebUI's transformers 4.30 / hub
}
# controlnet-aux 0.0.10's Requires-Dist (its METADATA) less its OpenCV; none has a version bound or marker
CONTROLNET_AUX_DEPENDENCIES = (
    "torch", "importlib_metadata", "huggingface_hub", "scipy", "filelock", "numpy", "Pillow", "einops",
    "torchvision", "timm", "scikit-image",
)
# every distribution that provides the `cv2` package
OPENCV_DISTRIBUTIONS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless")
# The WebUI's own stack: whatever version is installed of these stays exactly as it is.
WEBUI_PACKAGES = (
    "torch", "torchvision", "numpy", "transformers", "tokenizers", "huggingface-hub", "safetensors", "Pillow",
    "gradio", "gradio-client", "fastapi", "pydantic", "httpx", "scikit-image", "accelerate", "einops", "timm",
    "protobuf", "open-clip-torch", "omegaconf", "scipy",
) + OPENCV_DISTRIBUTIONS

# every distribution that provides the `onnxruntime` package
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                             "onnxruntime-silicon", "onnxruntime-qnn", "ort-nightly", "ort-nightly-gpu")
ONNXRUNTIME_CPU = "onnxruntime>=1.16"
# torch's CUDA major -> (the cuDNN major it must ship, the onnxruntime-gpu releases built for both on PyPI):
# CUDA 11.8 + cuDNN 8 up to 1.18, CUDA 12 + cuDNN 9 from 1.19 (onnxruntime's CUDA provider requirements);
# the upper bound is the last release for Python 3.10, checked to resolve beside the WebUI's numpy and protobuf
ONNXRUNTIME_GPU = {11: (8, "onnxruntime-gpu>=1.16,<1.19"), 12: (9, "onnxruntime-gpu>=1.19,<1.24")}


@dataclass(frozen=True)
class TorchBuild:
    cuda: str | None  # torch.version.cuda: "12.1", or None for CPU, ROCm and MPS builds
    cudnn: int | None  # torch.backends.cudnn.version(): 8902 for cuDNN 8.9.2, 90100 for 9.1.0, None without

    @property
    def cudnn_major(self) -> int | None:
        if not self.cudnn:
            return None
        return self.cudnn // 10000 if self.cudnn >= 10000 else self.cudnn // 1000  # cuDNN 9 moved to 5 digits


def torch_build() -> TorchBuild:
    """What the WebUI's torch was built with (imported here only when onnxruntime is missing)."""
    try:
        import torch
    except ImportError:
        return TorchBuild(None, None)
    try:
        cudnn = torch.backends.cudnn.version()
    except Exception:  # a CUDA build whose cuDNN library does not load: nothing for onnxruntime-gpu either
        cudnn = None
    return TorchBuild(getattr(torch.version, "cuda", None), cudnn)


def onnxruntime_requirement(build: TorchBuild) -> str:
    """onnxruntime-gpu where torch's CUDA and cuDNN match a PyPI build of it, else the CPU wheel."""
    if build.cuda is None:
        return ONNXRUNTIME_CPU
    cudnn_major, spec = ONNXRUNTIME_GPU.get(int(build.cuda.split(".")[0]), (None, None))
    if spec is None or build.cudnn_major != cudnn_major:
        cudnn = f"cuDNN {build.cudnn_major}" if build.cudnn_major else "no cuDNN"
        print(f"[adapters] torch has CUDA {build.cuda} with {cudnn}, for which PyPI has no onnxruntime-gpu build: "
              f"installing the CPU onnxruntime (FaceID's face analysis runs on the CPU).")
        return ONNXRUNTIME_CPU
    return spec


def installed_pins() -> list[str]:
    pins = []
    for name in WEBUI_PACKAGES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def missing_requirements() -> list[str]:
    missing = [spec for dist, spec in REQUIREMENTS.items() if not launch.is_installed(dist)]
    if not any(launch.is_installed(name) for name in ONNXRUNTIME_DISTRIBUTIONS):
        missing.append(onnxruntime_requirement(torch_build()))
    return missing


def installed_opencv() -> list[str]:
    return [name for name in OPENCV_DISTRIBUTIONS if launch.is_installed(name)]


def pip_installs(spec: str) -> list[tuple[str, str]]:
    """The pip installs (arguments before the constraints, description) that add ``spec``."""
    if spec != CONTROLNET_AUX or not installed_opencv():
        return [(f'install "{spec}"', f"{spec} for the adapters extension")]
    steps = [(f'install "{spec}" --no-deps',
              f"{spec} for the adapters extension (keeping the installed OpenCV, {', '.join(installed_opencv())})")]
    deps = [name for name in CONTROLNET_AUX_DEPENDENCIES if not launch.is_installed(name)]
    if deps:
        steps.append(("install " + " ".join(f'"{d}"' for d in deps), f"the requirements of {spec}"))
    return steps


def main() -> None:
    missing = missing_requirements()
    if not missing:
        return
    fd, constraints = tempfile.mkstemp(prefix="adapters-constraints-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(installed_pins()) + "\n")
    try:
        for spec in missing:
            try:
                for args, description in pip_installs(spec):
                    launch.run_pip(f'{args} -c "{constraints}"', description)
            except Exception as exc:  # the launcher raises RuntimeError with pip's output
                print(f"[adapters] could not install {spec} without changing the WebUI's own packages: {exc}\n"
                      f"[adapters] the extension still works; what needs it (preprocessors, FaceID's face "
                      f"analysis) is unavailable.")
    finally:
        os.unlink(constraints)


main()
