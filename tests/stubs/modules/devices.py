"""Fake of ``modules/devices.py``: the torch device and dtypes the WebUI runs with.

With the stub's ``cmd_opts`` (``--use-cpu all --no-half --precision full``) everything is CPU fp32,
``autocast()`` is a ``nullcontext`` and ``unet_needs_upcast`` is False, exactly like the verified CPU
run of the real WebUI. Tests may reassign ``device``/``dtype*`` (e.g. for a GPU-marked test).
"""
from __future__ import annotations

import contextlib
import sys

import torch

from modules import errors, shared  # noqa: F401


def has_mps() -> bool:
    return sys.platform == "darwin" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def get_cuda_device_string() -> str:
    device_id = shared.cmd_opts.device_id
    return f"cuda:{device_id}" if device_id is not None else "cuda"


def get_optimal_device_name() -> str:
    if torch.cuda.is_available():
        return get_cuda_device_string()
    if has_mps():
        return "mps"
    return "cpu"


def get_optimal_device() -> torch.device:
    return torch.device(get_optimal_device_name())


def get_device_for(task: str) -> torch.device:
    """CPU when ``task`` or "all" is in ``--use-cpu``, else the optimal device."""
    if task in shared.cmd_opts.use_cpu or "all" in shared.cmd_opts.use_cpu:
        return cpu
    return get_optimal_device()


def torch_gc() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def enable_tf32() -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


cpu: torch.device = torch.device("cpu")
fp8: bool = False
force_fp16: bool = False
device: torch.device = get_device_for("sd")
device_interrogate: torch.device = get_device_for("interrogate")
device_gfpgan: torch.device = get_device_for("gfpgan")
device_esrgan: torch.device = get_device_for("esrgan")
device_codeformer: torch.device = get_device_for("codeformer")
dtype: torch.dtype = torch.float32 if shared.cmd_opts.no_half else torch.float16
dtype_vae: torch.dtype = torch.float32 if shared.cmd_opts.no_half or shared.cmd_opts.no_half_vae else torch.float16
dtype_unet: torch.dtype = dtype
dtype_inference: torch.dtype = torch.float32 if shared.cmd_opts.precision == "full" else dtype
unet_needs_upcast = shared.cmd_opts.upcast_sampling and dtype == torch.float16 and dtype_unet == torch.float16
nv_rng = None
shared.device = device  # shared_init.py does this at startup


def cond_cast_unet(input: torch.Tensor) -> torch.Tensor:
    return input.to(dtype_unet) if unet_needs_upcast else input


def cond_cast_float(input: torch.Tensor) -> torch.Tensor:
    return input.float() if unet_needs_upcast else input


def autocast(disable: bool = False):
    """``nullcontext`` when disabled or computing in fp32; ``torch.autocast`` on the device otherwise."""
    if disable:
        return contextlib.nullcontext()
    if dtype == torch.float32 or dtype_inference == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type)


def without_autocast(disable: bool = False):
    if torch.is_autocast_enabled() and not disable:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class NansException(Exception):
    pass


def test_for_nans(x: torch.Tensor, where: str) -> None:
    """Raise ``NansException`` if the first element of ``x`` is NaN (the real check looks at one element)."""
    if shared.cmd_opts.disable_nan_check:
        return
    if not torch.isnan(x[(0,) * len(x.shape)]):
        return
    if where == "unet":
        message = "A tensor with NaNs was produced in Unet."
    elif where == "vae":
        message = "A tensor with NaNs was produced in VAE."
    else:
        message = "A tensor with NaNs was produced."
    message += " Use --disable-nan-check commandline argument to disable this check."
    raise NansException(message)


def first_time_calculation() -> None:
    """Warm-up in the real WebUI; nothing to do on CPU."""
