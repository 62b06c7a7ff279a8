"""T2I-Adapter overhead measured in process CPU time with one torch thread.

On a shared 2-core machine wall-clock time of a multi-threaded run swings by a factor of six
(see t2i_overhead_cpu.json); CPU time of a single-threaded run counts only this process's work, so
the with/without ratio stays readable. Same models and sampler as bench/t2i_overhead.py: the genuine
ldm UNet in SD1.5's configuration and a full SD1.5 T2I-Adapter, random weights, 20 Euler steps with
CFG (cond and uncond rows in one call), alternating without/with runs.

    .venv/bin/python bench/t2i_overhead_cputime.py --latent 16 --steps 20 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, whatever the working directory
from common import ROOT, SD15_UNET  # noqa: E402

from lib_adapters.demo import SampleSpec, sample, synthetic_depth  # noqa: E402
from lib_adapters.formats.t2i import t2i_from_state_dict  # noqa: E402
from lib_adapters.inference.session import GenerationSession  # noqa: E402
from lib_adapters.inference.t2i import T2IUnitRuntime  # noqa: E402
from lib_adapters.inference.units import AdapterUnit  # noqa: E402
from lib_adapters.models.t2i_adapter import FullAdapter, SpatialAdapterConfig, T2IKind  # noqa: E402
from lib_adapters.unet.a1111 import A1111Binding  # noqa: E402
from lib_adapters.unet.layout import bind_layout  # noqa: E402

SD15_ADAPTER = SpatialAdapterConfig(kind=T2IKind.FULL, in_channels=192, channels=(320, 640, 1280, 1280),
                                    num_res_blocks=2, unshuffle=8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "t2i_overhead_cputime.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(**SD15_UNET).eval()
    adapter = t2i_from_state_dict(FullAdapter(SD15_ADAPTER).state_dict(), "sd15_full_adapter")
    spec = SampleSpec(steps=args.steps, latent_size=args.latent)
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    condition = synthetic_depth(args.latent * 8)

    def run(with_unit: bool) -> float:
        start = time.process_time()
        if with_unit:
            runtime = T2IUnitRuntime.from_unit("Adapter 1", AdapterUnit(enabled=True, model="a"), adapter, condition)
            session = GenerationSession(bind_layout(unet), [runtime])
            with A1111Binding(session):
                sample(unet, spec, cond, uncond, session)
            assert runtime.forward_count == 1
        else:
            sample(unet, spec, cond, uncond)
        return time.process_time() - start

    run(False), run(True)  # warm-up
    without, with_unit = [], []
    for _ in range(args.repeats):
        without.append(run(False))
        with_unit.append(run(True))
    ratio = statistics.median(with_unit) / statistics.median(without)
    result = {
        "benchmark": "t2i_overhead_cputime", "device": "cpu", "threads": 1, "torch": torch.__version__,
        "platform": platform.platform(), "resolution": f"{args.latent * 8}x{args.latent * 8}", "steps": args.steps,
        "repeats": args.repeats, "cpu_s": {"without": without, "with": with_unit},
        "median_cpu_s": {"without": statistics.median(without), "with": statistics.median(with_unit)},
        "ratio_of_medians": round(ratio, 4), "pair_ratios": [round(b / a, 4) for a, b in zip(without, with_unit)],
        "goal": 1.02, "pass": ratio <= 1.02,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
