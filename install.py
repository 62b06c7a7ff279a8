"""Run by the WebUI's launcher at every start: installs only what the WebUI lacks.

Packages the WebUI already has are never upgraded or downgraded: every install runs with a
constraints file that pins the versions currently installed of the WebUI's own packages, so pip
either finds a solution around them or fails. A failure is reported, never fatal: the panel then
offers only the preprocessors that need nothing extra.
"""
from __future__ import annotations

import importlib.metadata
import os
import tempfile

import launch

# distribution name -> requirement installed when it is missing
REQUIREMENTS = {
    "controlnet-aux": "controlnet-aux==0.0.10",
    "diffusers": "diffusers>=0.27,<0.32",  # the range that works with the WebUI's transformers 4.30 / hub
}
# The WebUI's own stack: whatever version is installed of these stays exactly as it is.
WEBUI_PACKAGES = (
    "torch", "torchvision", "numpy", "transformers", "tokenizers", "huggingface-hub", "safetensors", "Pillow",
    "gradio", "gradio-client", "fastapi", "pydantic", "httpx", "scikit-image", "accelerate", "einops", "timm",
    "opencv-python", "opencv-python-headless", "protobuf", "open-clip-torch", "omegaconf", "scipy",
)


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
                launch.run_pip(f'install "{spec}" -c "{constraints}"', f"{spec} for the adapters extension")
            except Exception as exc:  # the launcher raises RuntimeError with pip's output
                print(f"[adapters] could not install {spec} without changing the WebUI's own packages: {exc}\n"
                      f"[adapters] the extension still works; preprocessors that need it are unavailable.")
    finally:
        os.unlink(constraints)


main()
