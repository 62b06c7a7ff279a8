"""Overhead of one IP-Adapter FaceID unit on a 20-step generation, beside a plain IP-Adapter unit and no unit.

    .venv/bin/python bench/faceid_overhead_cputime.py           # full size, CPU, 1 thread, CPU time (~40 min)
    .venv/bin/python bench/faceid_overhead_cputime.py --smoke   # tiny models: a wiring check in about a minute

Question: what does a FaceID unit add to a generation, and how does that compare with a plain
IP-Adapter unit? All in one process and one run, the configurations interleaved round by round, so
the ratios are measured under the same conditions.

Models, built in code with seeded random weights (nothing is downloaded):
- the genuine ldm ``UNetModel`` in SD1.5's configuration (859.5M parameters);
- FaceID: an ``ip-adapter-faceid_sd15`` with the released file's shapes (the MLP projection 512 -> 1024 ->
  4 x 768 tokens, ``to_k_ip``/``to_v_ip`` at the 16 attn2 sites, the rank-128 LoRA on q/k/v/out of all 32
  attention layers), written as the reference's nested ``.bin`` and loaded by the panel's model cache;
  face analysis on the two graphs of ``bench/face_analysis.py`` (det_10g-sized SCRFD, w600k_r50-sized
  IResNet-50) in ``<tmp>/insightface/models/buffalo_l``, onnxruntime with one thread;
- plain IP-Adapter: an ``ip-adapter_sd15`` with the released shapes (linear projection 1024 -> 4 x 768,
  16 sites), loaded through ``ip_from_state_dict``, and the full CLIP ViT-H/14 vision encoder of
  ``bench/ip_overhead_cputime.py`` (632.1M parameters; its pooled ``image_embeds``), its weights
  memory-mapped from a file (see ``mapped_encoder``: the process must stay small on a shared machine).

Each "with" run is a whole job. FaceID: the family's own builder (``build_runtime``, what the panel
calls) with the face cache emptied first, so every job analyses its photo (a new photo each
generation: the worst case; a repeated photo costs no analysis), the projection of the face and of
"no face", the LoRA's 128 low-rank deltas; then the session with the image attention at 16 sites and
the LoRA terms at 128 layers in every UNet call, and the restore. Plain IP: as ``ip_overhead_cputime.py``
does it: the encoder's forward pass on the photo, the projection, the session. The configurations:
``none``, ``ip``, ``faceid`` (LoRA on, the default) and ``faceid_no_lora`` (the LoRA option off).

Method: one warm-up run of each, weight-0 runs (equal to the baseline bit for bit), then ``--repeats``
rounds of none, ip, faceid, faceid_no_lora. Clock: this process's CPU time with one torch thread (the
2-core machine is shared; wall clock is recorded beside it). Checks before any number is written: every
unit changes the output, weight 0 equals the baseline bit for bit, every baseline equals the first
(exact restore), every configuration reproduces its first run bit for bit, the encoder ran once per IP
job, face analysis once per FaceID job, each site's K/V once per job, and the FaceID unit carried 128
LoRA deltas (none with the option off). Then the parts are timed alone.

Not a test: pytest never collects ``bench/``.
"""
from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/*.py, whatever the working directory
from common import (RESULTS, SD15_UNET, Clock, StepTimer, check, environment, generation_arguments,  # noqa: E402
                    load_avg, log, params, report, rounded, run_sampler)
from face_analysis import bench_image, calibrated_bias, iresnet50, scrfd_10g_kps  # noqa: E402
from ip_overhead_cputime import TINY_VIT, VIT_H14, CallCounter, build_encoder, stats, timed  # noqa: E402

from lib_adapters.demo import SampleSpec  # noqa: E402
from lib_adapters.catalog import EncoderCatalog  # noqa: E402
from lib_adapters.face import FaceAnalyzer, face_models_root  # noqa: E402
from lib_adapters.formats.ip import LoadedIPAdapter, ip_from_state_dict  # noqa: E402
from lib_adapters.formats.reader import flatten_state_dict  # noqa: E402
from lib_adapters.inference.build import BuildContext, UnitInputs  # noqa: E402
from lib_adapters.inference.cache import AdapterCache  # noqa: E402
from lib_adapters.inference.encodings import EncodingCache  # noqa: E402
from lib_adapters.inference.faceid import face_tokens  # noqa: E402
from lib_adapters.inference.faces import FaceAnalyzers, FaceService  # noqa: E402
from lib_adapters.inference.families import build_runtime  # noqa: E402
from lib_adapters.inference.ip import IPUnitRuntime  # noqa: E402
from lib_adapters.inference.runtime import UnitRuntime  # noqa: E402
from lib_adapters.inference.session import GenerationSession  # noqa: E402
from lib_adapters.inference.units import AdapterUnit, MultiImage  # noqa: E402
from lib_adapters.models.clip_vision import ClipVisionEncoder, CropMode  # noqa: E402
from lib_adapters.models.faceid import FaceIDConfig, FaceIDAdapterModel, FaceIDVariant  # noqa: E402
from lib_adapters.models.ip_adapter import IPAdapterModel, IPProjection, ProjectionConfig  # noqa: E402
from lib_adapters.preprocess.registry import PreprocessorCache  # noqa: E402
from lib_adapters.tiny import TINY_SD1, build_tiny_unet  # noqa: E402
from lib_adapters.unet.a1111 import A1111Binding  # noqa: E402
from lib_adapters.unet.layout import BoundLayout, bind_layout  # noqa: E402

LATENT_SCALE = 8
CONFIGS = ("none", "ip", "faceid", "faceid_no_lora")
FACEID_NAME = "ip-adapter-faceid_sd15_random"
# Shapes of the released files' keys (checked at full size).
FACEID_RELEASED = {"image_proj.proj.0.weight": (1024, 512), "image_proj.proj.2.weight": (3072, 1024),
                   "image_proj.norm.weight": (768,), "ip_adapter.1.to_k_ip.weight": (320, 768),
                   "ip_adapter.0.to_q_lora.down.weight": (128, 320), "ip_adapter.1.to_k_lora.down.weight": (128, 768),
                   "ip_adapter.1.to_k_lora.up.weight": (320, 128), "ip_adapter.31.to_out_lora.up.weight": (1280, 128)}
IP_RELEASED = {"image_proj.proj.weight": (3072, 1024), "image_proj.norm.weight": (768,),
               "ip_adapter.1.to_k_ip.weight": (320, 768), "ip_adapter.31.to_v_ip.weight": (1280, 768)}
LORA_PARTS = ("q", "k", "v", "out")


@dataclass(frozen=True)
class Model:
    label: str
    unet_config: dict
    encoder_config: dict
    lora_rank: int
    full_size: bool


FULL = Model("SD1.5 UNet + ip-adapter-faceid_sd15 (LoRA rank 128) + buffalo_l-sized face graphs / "
             "ip-adapter_sd15 + CLIP ViT-H/14 (random weights)", SD15_UNET, VIT_H14, 128, True)
SMOKE = Model("tiny SD1-structured UNet + tiny FaceID (LoRA rank 4) / tiny plain IP-Adapter + tiny CLIP vision; "
              "full-size face graphs (random weights)", TINY_SD1, TINY_VIT, 4, False)


# --- building --------------------------------------------------------------------------------------
def faceid_file(bound: BoundLayout, context_dim: int, rank: int, folder: Path, check_release: bool) -> Path:
    """Random weights in the reference's nested ``.bin`` layout (its LoRA as ``LoRAAttnProcessor`` names it:
    processor 2n is the self-attention before IP site 2n+1, 2n+1 that site's cross-attention)."""
    torch.manual_seed(4)
    sites = {s.number: s.hidden for s in bound.ip_sites()}
    model = FaceIDAdapterModel(FaceIDConfig(FaceIDVariant.FACEID, context_dim, num_tokens=4), sites)
    sd = model.state_dict()
    nested = {part: {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
              for part in ("image_proj", "ip_adapter")}
    for number, hidden in sites.items():
        for processor, kv_in in ((number - 1, hidden), (number, context_dim)):
            for part in LORA_PARTS:
                width = kv_in if part in ("k", "v") else hidden
                nested["ip_adapter"][f"{processor}.to_{part}_lora.down.weight"] = torch.randn(rank, width) / width ** 0.5
                nested["ip_adapter"][f"{processor}.to_{part}_lora.up.weight"] = torch.randn(hidden, rank) / rank ** 0.5 / 8
    if check_release:
        flat = flatten_state_dict(nested)
        for key, shape in FACEID_RELEASED.items():
            check(tuple(flat[key].shape) == shape, f"{key}: {tuple(flat[key].shape)}, the released file has {shape}")
    path = folder / f"{FACEID_NAME}.bin"
    torch.save(nested, path)
    return path


def plain_ip_adapter(bound: BoundLayout, context_dim: int, clip_dim: int, check_release: bool) -> LoadedIPAdapter:
    torch.manual_seed(2)
    model = IPAdapterModel(ProjectionConfig(IPProjection.PLAIN, clip_dim=clip_dim, context_dim=context_dim,
                                            num_tokens=4), {s.number: s.hidden for s in bound.ip_sites()})
    sd = model.state_dict()
    flat = flatten_state_dict({part: {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
                               for part in ("image_proj", "ip_adapter")})
    if check_release:
        for key, shape in IP_RELEASED.items():
            check(tuple(flat[key].shape) == shape, f"{key}: {tuple(flat[key].shape)}, the released file has {shape}")
    return ip_from_state_dict(flat, name="ip-adapter_sd15_random")


def mapped_encoder(config: dict, folder: Path, check_release: bool) -> ClipVisionEncoder:
    """``ip_overhead_cputime.py``'s random encoder, its weights then memory-mapped from a file in ``folder``.

    Held in memory as the panel holds it, the fp32 ViT-H/14 (2.5 GB) beside the SD1.5 UNet (3.4 GB) made this
    process the one the kernel killed on a shared 23 GB machine; mapped, its pages are file cache the kernel
    can drop and read back rather than kill. The arithmetic is the same; only page faults (CPU time too)
    can be added to the IP unit's encoder pass when pages were dropped: its time is reported alone below."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = build_encoder(config, check_release)
    path = folder / "clip_vision.pt"
    torch.save(encoder.model.state_dict(), path)
    shape, name = encoder.shape, encoder.name
    del encoder
    gc.collect()
    state = torch.load(path, mmap=True, weights_only=True)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    check(not unexpected and all(k.endswith("position_ids") for k in missing), f"{missing[:3]} {unexpected[:3]}")
    embeddings = model.vision_model.embeddings
    embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
    return ClipVisionEncoder(name, shape, model.eval().requires_grad_(False))


def face_pack(root: Path, image: np.ndarray) -> None:
    """``bench/face_analysis.py``'s graphs, the detector calibrated so that about 100 anchors of ``image`` pass."""
    folder = face_models_root(root) / "buffalo_l"
    det_path, _ = scrfd_10g_kps(folder / "det_10g.onnx")
    scrfd_10g_kps(det_path, score_bias=calibrated_bias(det_path, image, 100))
    iresnet50(folder / "w600k_r50.onnx")


class CountingAnalyses:
    """Counts ``FaceAnalyzer.analyze`` calls (the unit must analyse its photo once per job, cache emptied)."""

    def __init__(self) -> None:
        self.calls = 0
        original = FaceAnalyzer.analyze

        def counted(analyzer: FaceAnalyzer, *args, **kwargs):
            self.calls += 1
            return original(analyzer, *args, **kwargs)

        FaceAnalyzer.analyze = counted  # type: ignore[method-assign]

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


# --- the bench -----------------------------------------------------------------------------------
@dataclass
class Run:
    config: str
    out: torch.Tensor
    seconds: float
    wall: float
    step_seconds: list[float]
    parts: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    load: float = -1.0


@dataclass
class Bench:
    unet: torch.nn.Module
    bound: BoundLayout
    faceid_path: Path
    models_dir: Path
    ip: LoadedIPAdapter
    encoder: ClipVisionEncoder
    image: np.ndarray
    cond: torch.Tensor
    uncond: torch.Tensor
    spec: SampleSpec
    clock: Clock
    models: AdapterCache = field(default_factory=AdapterCache)  # the panel's model cache, kept across jobs
    analyzers: FaceAnalyzers = field(default_factory=FaceAnalyzers)  # loaded face models, kept across jobs
    analyses: CountingAnalyses = field(default_factory=CountingAnalyses)
    counters: dict[str, CallCounter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        faceid = self.models.load_adapter(self.faceid_path)
        self.counters = {"encoder": CallCounter([self.encoder.model.vision_model]),
                         "ip_kv": CallCounter([kv.to_k_ip for kv in self.ip.model.ip_adapter.values()]),
                         "faceid_kv": CallCounter([kv.to_k_ip for kv in faceid.model.ip_adapter.values()])}

    def faceid_runtime(self, weight: float, lora: bool, encodings: EncodingCache | None = None) -> UnitRuntime:
        """What the panel's controller does for the unit: the family's builder; by default with an empty face
        and token cache (a new photo), or with ``encodings`` kept from an earlier job (the same photo again)."""
        encodings = encodings if encodings is not None else EncodingCache()
        faces = FaceService(self.models_dir, self.analyzers, encodings)
        ctx = BuildContext(self.bound, self.models, EncoderCatalog([]), encodings,
                           UnitInputs(PreprocessorCache(), self.models_dir / "no-annotators", faces=faces))
        unit = AdapterUnit(enabled=True, model=FACEID_NAME, image=self.image, weight=weight, faceid_lora=lora,
                           faceid_lora_weight=1.0 if weight else 0.0)  # weight 0: nothing may act
        return build_runtime(ctx, "Adapter 1", unit, self.faceid_path).runtime

    def ip_runtime(self, weight: float) -> UnitRuntime:
        """As ``ip_overhead_cputime.py``: the encoder on the photo (plain: zero embeddings for "no image")."""
        cond, uncond = self.encoder.encode_images([self.image], CropMode.CENTER, hidden_states=False)
        return IPUnitRuntime.from_encoder_outputs("Adapter 1", self.ip, cond, uncond, weight=weight)

    def runtime(self, config: str, weight: float) -> UnitRuntime:
        if config == "ip":
            return self.ip_runtime(weight)
        return self.faceid_runtime(weight, lora=config == "faceid")

    def generate(self, config: str, weight: float = 1.0) -> Run:
        gc.collect()
        for counter in self.counters.values():
            counter.take()
        self.analyses.take()
        timer = StepTimer(self.unet, lambda: None, self.clock)
        wall, start = time.perf_counter(), self.clock()
        parts: dict[str, float] = {}
        if config == "none":
            out = run_sampler(timer, self.spec, self.cond, self.uncond, None, torch.device("cpu"))  # type: ignore[arg-type]
            deltas = 0
        else:
            runtime = self.runtime(config, weight)
            parts["build"] = self.clock() - start
            deltas = len(runtime.weight_deltas(self.bound))
            session = GenerationSession(self.bound, [runtime])
            binding = A1111Binding(session)
            mark = self.clock()
            binding.install()
            parts["install"] = self.clock() - mark
            try:
                mark = self.clock()
                out = run_sampler(timer, self.spec, self.cond, self.uncond, session, torch.device("cpu"))  # type: ignore[arg-type]
                parts["sampling"] = self.clock() - mark
            finally:
                mark = self.clock()
                binding.restore()
                session.close()
                parts["restore"] = self.clock() - mark
        seconds, wall = self.clock() - start, time.perf_counter() - wall
        counts = {name: counter.take() for name, counter in self.counters.items()}
        counts |= {"face_analyses": self.analyses.take(), "lora_deltas": deltas}
        return Run(config, out, seconds, wall, timer.seconds, parts, counts, load_avg())


def expected_counts(config: str, weight: float, sites: int) -> dict[str, int]:
    acts = weight != 0
    return {"encoder": int(config == "ip"),
            "ip_kv": sites if config == "ip" and acts else 0,
            "faceid_kv": sites if config.startswith("faceid") and acts else 0,
            "face_analyses": int(config.startswith("faceid")),
            "lora_deltas": 8 * sites if config == "faceid" and acts else 0}


def measure_rounds(bench: Bench, repeats: int) -> tuple[dict[str, list[Run]], dict[str, float]]:
    """Warm-ups, the checks, then ``repeats`` rounds of every configuration; aborts when a check fails."""
    sites = len(bench.bound.ip_sites())
    first: dict[str, Run] = {}

    def checked(config: str, weight: float = 1.0) -> Run:
        run = bench.generate(config, weight)
        check(run.counts == expected_counts(config, weight, sites),
              f"{config} at weight {weight}: per-job counts {run.counts}, expected {expected_counts(config, weight, sites)}")
        check(bool(torch.isfinite(run.out).all()), f"{config}: non-finite latents")
        return run

    for config in CONFIGS:
        first[config] = checked(config)
        log(f"warm-up {config}: {first[config].seconds:.3f} s CPU (load {first[config].load})")
    change = {}
    for config in CONFIGS[1:]:
        change[config] = float((first[config].out - first["none"].out).abs().mean())
        check(change[config] > 0, f"the {config} unit did not change the output")
        zero = checked(config, 0.0)
        check(torch.equal(zero.out, first["none"].out), f"{config} at weight 0 differs from the baseline")
    check(not torch.equal(first["faceid"].out, first["faceid_no_lora"].out), "the FaceID LoRA did not act")
    log("checks: every unit acts, weight 0 == baseline bit for bit, the per-job counts hold")
    runs: dict[str, list[Run]] = {config: [] for config in CONFIGS}
    for i in range(repeats):
        for config in CONFIGS:
            run = checked(config)
            check(torch.equal(run.out, first[config].out),
                  f"{config}: not reproducible" if config != "none" else "a baseline differs: restore is not exact")
            runs[config].append(run)
        line = ", ".join(f"{c} {runs[c][-1].seconds:.2f}" for c in CONFIGS)
        log(f"round {i + 1}/{repeats}: {line} s CPU (load {runs['none'][-1].load})")
    return runs, change


# --- parts, timed alone ----------------------------------------------------------------------------
def measure_parts(bench: Bench, repeats: int) -> dict:
    clock, no = bench.clock, (lambda: None)
    service = FaceService(bench.models_dir, bench.analyzers, EncodingCache())
    analyzer = bench.analyzers.get(service.files(), service.device)
    face = analyzer.analyze(bench.image)
    faceid = bench.models.load_adapter(bench.faceid_path)
    embeds = torch.from_numpy(face.normed_embedding)[None]
    kept = EncodingCache()
    bench.faceid_runtime(1.0, lora=True, encodings=kept)  # the photo's face and tokens now in the cache
    pixels = bench.encoder.preprocess([bench.image], CropMode.CENTER)
    embeds_clip = bench.encoder.encode(pixels, hidden_states=False)
    return {
        "face_analysis_s": stats(timed(clock, no, lambda: analyzer.analyze(bench.image), repeats)),
        "faceid_projection_s": stats(timed(clock, no, lambda: face_tokens(faceid, embeds, None, None,
                                                                          MultiImage.AVERAGE), repeats)),
        "faceid_build_new_photo_s": stats(timed(clock, no, lambda: bench.faceid_runtime(1.0, lora=True), repeats)),
        "faceid_build_same_photo_s": stats(timed(clock, no, lambda: bench.faceid_runtime(1.0, lora=True,
                                                                                          encodings=kept), repeats)),
        "clip_preprocess_s": stats(timed(clock, no, lambda: bench.encoder.preprocess([bench.image], CropMode.CENTER),
                                         repeats)),
        "clip_encoder_forward_s": stats(timed(clock, no, lambda: bench.encoder.encode(pixels, hidden_states=False),
                                              repeats)),
        "ip_projection_s": stats(timed(clock, no, lambda: IPUnitRuntime.from_encoder_outputs(
            "Adapter 1", bench.ip, embeds_clip, torch.zeros_like(embeds_clip)), repeats)),
    }


def summarise(runs: dict[str, list[Run]], steps: int) -> dict:
    base = [r.seconds for r in runs["none"]]
    out: dict = {"times_s": {c: rounded([r.seconds for r in runs[c]]) for c in CONFIGS},
                 "wall_s": {c: rounded([r.wall for r in runs[c]]) for c in CONFIGS},
                 "load_avg_1min": {c: [r.load for r in runs[c]] for c in CONFIGS},
                 "median_s": {c: round(statistics.median(r.seconds for r in runs[c]), 4) for c in CONFIGS}}
    med = out["median_s"]
    out["ratio_of_medians_to_none"] = {c: round(med[c] / med["none"], 4) for c in CONFIGS[1:]}
    out["round_ratios_to_none"] = {c: rounded([r.seconds / b for r, b in zip(runs[c], base)]) for c in CONFIGS[1:]}
    out["median_round_ratio_to_none"] = {c: round(statistics.median(out["round_ratios_to_none"][c]), 4)
                                         for c in CONFIGS[1:]}
    out["faceid_over_ip"] = {"ratio_of_medians": round(med["faceid"] / med["ip"], 4),
                             "round_ratios": rounded([f.seconds / i.seconds for f, i in zip(runs["faceid"], runs["ip"])])}
    # per UNet call, steps 1.. (step 0 of a run with a unit also computes the sites' K/V)
    calls = {c: statistics.median(s for r in runs[c] for s in r.step_seconds[1:]) for c in CONFIGS}
    out["unet_call_median_s"] = {c: round(v, 4) for c, v in calls.items()}
    out["per_call_overhead_s"] = {c: round(calls[c] - calls["none"], 4) for c in CONFIGS[1:]}
    out["per_job_parts_s"] = {c: {name: stats([r.parts[name] for r in runs[c]]) for name in runs[c][0].parts}
                              for c in CONFIGS[1:]}
    out["checks"] = {"weight_0_equals_baseline": True, "baseline_after_session_equals_baseline": True,
                     "every_configuration_reproducible": True, "encoder_forwards_per_ip_job": 1,
                     "face_analyses_per_faceid_job": 1, "kv_projections_per_site_per_job": 1,
                     "lora_deltas_per_faceid_job": "8 per IP site (q, k, v, out of attn1 and attn2)"}
    return out


def table_row(result: dict) -> str:
    ratio, med = result["ratio_of_medians_to_none"], result["median_s"]
    return (f"| CPU (1 thread, process CPU time), `faceid_overhead_cputime.py` | {result['resolution']} | "
            f"{result['steps']} | {med['none']:.2f} | IP {med['ip']:.2f} ({ratio['ip']:.3f}) | FaceID {med['faceid']:.2f} "
            f"({ratio['faceid']:.3f}) | FaceID, LoRA off {med['faceid_no_lora']:.2f} ({ratio['faceid_no_lora']:.3f}) |")


def build(model: Model, latent: int, steps: int, folder: Path, clock: Clock) -> Bench:
    # the encoder first: building it briefly holds two copies, better before the UNet is there
    encoder = mapped_encoder(model.encoder_config, folder, check_release=model.full_size)
    unet = build_tiny_unet(model.unet_config, seed=0)
    bound = bind_layout(unet)
    dim = model.unet_config["context_dim"]
    image = bench_image()
    face_pack(folder, image)
    faceid_path = faceid_file(bound, dim, model.lora_rank, folder, check_release=model.full_size)
    ip = plain_ip_adapter(bound, dim, model.encoder_config["projection_dim"], check_release=model.full_size)
    g = torch.Generator().manual_seed(99)
    cond, uncond = torch.randn(1, 77, dim, generator=g), torch.randn(1, 77, dim, generator=g)
    return Bench(unet, bound, faceid_path, folder, ip, encoder, image, cond, uncond,
                 SampleSpec(steps=steps, latent_size=latent), clock)


def main(argv: list[str] | None = None) -> int:
    args = generation_arguments(__doc__, smoke="tiny models, 4 steps: a wiring check",
                                latent="default 24 = 192x192, smoke 16", steps="default 20, smoke 4",
                                repeats="timed rounds (default 3, smoke 1)", out="faceid_overhead_cpu.json",
                                ).parse_args(argv)
    torch.set_num_threads(1)  # CPU time of one thread: what this process did, whatever the neighbours do
    clock: Clock = time.process_time
    model = SMOKE if args.smoke else FULL
    latent = args.latent or (16 if args.smoke else 24)
    steps = args.steps or (4 if args.smoke else 20)
    repeats = args.repeats or (1 if args.smoke else 3)
    with tempfile.TemporaryDirectory(prefix="faceid-bench-") as tmp:
        bench = build(model, latent, steps, Path(tmp), clock)
        faceid = bench.models.load_adapter(bench.faceid_path)
        lora_params = sum(r.down[p].numel() + r.up[p].numel() for r in faceid.lora.values() for p in LORA_PARTS)
        log(f"{model.label}: UNet {params(bench.unet) / 1e6:.1f}M, FaceID {params(faceid.model) / 1e6:.1f}M + LoRA "
            f"{lora_params / 1e6:.1f}M, IP {params(bench.ip.model) / 1e6:.1f}M, encoder "
            f"{params(bench.encoder.model) / 1e6:.1f}M parameters; {latent * LATENT_SCALE}x{latent * LATENT_SCALE}, "
            f"{steps} steps, {repeats} rounds, 1 thread")
        runs, change = measure_rounds(bench, repeats)
        log("timing the parts alone")
        parts = measure_parts(bench, max(3, repeats))
        result = {
            "benchmark": "faceid_overhead", "mode": "smoke" if args.smoke else "full",
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "environment": environment(torch.device("cpu")),
            "clock": "process CPU time (time.process_time), 1 torch thread, onnxruntime 1 intra-op thread",
            "model": {"label": model.label, "unet_params": params(bench.unet),
                      "faceid_params": params(faceid.model), "faceid_lora_params": lora_params,
                      "faceid_lora_rank": model.lora_rank, "ip_params": params(bench.ip.model),
                      "encoder_params": params(bench.encoder.model), "ip_sites": len(bench.bound.ip_sites())},
            "photo": f"{bench.image.shape[1]}x{bench.image.shape[0]} RGB (bench/face_analysis.py's image)",
            "resolution": f"{latent * LATENT_SCALE}x{latent * LATENT_SCALE}", "latent": latent, "steps": steps,
            "cfg_scale": bench.spec.cfg_scale, "repeats": repeats,
            "order": "warm-up of each, weight-0 checks, then rounds of " + ", ".join(CONFIGS) + ", then the parts",
            "mean_abs_change": {c: round(v, 6) for c, v in change.items()},
        }
        result.update(summarise(runs, steps))
        result["parts_alone"] = parts
    report(result, table_row(result), args.out or (None if args.smoke else RESULTS / "faceid_overhead_cpu.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
