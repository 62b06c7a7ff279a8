"""What reading a weight file leaves behind in the Python heap, per read: the probe that explains the
memory soak's growth before the model cache held every model (see bench/README.md, "Memory over
thousands of generations").

A file of ``--tensors`` small tensors is written once as ``.safetensors`` and as a pickled ``.bin``;
each way of reading it runs a few times to warm up, then ``--reads`` times under tracemalloc, with a
garbage collection before each snapshot, so what remains is memory nothing references any more.
Reported per read and per tensor: bytes and objects still allocated.

    OMP_NUM_THREADS=1 .venv/bin/python bench/read_retention.py --out bench/results/read_retention.json

Not a test: pytest never collects ``bench/``.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import safetensors  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load, load_file, save_file  # noqa: E402

from lib_adapters.formats.reader import read_state_dict  # noqa: E402


def retained(read, reads: int) -> tuple[float, float]:
    """Bytes and objects per call that survive a garbage collection."""
    for _ in range(5):
        read()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(reads):
        read()
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    diff = after.compare_to(before, "lineno")
    return sum(d.size_diff for d in diff) / reads, sum(d.count_diff for d in diff) / reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--reads", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "read_retention.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tensors = {f"k{i}": torch.randn(8, 8) for i in range(args.tensors)}
        st, pt = Path(tmp) / "w.safetensors", Path(tmp) / "w.bin"
        save_file(tensors, str(st))
        torch.save(tensors, pt)
        data = st.read_bytes()

        def get_each_tensor():
            with safe_open(str(st), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)

        ways = {
            "read_state_dict(.safetensors) (ours, through load_file)": lambda: read_state_dict(st),
            "safetensors.torch.load_file": lambda: load_file(str(st)),
            "safe_open + get_tensor per key": get_each_tensor,
            "safetensors.torch.load(bytes)": lambda: load(data),
            "read_state_dict(.bin) (torch.load, weights_only)": lambda: read_state_dict(pt),
        }
        rows = []
        for name, read in ways.items():
            size, count = retained(read, args.reads)
            rows.append({"way": name, "bytes_per_read": round(size, 1), "objects_per_read": round(count, 2),
                         "bytes_per_tensor": round(size / args.tensors, 2)})
            print(f"{name}: {size:.0f} B/read, {count:.1f} objects/read, {size / args.tensors:.1f} B/tensor", flush=True)
    result = {"tensors_per_file": args.tensors, "reads": args.reads, "rows": rows, "python": sys.version.split()[0],
              "torch": torch.__version__, "safetensors": safetensors.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
