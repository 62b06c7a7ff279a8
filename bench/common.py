"""Pieces every overhead benchmark shares: the SD1.5 UNet config, the sampler, per-call timing,
correctness checks and the JSON environment block.

The sampler is ``lib_adapters.demo.sample`` (20 Euler steps with CFG, cond and uncond rows in one
UNet call, ``GenerationSession.on_denoiser`` told the rows each step as the WebUI's denoiser does),
optionally on a GPU under autocast; the smoke runs check that both give bit-identical latents.

Not a test module: pytest never collects ``bench/``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the scripts run as plain files from anywhere
    sys.path.insert(0, str(ROOT))

from lib_adapters.demo import SampleSpec, karras_free_sigmas, sample  # noqa: E402
from lib_adapters.inference.session import GenerationSession  # noqa: E402
from lib_adapters.tiny import scaled_linear_alphas_cumprod  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# SD1.5's UNet (v1-inference.yaml): 859.5M parameters.
SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, legacy=False)

Clock = Callable[[], float]


# --- sampling ------------------------------------------------------------------------------------
def sample_on_device(unet: torch.nn.Module, spec: SampleSpec, cond: torch.Tensor, uncond: torch.Tensor,
                     session: GenerationSession | None, device: torch.device,
                     autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """``lib_adapters.demo.sample`` on any device, optionally under autocast (checked equal on CPU)."""
    timesteps, sigmas = karras_free_sigmas(scaled_linear_alphas_cumprod(), spec.steps)
    timesteps = timesteps.to(device)
    g = torch.Generator().manual_seed(spec.seed)
    b, s = spec.batch_size, spec.latent_size
    x = (torch.randn(b, 4, s, s, generator=g) * sigmas[0]).to(device)
    context = torch.cat([cond.expand(b, -1, -1), uncond.expand(b, -1, -1)]).to(device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    with torch.no_grad(), autocast:
        for i in range(spec.steps):
            if session is not None:
                session.on_denoiser(b, b, i, spec.steps)
            scaled = x / (sigmas[i] ** 2 + 1) ** 0.5
            eps = unet(torch.cat([scaled, scaled]), timesteps[i].expand(2 * b), context=context).float()
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + spec.cfg_scale * (eps_c - eps_u)
            x = x + eps * (sigmas[i + 1] - sigmas[i])
    return x.cpu()


def run_sampler(unet: torch.nn.Module, spec: SampleSpec, cond: torch.Tensor, uncond: torch.Tensor,
                session: GenerationSession | None, device: torch.device) -> torch.Tensor:
    """The demo's own sampler on CPU (fp32); the device sampler with fp16 autocast on CUDA."""
    if device.type == "cuda":
        return sample_on_device(unet, spec, cond, uncond, session, device, torch.float16)
    return sample(unet, spec, cond, uncond, session)


def check_device_sampler(unet: torch.nn.Module, spec: SampleSpec, cond: torch.Tensor, uncond: torch.Tensor) -> None:
    """The device sampler is what CUDA runs use: on CPU it must equal the demo's, bit for bit."""
    ours = sample_on_device(unet, spec, cond, uncond, None, torch.device("cpu"), None)
    check(torch.equal(ours, sample(unet, spec, cond, uncond)), "sample_on_device drifted from lib_adapters.demo.sample")


class StepTimer:
    """Calls the UNet and records each call's time; the same wrapper is used with and without a unit.

    ``clock`` is ``time.perf_counter`` for wall clock (with ``sync`` waiting for the GPU) or
    ``time.process_time`` for this process's CPU time."""

    def __init__(self, unet: torch.nn.Module, sync: Callable[[], None], clock: Clock = time.perf_counter):
        self.unet, self.sync, self.clock = unet, sync, clock
        self.seconds: list[float] = []

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = self.clock()
        out = self.unet(*args, **kwargs)
        self.sync()
        self.seconds.append(self.clock() - start)
        return out


def device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# --- checks and small helpers ----------------------------------------------------------------------
def check(ok: bool, message: str) -> None:
    """Like ``assert`` but survives ``python -O``: a broken build must not produce a number."""
    if not ok:
        raise SystemExit(f"CHECK FAILED: {message}")


def rounded(values: list[float], digits: int = 4) -> list[float]:
    return [round(v, digits) for v in values]


def load_avg() -> float:
    """1-minute load average: a noisy-neighbour indicator stored next to every run."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the measuring sequence ------------------------------------------------------------------------
class TimedRun(Protocol):
    out: torch.Tensor  # the final latents
    seconds: float  # the whole job on the benchmark's clock
    load: float  # load average when it ended


RunT = TypeVar("RunT", bound=TimedRun)


@dataclass
class PairedRuns:
    reference: Any  # the warm-up run without the unit (every later baseline must equal it)
    adapted: Any  # the warm-up run with the unit (every later run with it must equal it)
    pairs: list[tuple[Any, Any]]  # (without, with), timed back to back
    change: float  # mean |with - without| of the latents


def measure_pairs(generate: Callable[[float | None], RunT], repeats: int,
                  check_unit_run: Callable[[RunT, str], None], describe: Callable[[RunT], str] = lambda run: "",
                  say: Callable[[str], None] = log) -> PairedRuns:
    """Warm up, check, then time ``repeats`` back-to-back pairs; aborts (``check``) before any number is kept
    when the unit does not act, weight 0 is not bit-identical to the baseline, a baseline after a session
    differs from the first (restore is not exact) or runs with the unit are not reproducible.

    ``generate(weight)`` runs one whole job (``None``: no unit). ``check_unit_run(run, which)`` checks a
    benchmark's own per-job counts of a run with the unit; ``which`` is "warm-up", "weight 0" or "pair".
    ``describe(run)`` adds a benchmark's parts to the log lines."""
    def suffix(run: RunT) -> str:
        text = describe(run)
        return f", {text}" if text else ""

    reference = generate(None)
    say(f"warm-up without: {reference.seconds:.3f} s (load {reference.load})")
    adapted = generate(1.0)
    say(f"warm-up with:    {adapted.seconds:.3f} s (load {adapted.load}){suffix(adapted)}")
    check_unit_run(adapted, "warm-up")
    check(bool(torch.isfinite(adapted.out).all() and torch.isfinite(reference.out).all()), "non-finite latents")
    change = float((adapted.out - reference.out).abs().mean())
    check(change > 0, "the unit did not change the output: its hooks are not wired")
    zero = generate(0.0)
    check_unit_run(zero, "weight 0")
    check(torch.equal(zero.out, reference.out), "weight 0 (hooks installed) differs from the baseline")
    say("checks: the unit acts, weight 0 == baseline bit for bit, the per-job counts hold")

    pairs = []
    for i in range(repeats):
        base = generate(None)
        check(torch.equal(base.out, reference.out), "a baseline run after a session differs: restore is not exact")
        unit = generate(1.0)
        check_unit_run(unit, "pair")
        check(torch.equal(unit.out, adapted.out), "runs with the unit are not reproducible")
        pairs.append((base, unit))
        say(f"pair {i + 1}/{repeats}: without {base.seconds:.3f} s, with {unit.seconds:.3f} s, "
            f"ratio {unit.seconds / base.seconds:.4f} (load {base.load}/{unit.load}){suffix(unit)}")
    return PairedRuns(reference, adapted, pairs, change)


# --- command line ----------------------------------------------------------------------------------
def generation_arguments(doc: str, smoke: str, latent: str, steps: str, repeats: str, out: str
                         ) -> argparse.ArgumentParser:
    """The options every generation benchmark takes, with its own help texts (its defaults differ)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--latent", type=int, help=f"latent size (pixels / 8; {latent})")
    parser.add_argument("--steps", type=int, help=f"sampling steps ({steps})")
    parser.add_argument("--repeats", type=int, help=repeats)
    parser.add_argument("--out", type=Path, help=f"results JSON (default bench/results/{out}; smoke runs write only "
                                                 "when given)")
    return parser


# --- reporting -----------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(), "code": code_version(),
           "platform": platform.platform(),
           "cpu": {"processor": platform.processor(), "model_name": cpu_model, "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads()}}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def code_version() -> dict:
    """The commit measured, and whether lib_adapters/ differed from it (the numbers belong to that code)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD"), "lib_adapters_modified": bool(git("status", "--porcelain", "lib_adapters"))}


def report(result: dict, row: str, out: Path | None) -> None:
    """Print the results and the README table row; write the JSON when ``out`` is given."""
    print(json.dumps(result, indent=2))
    print(row)
    if out is not None:
        write_json(result, out)
        log(f"wrote {out}")


def write_json(result: dict, out: Path) -> None:
    """Atomically: a run killed half-way never leaves a truncated results file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
