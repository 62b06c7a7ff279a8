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
"""
from __future__ import annotations

import importlib.metadata
import os
import tempfile

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


def installed_pins() -> list[str]:
    pins = []
    for name in WEBUI_PACKAGES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def missing_requirements() -> list[str]:
    return [spec for dist, spec in REQUIREMENTS.items() if not launch.is_installed(dist)]


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
                      f"[adapters] the extension still works; preprocessors that need it are unavailable.")
    finally:
        os.unlink(constraints)


main()
