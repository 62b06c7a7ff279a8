"""Generations in a row with the same IP-Adapter unit, through the panel's own controller and caches.

    .venv/bin/python bench/ip_repeat_cputime.py            # full size, CPU, 1 thread, CPU time, 128x128, 8 steps
    .venv/bin/python bench/ip_repeat_cputime.py --smoke    # tiny models: a wiring check in seconds, no file

The question (issue 10 §1): in a real session the same IP unit runs generation after generation.
Once the first generation has read the adapter and its 2.5 GB CLIP encoder and encoded the
reference, what does the unit still cost? Goal: generations 2 to 5 with the unit / without
<= **1.03** (CPU). The first generation's cost (file reads, encoder passes) is reported on its own.

Models, built in code with seeded random weights and written to a scratch folder as a user would
have them (nothing is downloaded): the genuine ldm ``UNetModel`` in SD1.5's configuration
(859.5M parameters); an SD1.5 IP-Adapter plus with the released ``ip-adapter-plus_sd15`` file's
shapes, saved as the reference's nested ``.bin``; a full-size CLIP ViT-H/14 (632.1M parameters,
fp32, 2.5 GB) saved as ``models/clip_vision/*.safetensors``.

Each "with" run is a WebUI job as the Adapters script runs it: ``GenerationController.start`` with the
unit as the API sends it (model name, a 640x480 numpy image), which resolves the file, loads the
adapter and the encoder through the model cache, takes the image tokens from the encoder-output cache
(encoding and projecting only on a miss), binds the layout and installs the session; the demo's Euler sampler (CFG 7, cond and uncond rows in
one UNet call, ``on_denoiser`` each step); ``GenerationController.end``, which restores the UNet and
unpins the models. The caches live across runs, as the panel's shared resources do.

Method: ``bench/common.py``'s ``measure_pairs``: a warm-up run without the unit, then the first run
with it (cold caches: the generation whose cost is reported separately), a weight-0 run (the
controller skips a unit of weight 0: it must equal the baseline bit for bit), then ``--repeats``
(default 4) pairs without/with: the "with" runs are generations 2 to 5 of the unit. Clock: process
CPU time with one torch thread (the 2-core machine is shared); wall clock is recorded beside it,
because reading a file from disk waits without using the CPU. Checks before any number: the unit
changes the output, weight 0 equals the baseline, every baseline after a session equals the first
(exact restore), runs with the unit are reproducible, the first run read both files and ran the
encoder twice (image and "no image"), and every later run read no file and ran no encoder pass.

Not a test: pytest never collects ``bench/``.
"""
from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, whatever the working directory
from common import (RESULTS, StepTimer, check, environment, generation_arguments, load_avg, log,  # noqa: E402
                    measure_pairs, params, report, rounded, run_sampler)
from ip_overhead_cputime import FULL, SMOKE, Model, build_encoder, build_ip_adapter, reference_image  # noqa: E402

from lib_adapters.catalog import EncoderCatalog, ModelCatalog  # noqa: E402
from lib_adapters.demo import SampleSpec  # noqa: E402
from lib_adapters.formats import reader  # noqa: E402
from lib_adapters.inference.cache import AdapterCache  # noqa: E402
from lib_adapters.inference import ip as ip_runtime  # noqa: E402
from lib_adapters.inference.encodings import EncodingCache  # noqa: E402
from lib_adapters.preprocess.registry import PreprocessorCache  # noqa: E402
from lib_adapters.tiny import build_tiny_unet  # noqa: E402
from lib_adapters.unet.layout import bind_layout  # noqa: E402
from lib_adapters.webui.panel.generation import GenerationController  # noqa: E402

GOAL = 1.03
ADAPTER_NAME = "ip-adapter-plus_sd15_random"


# --- files -----------------------------------------------------------------------------------------
def write_encoder_file(model: Model, root: Path) -> Path:
    """The encoder as the ``model.safetensors`` that comes with IP-Adapter (fp32). Written before the UNet is
    built: saving copies the 2.5 GB once more, and the three together would need 8.5 GB."""
    from safetensors.torch import save_file

    encoder = build_encoder(model.encoder_config, check_release=model.full_size)
    folder = root / "models" / "clip_vision"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(folder / "model.safetensors"))
    del encoder
    gc.collect()
    return folder


def write_adapter_file(model: Model, unet: torch.nn.Module, root: Path) -> Path:
    """The adapter as the reference's nested ``.bin``."""
    adapter = build_ip_adapter(bind_layout(unet), model.projection, check_release=model.full_size)
    sd = adapter.model.state_dict()
    nested = {part: {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
              for part in ("image_proj", "ip_adapter")}
    folder = root / "models" / "adapters"
    folder.mkdir(parents=True)
    torch.save(nested, folder / f"{ADAPTER_NAME}.bin")
    return folder


# --- the bench -----------------------------------------------------------------------------------
@dataclass
class Run:
    out: torch.Tensor
    seconds: float  # process CPU time of the whole job
    wall: float
    step_seconds: list[float]
    start_seconds: float = 0.0  # GenerationController.start: files, encoder, projection, install
    file_reads: list[str] = field(default_factory=list)
    encoder_calls: int = 0
    kv_calls: int = 0
    load: float = -1.0


class Counters:
    """What a job did, counted where it happens: weight files read (the reader's two file-level functions),
    CLIP vision forward passes (the transformers class) and K/V projections (one per attn2 site on a miss)."""

    def __init__(self) -> None:
        from transformers import CLIPVisionModelWithProjection

        self.files: list[str] = []
        self.encoder = 0
        self.kv = 0
        for name in ("_read_safetensors", "_read_pickle"):
            setattr(reader, name, self._wrap(getattr(reader, name), self._file))
        CLIPVisionModelWithProjection.forward = self._wrap(CLIPVisionModelWithProjection.forward, self._encoder)
        ip_runtime.fold_key_value = self._wrap(ip_runtime.fold_key_value, self._kv)

    @staticmethod
    def _wrap(original: Any, count: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            count(*args)
            return original(*args, **kwargs)
        return counted

    def _file(self, path: Path) -> None:
        self.files.append(path.name)

    def _encoder(self, *_: Any) -> None:
        self.encoder += 1

    def _kv(self, *_: Any) -> None:
        self.kv += 1

    def take(self) -> tuple[list[str], int, int]:
        out = (sorted(self.files), self.encoder, self.kv)
        self.files, self.encoder, self.kv = [], 0, 0
        return out


@dataclass
class Bench:
    unet: torch.nn.Module
    controller: GenerationController
    image: np.ndarray
    cond: torch.Tensor
    uncond: torch.Tensor
    spec: SampleSpec
    counters: Counters = field(default_factory=Counters)

    def generate(self, weight: float | None) -> Run:
        """One whole job; ``weight=None`` means no unit."""
        gc.collect()
        p = SimpleNamespace(sd_model=SimpleNamespace(model=SimpleNamespace(diffusion_model=self.unet)),
                            extra_generation_params={}, init_images=None)
        units = [] if weight is None else [{"enabled": True, "model": ADAPTER_NAME, "image": self.image,
                                            "weight": weight}]
        timer = StepTimer(self.unet, lambda: None, time.process_time)
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        self.controller.start(p, units)
        started = time.process_time()
        try:
            out = run_sampler(timer, self.spec, self.cond, self.uncond, self.controller.session,  # type: ignore[arg-type]
                              torch.device("cpu"))
        finally:
            self.controller.end()
        seconds, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
        skipped = {k: v for k, v in p.extra_generation_params.items() if k.endswith(" skipped")}
        check(not skipped, f"the unit was skipped: {skipped}")
        check(bool(weight) == ("Adapter 1" in p.extra_generation_params), "the unit did not run through the controller")
        files, encoder_calls, kv_calls = self.counters.take()
        return Run(out, seconds, wall, timer.seconds, started - start_cpu, files, encoder_calls, kv_calls, load_avg())


def measure(bench: Bench, repeats: int, sites: int) -> dict:
    files = sorted([f"{ADAPTER_NAME}.bin", "model.safetensors"])

    def per_job_counts(run: Run, which: str) -> None:
        if which == "warm-up":  # the first generation with the unit: everything is read and encoded
            check(run.file_reads == files, f"the first job read {run.file_reads}, expected {files}")
            check(run.encoder_calls == 2, f"the first job ran the encoder {run.encoder_calls} times, expected 2")
        else:
            check(run.file_reads == [], f"a later job ({which}) read {run.file_reads} from disk")
            check(run.encoder_calls == 0, f"a later job ({which}) ran the encoder {run.encoder_calls} times")
        expected_kv = 0 if which == "weight 0" else sites
        check(run.kv_calls == expected_kv, f"{run.kv_calls} K/V projections in one job ({which}), expected {expected_kv}")

    runs = measure_pairs(bench.generate, repeats, per_job_counts,
                         describe=lambda run: f"start {run.start_seconds:.3f} s, wall {run.wall:.2f} s")
    result = summarise(runs.pairs, runs.adapted, bench.spec.steps)
    result["warmup_s"] = {"without": round(runs.reference.seconds, 4), "with": round(runs.adapted.seconds, 4)}
    result["checks"]["mean_abs_change_with_unit"] = runs.change
    return result


def summarise(pairs: list[tuple[Run, Run]], first: Run, steps: int) -> dict:
    without, with_unit = [b.seconds for b, _ in pairs], [u.seconds for _, u in pairs]
    med_without, med_with = statistics.median(without), statistics.median(with_unit)
    ratio = med_with / med_without
    pair_ratios = [w / b for b, w in zip(without, with_unit)]
    later_start = [u.start_seconds for _, u in pairs]
    per_call = [(sum(u.step_seconds) - sum(b.step_seconds)) / steps for b, u in pairs]
    return {
        "times_s": {"without": rounded(without), "with": rounded(with_unit)},
        "wall_s": {"without": rounded([b.wall for b, _ in pairs]), "with": rounded([u.wall for _, u in pairs])},
        "load_avg_1min": {"without": [b.load for b, _ in pairs], "with": [u.load for _, u in pairs]},
        "median_s": {"without": round(med_without, 4), "with": round(med_with, 4)},
        "ratio_of_medians": round(ratio, 4),
        "pair_ratios": rounded(pair_ratios),
        "median_pair_ratio": round(statistics.median(pair_ratios), 4),
        "goal": GOAL,
        "pass": ratio <= GOAL,
        "later_generations": {
            "start_s": stats(later_start),  # resolve, cache hits, projection, K/V is in the first step
            "image_attention_per_unet_call_s": stats(per_call),
            "unet_call_without_s": round(statistics.median([s for b, _ in pairs for s in b.step_seconds]), 4),
        },
        "first_generation": {
            "cpu_s": round(first.seconds, 4), "wall_s": round(first.wall, 4),
            "start_cpu_s": round(first.start_seconds, 4),
            "over_median_baseline_cpu_s": round(first.seconds - med_without, 4),
            "ratio_over_median_baseline": round(first.seconds / med_without, 4),
            "files_read": first.file_reads, "encoder_passes": first.encoder_calls,
        },
        "run_time_spread": round(max(max(without) / min(without), max(with_unit) / min(with_unit)), 4),
        "checks": {"weight_0_equals_baseline": True, "baseline_after_session_equals_baseline": True,
                   "with_unit_reproducible": True, "later_jobs_read_no_file": True,
                   "later_jobs_ran_no_encoder_pass": True},
    }


def stats(times: list[float]) -> dict:
    return {"runs": rounded(times), "median": round(statistics.median(times), 4), "min": round(min(times), 4)}


def first_generation_parts(bench: Bench, encoder_file: Path, adapter_file: Path) -> dict:
    """What the first generation pays, part by part, each timed once more alone after the runs (the caches are
    emptied first, so this is a cold load again; the file data may still be in the OS page cache)."""
    from lib_adapters.formats.adapter_file import load_adapter
    from lib_adapters.formats.reader import read_state_dict, read_weights
    from lib_adapters.formats.clip_vision import load_clip_vision
    from lib_adapters.models.clip_vision import CropMode

    bench.controller.adapters.clear()
    bench.controller.encodings.clear()
    gc.collect()
    parts: dict[str, dict] = {}

    def timed(name: str, fn: Any) -> Any:
        cpu, wall = time.process_time(), time.perf_counter()
        out = fn()
        parts[name] = {"cpu_s": round(time.process_time() - cpu, 4), "wall_s": round(time.perf_counter() - wall, 4)}
        return out

    timed("read_encoder_file", lambda: read_state_dict(encoder_file))
    gc.collect()
    timed("read_encoder_file_and_check_finite", lambda: read_weights(encoder_file))
    gc.collect()
    encoder = timed("load_encoder (read, check, build on meta, assign)", lambda: load_clip_vision(encoder_file))
    timed("load_adapter (read, check, build, load)", lambda: load_adapter(adapter_file))
    pixels = timed("preprocess_reference", lambda: encoder.preprocess([bench.image], CropMode.CENTER))
    timed("encoder_pass_reference", lambda: encoder.encode(pixels, hidden_states=True))
    timed("encoder_pass_no_image", lambda: encoder.empty_hidden_states())
    del encoder
    gc.collect()
    return parts


# --- reporting -----------------------------------------------------------------------------------
def table_row(result: dict) -> str:
    med, first = result["median_s"], result["first_generation"]
    loads = [x for side in result["load_avg_1min"].values() for x in side]
    return (f"| CPU (1 thread, process CPU time), `ip_repeat_cputime.py` | {result['model']['label']} | "
            f"{result['resolution']} | {result['steps']} | {med['without']:.2f} | {med['with']:.2f} | "
            f"**{result['ratio_of_medians']:.3f}** (pairs {', '.join(f'{r:.3f}' for r in result['pair_ratios'])}) | "
            f"{first['cpu_s']:.2f} s CPU ({first['wall_s']:.2f} s wall): {first['ratio_over_median_baseline']:.3f}x | "
            f"load {min(loads):.1f}-{max(loads):.1f} | <= {GOAL} {'met' if result['pass'] else 'NOT met'} |")


def describe(model: Model, bench: Bench, smoke: bool, repeats: int, sites: int, encoder_bytes: int) -> dict:
    size = bench.spec.latent_size * 8
    return {
        "benchmark": "ip_repeat", "mode": "smoke" if smoke else "full",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "environment": environment(torch.device("cpu")),
        "clock": "process CPU time (time.process_time); wall clock beside it",
        "model": {"label": model.label, "unet_params": params(bench.unet), "ip_sites": sites,
                  "encoder_file_bytes": encoder_bytes},
        "reference_image": f"{bench.image.shape[1]}x{bench.image.shape[0]} RGB numpy array, centre crop",
        "dtype": "fp32", "resolution": f"{size}x{size}", "latent": bench.spec.latent_size, "steps": bench.spec.steps,
        "cfg_scale": bench.spec.cfg_scale, "seed": bench.spec.seed, "repeats": repeats,
        "order": "warm-up without, first generation with the unit (cold caches), weight-0 check, "
                 "then (without, with) x repeats = generations 2.. of the unit",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = generation_arguments(__doc__, smoke="tiny models, 4 steps: finishes in seconds",
                                  latent="default 16 = 128x128, smoke 8", steps="default 8, smoke 3",
                                  repeats="timed without/with pairs after the first run (default 4)",
                                  out="ip_repeat_cpu.json")
    parser.add_argument("--workdir", type=Path, help="where the model files are written (default: a temporary "
                                                     "folder, removed at the end)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # CPU time of one thread: what this process did, whatever the neighbours do
    model = SMOKE if args.smoke else FULL
    latent = args.latent or (8 if args.smoke else 16)
    steps = args.steps or (3 if args.smoke else 8)
    repeats = args.repeats or 4
    root = args.workdir or Path(tempfile.mkdtemp(prefix="adapters-bench-"))
    try:
        encoders = write_encoder_file(model, root)
        encoder_bytes = (encoders / "model.safetensors").stat().st_size
        unet = build_tiny_unet(model.unet_config, seed=0)
        adapters = write_adapter_file(model, unet, root)
        controller = GenerationController(ModelCatalog([adapters]), AdapterCache(), PreprocessorCache(),
                                          root / "annotators", EncoderCatalog([encoders]), EncodingCache())
        g = torch.Generator().manual_seed(99)
        dim = model.unet_config["context_dim"]
        cond, uncond = torch.randn(1, 77, dim, generator=g), torch.randn(1, 77, dim, generator=g)
        bench = Bench(unet, controller, reference_image(), cond, uncond, SampleSpec(steps=steps, latent_size=latent))
        sites = len(bind_layout(unet).ip_sites())
        log(f"{model.label}: UNet {params(unet) / 1e6:.1f}M parameters, encoder file {encoder_bytes / 1e9:.2f} GB, "
            f"{latent * 8}x{latent * 8}, {steps} steps, {repeats} pairs after the first run, 1 thread")
        result = describe(model, bench, args.smoke, repeats, sites, encoder_bytes)
        result.update(measure(bench, repeats, sites))
        log("timing the first generation's parts alone")
        result["first_generation"]["parts_timed_alone"] = first_generation_parts(
            bench, encoders / "model.safetensors", adapters / f"{ADAPTER_NAME}.bin")
        log(f"parts: {result['first_generation']['parts_timed_alone']}")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    report(result, table_row(result), args.out or (None if args.smoke else RESULTS / "ip_repeat_cpu.json"))
    first = result["first_generation"]
    log(f"generations 2-{repeats + 1}: ratio of medians {result['ratio_of_medians']:.4f} "
        f"({'pass' if result['pass'] else 'FAIL'}, goal <= {GOAL}); first generation {first['cpu_s']:.2f} s CPU, "
        f"{first['ratio_over_median_baseline']:.3f}x the baseline")
    return 0 if result["pass"] or args.smoke else 1


if __name__ == "__main__":
    raise SystemExit(main())
