"""Overhead of one IP-Adapter plus unit on a 20-step generation, with and without, side by side.

    .venv/bin/python bench/ip_overhead_cputime.py            # full size, CPU, 1 thread, CPU time (~20 min)
    .venv/bin/python bench/ip_overhead_cputime.py --smoke    # tiny models: a wiring check in seconds
    .venv/bin/python bench/ip_overhead_cputime.py --device cuda   # fp16, 512x512, wall clock

Models, all built in code with seeded random weights (nothing is downloaded):
- the genuine ldm ``UNetModel`` in SD1.5's configuration (859.5M parameters);
- an SD1.5 IP-Adapter plus with the shapes of the released ``ip-adapter-plus_sd15`` file (Resampler:
  width 768, depth 4, 12 heads, 16 tokens from 1280-wide CLIP hidden states; ``to_k_ip``/``to_v_ip``
  at all 16 attn2 sites), saved in the reference's nested layout and loaded through
  ``ip_from_state_dict``, the path released files take;
- a full-size CLIP ViT-H/14 vision encoder (transformers ``CLIPVisionModelWithProjection``, hidden
  1280, 32 layers, 16 heads, MLP 5120, patch 14, image 224, projection 1024), loaded through
  ``encoder_from_state_dict``, the path encoder files take.

Method (that of bench/t2i_overhead*.py): the demo's 20-step Euler sampler with CFG 7, cond and
uncond rows in one UNet call, ``GenerationSession.on_denoiser`` told the rows each step as the
WebUI's denoiser does; one warm-up run of each, a weight-0 run, then without/with alternated. Each
"with" run pays what a WebUI job pays (``AdapterGeneration._ip_runtime`` and ``start``/``end``):
binding the layout, preprocessing the reference image, the encoder forward for the image (the
"no image" output is the same for every job with these weights: the encoder computes it once and
keeps it, so only the first job pays a second pass), the projection, installing the 16 attn2 wrappers, the per-step image attention and the
restore. On CPU the clock is this process's CPU time with one torch thread: the 2-core machine is
shared and wall clock is not usable there. On CUDA it is wall clock with synchronisation.

Correctness first: before any number is written the script checks that the unit changes the output,
that weight 0 with the wrappers installed equals the baseline bit for bit, that every baseline after
a session equals the first one (exact restore), that runs with the unit are reproducible, and that
the encoder ran once per job (twice in the first: "no image" is computed once per encoder) and each
site's K/V projection once per job.

Parts, timed alone, so a reader can see what scales with what: preprocessing, one encoder forward
and the projection (fixed per job), each site's K/V (fixed per job) and the image attention of one
UNet call at all 16 sites (per UNet call, grows with the latent). On CPU the generation runs at a
small latent (the budget), so the script also times plain UNet calls and the image attention at the
512x512 latent and reports the 512x512 ratio those parts imply, labelled as an extrapolation.

Not a test: pytest never collects ``bench/``.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, whatever the working directory
from common import (RESULTS, SD15_UNET, Clock, StepTimer, check, check_device_sampler, device_sync,  # noqa: E402
                    environment, load_avg, log, measure_pairs, params, report, rounded, run_sampler)

from lib_adapters.demo import SampleSpec  # noqa: E402
from lib_adapters.formats.ip import LoadedIPAdapter, ip_from_state_dict  # noqa: E402
from lib_adapters.formats.reader import flatten_state_dict  # noqa: E402
from lib_adapters.inference.ip import IPUnitRuntime  # noqa: E402
from lib_adapters.inference.session import GenerationSession  # noqa: E402
from lib_adapters.formats.clip_vision import encoder_from_state_dict  # noqa: E402
from lib_adapters.models.clip_vision import ClipVisionEncoder, CropMode  # noqa: E402
from lib_adapters.models.ip_adapter import IPAdapterModel, IPProjection, ProjectionConfig  # noqa: E402
from lib_adapters.tiny import TINY_SD1, build_tiny_unet  # noqa: E402
from lib_adapters.unet.a1111 import A1111Binding  # noqa: E402
from lib_adapters.unet.layout import BoundLayout, IPSite, bind_layout  # noqa: E402
from lib_adapters.unet.points import UNetCall  # noqa: E402

GOAL = 1.08
LATENT_SCALE = 8
WEBUI_LATENT = 64  # 512x512, the WebUI's default size

# ip-adapter-plus_sd15: Resampler(dim=768, depth=4, dim_head=64, heads=12, num_queries=16,
# embedding_dim=1280, output_dim=768, ff_mult=4) reading ViT-H/14's penultimate hidden states.
SD15_PLUS = ProjectionConfig(IPProjection.PLUS, clip_dim=1280, context_dim=768, num_tokens=16,
                             resampler_dim=768, resampler_depth=4, resampler_heads=12, resampler_ff_mult=4)
# The image_encoder that ships with IP-Adapter (laion CLIP-ViT-H-14), as transformers describes it.
VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
               num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu")
# Shapes of the released file's keys (the full list is 4 x 8 Resampler tensors + 32 site tensors).
RELEASED_SHAPES = {
    "image_proj.latents": (1, 16, 768), "image_proj.proj_in.weight": (768, 1280),
    "image_proj.proj_out.weight": (768, 768), "image_proj.norm_out.weight": (768,),
    "image_proj.layers.0.0.to_q.weight": (768, 768), "image_proj.layers.0.0.to_kv.weight": (1536, 768),
    "image_proj.layers.0.0.to_out.weight": (768, 768), "image_proj.layers.0.1.1.weight": (3072, 768),
    "image_proj.layers.3.1.3.weight": (768, 3072),
    "ip_adapter.1.to_k_ip.weight": (320, 768), "ip_adapter.9.to_v_ip.weight": (1280, 768),
    "ip_adapter.31.to_k_ip.weight": (1280, 768),
}
RELEASED_SITES = 16

TINY_PLUS = ProjectionConfig(IPProjection.PLUS, clip_dim=96, context_dim=32, num_tokens=16,
                             resampler_dim=48, resampler_depth=2, resampler_heads=1, resampler_ff_mult=4)
TINY_VIT = dict(hidden_size=96, intermediate_size=192, projection_dim=64, num_hidden_layers=2,
                num_attention_heads=1, image_size=32, patch_size=8, hidden_act="gelu")


@dataclass(frozen=True)
class Model:
    label: str
    unet_config: dict
    projection: ProjectionConfig
    encoder_config: dict
    full_size: bool


FULL = Model("SD1.5 UNet + IP-Adapter plus SD1.5 + CLIP ViT-H/14 (random weights)", SD15_UNET, SD15_PLUS, VIT_H14, True)
SMOKE = Model("tiny SD1-structured UNet + tiny IP-Adapter plus + tiny CLIP vision (random weights)", TINY_SD1,
              TINY_PLUS, TINY_VIT, False)


# --- building --------------------------------------------------------------------------------------
def build_ip_adapter(bound: BoundLayout, projection: ProjectionConfig, check_release: bool) -> LoadedIPAdapter:
    """Random weights saved in the reference's nested ``.bin`` layout, loaded like a released file."""
    torch.manual_seed(2)
    model = IPAdapterModel(projection, {s.number: s.hidden for s in bound.ip_sites()})
    sd = model.state_dict()
    nested = {"image_proj": {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}}
    flat = flatten_state_dict(nested)
    if check_release:
        for key, shape in RELEASED_SHAPES.items():
            check(tuple(flat[key].shape) == shape, f"{key}: {tuple(flat[key].shape)}, the released file has {shape}")
        sites = {k.split(".")[1] for k in flat if k.startswith("ip_adapter.")}
        check(len(sites) == RELEASED_SITES, f"{len(sites)} attn2 sites, the released file has {RELEASED_SITES}")
    return ip_from_state_dict(flat, name="ip-adapter-plus_sd15_random")


def build_encoder(config: dict, check_release: bool) -> ClipVisionEncoder:
    """A random ``CLIPVisionModelWithProjection``, loaded back through the encoder file path."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(3)
    state = CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).state_dict()
    encoder = encoder_from_state_dict(state, "clip_vision_vit_h14_random")
    if check_release:
        got = encoder.shape
        check((got.hidden_size, got.num_layers, got.num_heads, got.intermediate_size, got.patch_size, got.image_size,
               got.projection_dim) == (1280, 32, 16, 5120, 14, 224, 1024), f"encoder read back as {got}")
    return encoder


def reference_image(height: int = 480, width: int = 640) -> np.ndarray:
    """A 4:3 RGB picture (so the centre crop really crops): colour gradients and a bright disc."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / height, xx / width
    disc = (((xx - 0.6) ** 2 + (yy - 0.4) ** 2) < 0.04).astype(np.float32)
    rgb = np.stack([0.8 * xx + 0.2 * disc, 0.5 * yy + 0.5 * disc, 1.0 - 0.7 * xx * yy], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


# --- the bench -----------------------------------------------------------------------------------
@dataclass
class Run:
    out: torch.Tensor
    seconds: float
    step_seconds: list[float]  # each UNet call (step 0 of a "with" run includes the 16 sites' K/V)
    parts: dict[str, float] = field(default_factory=dict)  # the "with" run's per-job phases
    encoder_calls: int = 0
    kv_calls: int = 0
    load: float = -1.0


class CallCounter:
    """Forward hooks that count calls: the encoder must run once per job (twice in the first), each site's K/V once."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.calls = 0
        self.handles = [m.register_forward_hook(self._count) for m in modules]

    def _count(self, *_: object) -> None:
        self.calls += 1

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


@dataclass
class Bench:
    unet: torch.nn.Module
    adapter: LoadedIPAdapter
    encoder: ClipVisionEncoder
    image: np.ndarray
    cond: torch.Tensor
    uncond: torch.Tensor
    spec: SampleSpec
    device: torch.device
    clock: Clock
    sync: Callable[[], None]
    encoder_counter: CallCounter = field(init=False)
    kv_counter: CallCounter = field(init=False)

    def __post_init__(self) -> None:
        self.encoder_counter = CallCounter([self.encoder.model.vision_model])
        self.kv_counter = CallCounter([kv.to_k_ip for kv in self.adapter.model.ip_adapter.values()])

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``AdapterGeneration._ip_runtime``: encoder to the UNet's device, image and "no image", back."""
        self.encoder.model.to(self.device)
        try:
            return self.encoder.encode_images([self.image], CropMode.CENTER, hidden_states=True)
        finally:
            self.encoder.model.to("cpu")

    def generate(self, weight: float | None) -> Run:
        """One whole job; ``weight=None`` means no unit."""
        gc.collect()
        self.sync()
        self.encoder_counter.take(), self.kv_counter.take()
        timer = StepTimer(self.unet, self.sync, self.clock)
        marks = [self.clock()]
        if weight is None:
            out = run_sampler(timer, self.spec, self.cond, self.uncond, None, self.device)  # type: ignore[arg-type]
            self.sync()
            parts = {}
        else:
            bound = bind_layout(self.unet)
            cond_h, uncond_h = self.encode()
            marks.append(self.clock())
            runtime = IPUnitRuntime.from_encoder_outputs("Adapter 1", self.adapter, cond_h, uncond_h, weight=weight)
            marks.append(self.clock())
            session = GenerationSession(bound, [runtime])
            binding = A1111Binding(session)
            binding.install()
            marks.append(self.clock())
            try:
                out = run_sampler(timer, self.spec, self.cond, self.uncond, session, self.device)  # type: ignore[arg-type]
            finally:
                self.sync()
                marks.append(self.clock())
                binding.restore()
                session.close()
            self.sync()
            marks.append(self.clock())
            parts = dict(zip(["bind_encode", "project", "install", "sampling", "restore"],
                             [b - a for a, b in zip(marks, marks[1:])]))
            parts["per_job"] = parts["bind_encode"] + parts["project"] + parts["install"] + parts["restore"]
        seconds = self.clock() - marks[0]
        return Run(out, seconds, timer.seconds, parts, self.encoder_counter.take(), self.kv_counter.take(), load_avg())


# --- parts, timed alone ----------------------------------------------------------------------------
def timed(clock: Clock, sync: Callable[[], None], fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync()
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return times


def stats(times: list[float]) -> dict:
    return {"runs": rounded(times), "median": round(statistics.median(times), 4), "min": round(min(times), 4)}


def attn2_inputs(bench: Bench, latent: int) -> tuple[float, dict[str, torch.Tensor]]:
    """One plain UNet call at ``latent`` (cond and uncond rows): its time and every attn2's input x."""
    bound = bind_layout(bench.unet)
    captured: dict[str, torch.Tensor] = {}
    handles = [bound.module(site.path).register_forward_pre_hook(
        lambda m, args, path=site.path: captured.setdefault(path, args[0].detach().clone()))
        for site in bound.ip_sites()]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, latent, latent, generator=g).to(bench.device)
    context = torch.cat([bench.cond, bench.uncond]).to(bench.device)
    t = torch.full((2,), 500.0, device=bench.device)
    autocast = torch.autocast(bench.device.type, dtype=torch.float16, enabled=bench.device.type == "cuda")
    try:
        with torch.no_grad(), autocast:
            seconds = timed(bench.clock, bench.sync, lambda: bench.unet(x, t, context=context), 1)[0]
    finally:
        for h in handles:
            h.remove()
    return seconds, captured


def image_attention_seconds(bench: Bench, runtime: IPUnitRuntime, inputs: dict[str, torch.Tensor], latent: int,
                            repeats: int) -> list[float]:
    """What the attn2 wrappers add to one UNet call: the image attention at all 16 sites, plus the sum.
    The query is the text attention's (the wrapper catches it), so it is computed before the clock starts."""
    bound = bind_layout(bench.unet)
    sites: list[tuple[IPSite, torch.nn.Module]] = [(s, bound.module(s.path)) for s in bound.ip_sites()]
    session = GenerationSession(bound, [runtime])
    call = UNetCall((latent, latent), torch.tensor([1.0, 0.0], device=bench.device))
    autocast = torch.autocast(bench.device.type, dtype=torch.float16, enabled=bench.device.type == "cuda")

    def one_call() -> None:
        for site, attn in sites:
            x = inputs[site.path]
            text_out = x  # stands in for the text attention's output: same shape and dtype
            rows = UNetCall(call.latent_hw, call.cond_mask.to(x.dtype))
            added = session.attention(site, attn, x, queries[site.path], rows)
            _ = text_out + added.to(text_out.dtype)

    with torch.no_grad(), autocast:
        queries = {site.path: attn.to_q(inputs[site.path]) for site, attn in sites}
        one_call()  # K/V computed and cached here, as at step 0 of a generation
        return timed(bench.clock, bench.sync, one_call, repeats)


def measure_parts(bench: Bench, repeats: int, probe_latent: int | None) -> dict:
    clock, sync = bench.clock, bench.sync
    pixels = bench.encoder.preprocess([bench.image], CropMode.CENTER)
    hidden = bench.encoder.encode(pixels, hidden_states=True)
    bench.encoder.model.to(bench.device)
    parts = {
        "preprocess_s": stats(timed(clock, sync, lambda: bench.encoder.preprocess([bench.image], CropMode.CENTER),
                                    repeats)),
        "encoder_forward_s": stats(timed(clock, sync, lambda: bench.encoder.encode(pixels, hidden_states=True),
                                         repeats)),
    }
    bench.encoder.model.to("cpu")
    parts["projection_s"] = stats(timed(clock, sync, lambda: IPUnitRuntime.from_encoder_outputs(
        "Adapter 1", bench.adapter, hidden, hidden), repeats))  # the image's tokens and "no image"'s
    runtime = IPUnitRuntime.from_encoder_outputs("Adapter 1", bench.adapter, hidden, hidden)
    bound = bind_layout(bench.unet)
    like = torch.zeros(2, 1, 1, device=bench.device,
                       dtype=torch.float16 if bench.device.type == "cuda" else torch.float32)

    def all_kv() -> None:
        runtime._kv.clear()
        for site in bound.ip_sites():
            attn = bound.module(site.path)
            runtime.key_value(site, None, like, int(attn.heads), attn.to_out[0].weight)

    parts["kv_all_sites_s"] = stats(timed(clock, sync, all_kv, repeats))
    latent = bench.spec.latent_size
    call_s, inputs = attn2_inputs(bench, latent)
    parts["image_attention_per_call_s"] = {"latent": latent, **stats(
        image_attention_seconds(bench, runtime, inputs, latent, repeats))}
    if probe_latent is not None and probe_latent != latent:
        calls, inputs = [], {}
        for _ in range(2):  # the minimum of two: other processes can only make a call slower
            seconds, captured = attn2_inputs(bench, probe_latent)
            calls.append(seconds)
            inputs = inputs or captured
        parts["probe"] = {"latent": probe_latent, "resolution": f"{probe_latent * 8}x{probe_latent * 8}",
                          "unet_call_s": stats(calls),
                          "image_attention_per_call_s": stats(
                              image_attention_seconds(bench, runtime, inputs, probe_latent, repeats))}
    runtime.release()
    return parts


# --- measuring -----------------------------------------------------------------------------------
def measure(bench: Bench, repeats: int, probe_latent: int | None) -> dict:
    sites = len(bench.adapter.site_hidden)

    def per_job_counts(run: Run, which: str) -> None:
        # the image; "no image" only in the encoder's first job (then cached)
        expected = 2 if which == "warm-up" else 1
        check(run.encoder_calls == expected,
              f"the encoder ran {run.encoder_calls} times in one job ({which}), expected {expected}")
        if which != "weight 0":
            check(run.kv_calls == sites, f"{run.kv_calls} K/V projections in one job, expected {sites} (once per site)")

    runs = measure_pairs(bench.generate, repeats, per_job_counts, describe=lambda run: f"parts {fmt(run.parts)}")
    log("timing the parts alone" + (f" (and UNet calls at latent {probe_latent})" if probe_latent else ""))
    parts = measure_parts(bench, max(3, repeats), probe_latent)
    result = summarise(runs.pairs, bench.spec.steps)
    result["parts_alone"] = parts
    result["model_of_the_cost"] = cost_model(result, parts, bench.spec)
    result["warmup_s"] = {"without": round(runs.reference.seconds, 4), "with": round(runs.adapted.seconds, 4)}
    result["checks"]["mean_abs_change_with_unit"] = runs.change
    return result


def fmt(parts: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in parts.items())


def summarise(pairs: list[tuple[Run, Run]], steps: int) -> dict:
    without, with_unit = [b.seconds for b, _ in pairs], [u.seconds for _, u in pairs]
    med_without, med_with = statistics.median(without), statistics.median(with_unit)
    ratio = med_with / med_without
    pair_ratios = [w / b for b, w in zip(without, with_unit)]
    # Per UNet call: steps 1.. only (step 0 of a "with" run also computes the 16 sites' K/V).
    later = [(sum(u.step_seconds[1:]) - sum(b.step_seconds[1:])) / max(steps - 1, 1) for b, u in pairs]
    min_without = [min(s) for s in zip(*[b.step_seconds for b, _ in pairs])]
    min_with = [min(s) for s in zip(*[u.step_seconds for _, u in pairs])]
    part_names = list(pairs[0][1].parts)
    return {
        "times_s": {"without": rounded(without), "with": rounded(with_unit)},
        "load_avg_1min": {"without": [b.load for b, _ in pairs], "with": [u.load for _, u in pairs]},
        "median_s": {"without": round(med_without, 4), "with": round(med_with, 4)},
        "ratio_of_medians": round(ratio, 4),
        "pair_ratios": rounded(pair_ratios),
        "median_pair_ratio": round(statistics.median(pair_ratios), 4),
        "goal": GOAL,
        "pass": ratio <= GOAL,
        "with_run_parts_s": {name: stats([u.parts[name] for _, u in pairs]) for name in part_names},
        "unet_call_s": {"without_median": round(statistics.median([s for b, _ in pairs for s in b.step_seconds[1:]]), 4),
                        "with_median": round(statistics.median([s for _, u in pairs for s in u.step_seconds[1:]]), 4)},
        "per_call_overhead_in_runs_s": {
            "per_pair": rounded(later), "median": round(statistics.median(later), 4),
            "from_per_step_minima": round((sum(min_with[1:]) - sum(min_without[1:])) / max(steps - 1, 1), 4)},
        "per_step_minima_s": {"without": rounded(min_without), "with": rounded(min_with)},
        "run_time_spread": round(max(max(without) / min(without), max(with_unit) / min(with_unit)), 4),
        "checks": {"weight_0_equals_baseline": True, "baseline_after_session_equals_baseline": True,
                   "with_unit_reproducible": True, "encoder_forwards_per_job": 1, "kv_projections_per_site_per_job": 1},
    }


def predicted_ratio(call_s: float, per_call_s: float, per_job_s: float, steps: int) -> float:
    return (steps * (call_s + per_call_s) + per_job_s) / (steps * call_s)


def cost_model(result: dict, parts: dict, spec: SampleSpec) -> dict:
    """ratio = (steps x (UNet call + image attention) + per-job cost) / (steps x UNet call).

    Checked at the measured resolution against the measured ratio; then fed with the parts timed at
    the 512x512 latent. The per-job cost (encoder x2, preprocessing, projection, install, restore
    and the 16 sites' K/V) does not depend on the latent size."""
    per_job = result["with_run_parts_s"]["per_job"]["median"] + parts["kv_all_sites_s"]["min"]
    call = result["unet_call_s"]["without_median"]
    per_call = parts["image_attention_per_call_s"]["min"]
    model = {
        "per_job_s": round(per_job, 4),
        "at_measured_resolution": {
            "latent": spec.latent_size, "unet_call_s": call, "image_attention_per_call_s": per_call,
            "predicted_ratio": round(predicted_ratio(call, per_call, per_job, spec.steps), 4),
            "measured_ratio": result["ratio_of_medians"]},
    }
    probe = parts.get("probe")
    if probe is not None:
        call_512, per_call_512 = probe["unet_call_s"]["min"], probe["image_attention_per_call_s"]["min"]
        model["extrapolated"] = {
            "note": f"an extrapolation from parts timed at the {probe['resolution']} latent, not a measured generation",
            "resolution": probe["resolution"], "latent": probe["latent"], "unet_call_s": call_512, "image_attention_per_call_s": per_call_512,
            "steps": spec.steps, "ratio": round(predicted_ratio(call_512, per_call_512, per_job, spec.steps), 4),
            "ratio_without_per_job_cost": round(predicted_ratio(call_512, per_call_512, 0.0, spec.steps), 4)}
    return model


# --- reporting -----------------------------------------------------------------------------------
def table_row(result: dict) -> str:
    env, med = result["environment"], result["median_s"]
    if env["device"] == "cuda":
        where = f"GPU {env['gpu']} (fp16, wall clock)"
    else:
        where = f"CPU ({env['cpu']['torch_threads']} thread, process CPU time)"
    verdict = "pass" if result["pass"] else "FAIL"
    return (f"| {where}, `ip_overhead_cputime.py` | {result['model']['label']} | {result['resolution']} | "
            f"{result['steps']} | {med['without']:.2f} | {med['with']:.2f} | {result['ratio_of_medians']:.4f} | "
            f"<= {GOAL} {verdict} |")


def describe(model: Model, bench: Bench, smoke: bool, repeats: int) -> dict:
    size = bench.spec.latent_size * LATENT_SCALE
    cuda = bench.device.type == "cuda"
    return {
        "benchmark": "ip_overhead", "mode": "smoke" if smoke else "full",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "environment": environment(bench.device),
        "clock": "wall clock (perf_counter, cuda synchronize)" if cuda else "process CPU time (time.process_time)",
        "model": {"label": model.label, "unet_params": params(bench.unet),
                  "ip_adapter_params": params(bench.adapter.model),
                  "image_proj_params": params(bench.adapter.model.image_proj),
                  "ip_sites": len(bench.adapter.site_hidden), "image_tokens": bench.adapter.projection.num_tokens,
                  "encoder_params": params(bench.encoder.model), "encoder_shape": vars(bench.encoder.shape)},
        "reference_image": f"{bench.image.shape[1]}x{bench.image.shape[0]} RGB, centre crop to "
                           f"{bench.encoder.shape.image_size}",
        "dtype": "fp16 UNet (autocast), fp32 encoder and projection" if cuda else "fp32",
        "resolution": f"{size}x{size}", "latent": bench.spec.latent_size, "steps": bench.spec.steps,
        "cfg_scale": bench.spec.cfg_scale, "seed": bench.spec.seed, "repeats": repeats,
        "order": "warm-up without, warm-up with, weight-0 check, then (without, with) x repeats, then the parts alone",
    }


def build(model: Model, latent: int, steps: int, device: torch.device, clock: Clock) -> Bench:
    unet = build_tiny_unet(model.unet_config, seed=0)  # seeded; zero-initialised layers filled
    if device.type == "cuda":
        unet = unet.half()
    unet = unet.to(device)
    adapter = build_ip_adapter(bind_layout(unet), model.projection, check_release=model.full_size)
    encoder = build_encoder(model.encoder_config, check_release=model.full_size)
    g = torch.Generator().manual_seed(99)
    dim = model.unet_config["context_dim"]
    cond, uncond = torch.randn(1, 77, dim, generator=g), torch.randn(1, 77, dim, generator=g)
    return Bench(unet, adapter, encoder, reference_image(), cond, uncond, SampleSpec(steps=steps, latent_size=latent),
                 device, clock, device_sync(device))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, 4 steps: finishes in seconds")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--latent", type=int, help="latent size (pixels / 8; default: 64 CUDA, 24 CPU, 16 smoke)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: 20, smoke 4)")
    parser.add_argument("--repeats", type=int, help="timed without/with pairs (default: 3 CPU, 10 CUDA, 2 smoke)")
    parser.add_argument("--probe-latent", type=int,
                        help="latent at which UNet calls and the image attention are timed alone for the "
                             "extrapolation (default 64 = 512x512, smoke 24; 0 skips it)")
    parser.add_argument("--out", type=Path, help="results JSON (default: bench/results/ip_overhead_<device>.json; "
                                                 "smoke runs write only when given)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if use_cuda:  # deterministic kernels, so the bit-for-bit checks mean something
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        clock: Clock = time.perf_counter
    else:  # CPU time of one thread: what this process did, whatever the neighbours do
        torch.set_num_threads(1)
        clock = time.process_time
    model = SMOKE if args.smoke else FULL
    latent = args.latent or (16 if args.smoke else WEBUI_LATENT if use_cuda else 24)
    steps = args.steps or (4 if args.smoke else 20)
    repeats = args.repeats or (2 if args.smoke else 10 if use_cuda else 3)
    probe = (24 if args.smoke else WEBUI_LATENT) if args.probe_latent is None else (args.probe_latent or None)
    check(latent >= 8, "--latent must be >= 8")

    bench = build(model, latent, steps, device, clock)
    log(f"{model.label} on {device.type}: UNet {params(bench.unet) / 1e6:.1f}M, IP-Adapter "
        f"{params(bench.adapter.model) / 1e6:.1f}M, encoder {params(bench.encoder.model) / 1e6:.1f}M parameters, "
        f"{latent * 8}x{latent * 8}, {steps} steps, {repeats} pairs, {torch.get_num_threads()} threads")
    if args.smoke and not use_cuda:
        check_device_sampler(bench.unet, bench.spec, bench.cond, bench.uncond)
    result = describe(model, bench, args.smoke, repeats)
    result.update(measure(bench, repeats, probe))
    report(result, table_row(result), args.out or (None if args.smoke else RESULTS / f"ip_overhead_{device.type}.json"))
    cost = result["model_of_the_cost"]
    log(f"ratio of medians {result['ratio_of_medians']:.4f} at {result['resolution']}: "
        f"{'pass' if result['pass'] else 'FAIL'} (goal <= {GOAL}); parts predict "
        f"{cost['at_measured_resolution']['predicted_ratio']:.4f}")
    if "extrapolated" in cost:
        extra = cost["extrapolated"]
        log(f"extrapolated to {extra['resolution']} from parts timed there (not measured): {extra['ratio']:.4f}")
    return 0 if result["pass"] or args.smoke else 1


if __name__ == "__main__":
    raise SystemExit(main())
