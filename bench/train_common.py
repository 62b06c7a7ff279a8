"""Pieces the training-step benchmarks share (``train_lora_step.py``, ``train_adapters_step.py``).

A benchmark builds two *sides* (ours: ``lib_adapters.training``'s ``Trainer``; plain: a reference loop
written out in the script) over identical seeded weights, then:

* ``alternate``: one warm-up step each, then ABAB/BABA pairs; wall clock and process CPU time per step
  (with one torch thread, CPU time measures the work rather than a shared machine's load);
* ``memory_cpu``: each side alone in a child process (the script rerun with ``--side``), which reports
  its RSS after loading and its peak RSS (``VmHWM``, reset after loading) during a few steps; on CUDA,
  ``max_memory_allocated`` is read during ``alternate`` instead;
* ``summarize``: medians, ratios ours / plain, the memory ratio.

Models are built in code (a diffusers ``UNet2DConditionModel`` with SD1.x's block layout, a small VAE, a
4-layer CLIP-L-width text encoder) with seeded random weights; nothing is downloaded.
Not a test module: pytest never collects ``bench/``.
"""
from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Protocol

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import check, device_sync, log, rounded  # noqa: E402

SIDES = ("ours", "plain")


class Side(Protocol):
    trainable: int  # trainable parameter count (both sides must agree)

    def step(self) -> float:
        """One optimizer step; returns the loss."""


# --- models and data -------------------------------------------------------------------------------
def build_models(width: int, resolution: int, device: torch.device) -> list[torch.nn.Module]:
    """A SD1-structured UNet (context 768; width 128 gives 142M parameters), a small VAE and a 4-layer
    CLIP-L-width text encoder, seeded, frozen, in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    w = width
    unet = UNet2DConditionModel(sample_size=resolution // 8, block_out_channels=(w, 2 * w, 4 * w, 4 * w),
                                layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4, sample_size=256)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=768, intermediate_size=3072, num_hidden_layers=4,
                                        num_attention_heads=12, max_position_embeddings=77, bos_token_id=998,
                                        eos_token_id=999, pad_token_id=999))
    return [m.to(device).eval().requires_grad_(False) for m in (unet, vae, text)]


def make_dataset(root: Path, count: int, size: int, condition: str | None = None) -> Path:
    """``count`` smooth random pictures with captions in ``root/1_bench``; with ``condition``, also an
    ``x.<condition>.png`` beside each (the T2I-Adapter layout: here the picture's inverse)."""
    from PIL import Image, ImageOps

    g = torch.Generator().manual_seed(1)
    folder = root / "1_bench"
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = (torch.rand(3, size // 16, size // 16, generator=g) * 255).byte().permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels).resize((size, size), Image.BICUBIC)
        image.save(folder / f"{i}.png")
        if condition:
            ImageOps.invert(image).save(folder / f"{i}.{condition}.png")
        (folder / f"{i}.txt").write_text(f"a photo of pattern number {i}, bench")
    return root


def dataset_images(dataset: Path) -> list[Path]:
    return sorted(p for p in (dataset / "1_bench").glob("*.png") if p.stem.isdigit())


def read_pixels(files: list[Path], device: torch.device) -> torch.Tensor:
    """Images as [N, 3, H, W] in [-1, 1]: what the reference examples' datasets hand the loop."""
    import numpy as np
    from PIL import Image

    pixels = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]
    return torch.stack(pixels).float().div(127.5).sub(1).to(device)


def token_ids(captions: list[str], device: torch.device) -> torch.Tensor:
    """Captions tokenized once, as the examples' dataset ``map`` does (the tokenizer our backend uses)."""
    from lib_adapters.tiny_diffusers import WordHashTokenizer

    return WordHashTokenizer()(captions, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt")["input_ids"].to(device)


def autocast_for(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# --- memory: one side per child process -------------------------------------------------------------
def status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS, so imports and model building do not count."""
    Path("/proc/self/clear_refs").write_text("5")


def report_memory(side: Side, steps: int) -> None:
    """In a ``--side`` child: RSS after loading, then the peak RSS during ``steps`` steps (peak reset first)."""
    loaded = status_mb("VmRSS")
    reset_peak()
    losses = [side.step() for _ in range(steps)]
    check(all(v == v for v in losses), "non-finite loss")
    print(f"MEMORY {loaded:.1f} {status_mb('VmHWM'):.1f}", flush=True)


def memory_cpu(script: str, argv: list[str], timeout: float = 900) -> dict:
    """Runs ``script --side NAME *argv`` for each side and collects what ``report_memory`` printed."""
    result = {}
    for name in SIDES:
        proc = subprocess.run([sys.executable, script, "--side", name, *argv], capture_output=True, text=True,
                              timeout=timeout)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")), None)
        check(line is not None, f"memory child for {name} failed: {proc.stderr[-2000:]}")
        loaded, peak = map(float, line.split()[1:])
        result[name] = {"rss_after_load_mb": loaded, "peak_rss_during_steps_mb": peak,
                        "step_peak_above_load_mb": round(peak - loaded, 1)}
    return result


# --- time --------------------------------------------------------------------------------------------
def alternate(sides: dict[str, Side], pairs: int, device: torch.device,
              on_pair: Callable[[int, dict], None] | None = None) -> dict:
    """Pair 0 is the warm-up (not recorded); then ours/plain in ABAB, BABA order so that neither side
    always runs right after the other's allocations. CUDA: the peak allocation of each recorded step."""
    check(sides["ours"].trainable == sides["plain"].trainable,
          f"trainable parameter counts differ: {sides['ours'].trainable} vs {sides['plain'].trainable}")
    sync = device_sync(device)
    times, cpu = {n: [] for n in SIDES}, {n: [] for n in SIDES}
    peaks = {n: 0 for n in SIDES}
    for i in range(pairs + 1):
        for name in SIDES if i % 2 == 0 else SIDES[::-1]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = sides[name].step()
            sync()
            check(loss == loss, f"{name}: non-finite loss")
            if i:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                if device.type == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
        last = {n: (cpu[n][-1] if i else 0.0) for n in SIDES}
        log(f"pair {i}: CPU time ours {last['ours']:.3f}s plain {last['plain']:.3f}s")
    return {"times": times, "cpu": cpu, "cuda_peak_bytes": peaks if device.type == "cuda" else None}


def summarize(timing: dict, memory: dict | None) -> dict:
    """Per-step times, medians and ratios ours / plain; memory from CUDA peaks or the CPU children."""
    med = {k: statistics.median(v) for k, v in timing["times"].items()}
    cpu_med = {k: statistics.median(v) for k, v in timing["cpu"].items()}
    pair_ratios = [a / b for a, b in zip(timing["times"]["ours"], timing["times"]["plain"])]
    cpu_pair_ratios = [a / b for a, b in zip(timing["cpu"]["ours"], timing["cpu"]["plain"])]
    result = {"times_s": {k: rounded(v) for k, v in timing["times"].items()},
              "median_s": {k: round(v, 4) for k, v in med.items()},
              "time_ratio_of_medians": round(med["ours"] / med["plain"], 3),
              "median_pair_ratio": round(statistics.median(pair_ratios), 3),
              "cpu_times_s": {k: rounded(v) for k, v in timing["cpu"].items()},
              "cpu_median_s": {k: round(v, 4) for k, v in cpu_med.items()},
              "cpu_time_ratio_of_medians": round(cpu_med["ours"] / cpu_med["plain"], 3),
              "cpu_median_pair_ratio": round(statistics.median(cpu_pair_ratios), 3)}
    peaks = timing.get("cuda_peak_bytes")
    if peaks is not None:
        result["cuda_peak_mb"] = {k: round(v / 2**20, 1) for k, v in peaks.items()}
        result["memory_ratio"] = round(peaks["ours"] / peaks["plain"], 3)
    elif memory is not None:
        result["cpu_memory"] = memory
        result["memory_ratio"] = round(memory["ours"]["peak_rss_during_steps_mb"]
                                       / memory["plain"]["peak_rss_during_steps_mb"], 3)
    return result


def peak_mb(result: dict) -> dict[str, float] | None:
    if "cuda_peak_mb" in result:
        return result["cuda_peak_mb"]
    if "cpu_memory" in result:
        return {k: v["peak_rss_during_steps_mb"] for k, v in result["cpu_memory"].items()}
    return None
