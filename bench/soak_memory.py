"""Memory soak: thousands of generations through the Adapters script on the stub WebUI host, with RSS,
live tensors and tracemalloc snapshots taken along the way, to find where the process grows.

Each generation runs the tiny SD1 model (64x64, 4 steps) with a T2I unit and an IP unit (the
units' images change every generation, as users' do). After a warm-up, RSS and the count and bytes of
live torch tensors are sampled every ``--every`` generations; tracemalloc compares the Python
allocations at the end with those right after the warm-up and lists the sites that grew most.
A growing RSS with flat live tensors and flat Python allocations points below Python (the C
allocator's arenas), which the JSON records by also sampling ``mallinfo2`` where glibc has it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/soak_memory.py --generations 3000 --out bench/results/soak_memory.json

Not a test: pytest never collects ``bench/``.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests" / "stubs", ROOT / "tests"):
    sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def malloc_in_use() -> int | None:
    """Bytes glibc's allocator has handed out (mallinfo2.uordblks + hblkhd), or None off glibc."""
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def live_tensors() -> tuple[int, int]:
    count = size = 0
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj):
                count += 1
                size += obj.element_size() * obj.nelement()
        except Exception:  # noqa: BLE001  (objects that fail isinstance checks)
            continue
    return count, size


def setup(root: Path):
    from fixtures.adapters import diffusers_adapter, save_both_layouts
    from fixtures.clip import save_clip_vision, tiny_clip_vision
    from fixtures.ip import random_ip_state_dict
    from lib_adapters.unet.layout import bind_layout
    from modules import paths
    import driver
    from test_panel_e2e import _load_script_module

    driver.reset_webui(root)
    module = _load_script_module()
    import lib_adapters.webui.panel as panel
    panel._resources = None
    model = driver.load_tiny_model("sd1")
    models = Path(paths.models_path)
    (models / "adapters").mkdir(parents=True, exist_ok=True)
    torch.save(random_ip_state_dict(bind_layout(model.model.diffusion_model), "plus", 32, seed=11),
               models / "adapters" / "ip-plus.bin")
    save_both_layouts(diffusers_adapter("full_adapter", 3, seed=4), models / "adapters", "depth")
    save_clip_vision(tiny_clip_vision(), models / "clip_vision")
    driver.build_runners([module.AdaptersScript])
    return driver


def generate(driver, index: int) -> None:
    rng = np.random.default_rng(index)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    units = [{"enabled": True, "model": "depth", "image": image},
             {"enabled": True, "model": "ip-plus", "image": image, "weight": 1.0}]
    processed = driver.txt2img(seed=index, alwayson_scripts={"Adapters": units})
    assert "Adapter 2" in processed.infotexts[0] and "skipped" not in processed.infotexts[0], processed.infotexts[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--frames", type=int, default=12, help="traceback depth tracemalloc keeps")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak_memory.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        driver = setup(Path(tmp))
        for i in range(args.warmup):
            generate(driver, i)
        gc.collect()
        tracemalloc.start(args.frames)
        first = tracemalloc.take_snapshot()
        samples = []
        started = time.perf_counter()
        for i in range(args.generations + 1):
            if i % args.every == 0:
                gc.collect()
                tensors, tensor_bytes = live_tensors()
                traced, _ = tracemalloc.get_traced_memory()
                samples.append({"generation": i, "rss_kib": rss_kib(), "malloc_in_use": malloc_in_use(),
                                "tracemalloc_bytes": traced, "live_tensors": tensors, "live_tensor_bytes": tensor_bytes})
                print(json.dumps(samples[-1]), flush=True)
            if i < args.generations:
                generate(driver, args.warmup + i)
        gc.collect()
        last = tracemalloc.take_snapshot()
    grown = [stat for stat in last.compare_to(first, "traceback") if stat.size_diff > 0][: args.top]
    top = [{"size_diff": s.size_diff, "count_diff": s.count_diff,
            "where": [f"{frame.filename}:{frame.lineno}" for frame in s.traceback][-6:]} for s in grown]
    n = samples[-1]["generation"] - samples[0]["generation"]
    per_gen = {key: (samples[-1][key] - samples[0][key]) / n for key in
               ("rss_kib", "tracemalloc_bytes", "live_tensors", "live_tensor_bytes")}
    if samples[0]["malloc_in_use"] is not None:
        per_gen["malloc_in_use"] = (samples[-1]["malloc_in_use"] - samples[0]["malloc_in_use"]) / n
    result = {"generations": args.generations, "warmup": args.warmup, "seconds": time.perf_counter() - started,
              "per_generation": per_gen, "samples": samples, "tracemalloc_top_growth": top,
              "python": sys.version.split()[0], "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"per_generation": per_gen, "top": top[:5]}, indent=1))


if __name__ == "__main__":
    main()
