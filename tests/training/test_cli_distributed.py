"""Data-parallel training: two CPU processes (gloo, started by torch's own launcher as ``torchrun`` does, with the
environment ``accelerate launch`` also sets) give the LoRA a single process gives with the same global batch."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import make_shapes_dataset

pytest.importorskip("diffusers")

from lib_adapters.training import cli  # noqa: E402
from lib_adapters.training.distributed import Shard  # noqa: E402
from lib_adapters.training.methods.lora_file import load_lora  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# lr 1e-3 so that Adam's first steps stay proportional to the gradients (equal gradients -> equal weights)
ARGS = ["--resolution", "64", "--steps", "3", "--lora-rank", "4", "--learning-rate", "1e-3", "--seed", "5",
        "--lora-targets", "attention+ff"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(text: str) -> list[float]:
    return [float(line.split()[3]) for line in text.splitlines() if line.startswith("step ")]


def test_rows_of_a_global_batch_are_split_deterministically():
    assert [Shard(r, 2).rows(4) for r in (0, 1)] == [slice(0, 2), slice(2, 4)]
    assert [Shard(r, 3).rows(4) for r in range(3)] == [slice(0, 1), slice(1, 2), slice(2, 4)]
    assert [Shard(r, 2).share(1) for r in (0, 1)] == [0.0, 1.0] and Shard().share(5) == 1.0
    assert Shard().rows(7) == slice(0, 7) and Shard().any(True, torch.device("cpu"))


def test_two_processes_train_the_lora_one_process_trains_on_the_same_global_batch(tmp_path):
    make_shapes_dataset(tmp_path / "ds", "2_shapes")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "lib_adapters.training", "--dataset", str(tmp_path / "ds"),
               "--output-dir", str(tmp_path / "two"), "--name", "ddp", "--batch-size", "4", *ARGS]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 processes" in proc.stdout and proc.stdout.count("step 3/3") == 1  # one process prints
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["ddp-checkpoints", "ddp.safetensors"]
    two = load_lora(tmp_path / "two" / "ddp.safetensors")[0]
    out = io.StringIO()
    # one thread, as each of the two processes ran: with another thread count the matmuls sum in another order, and
    # Adam turns such last-bit differences of near-zero gradients into whole steps (6 % of the scale with 2 threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main(["--dataset", str(tmp_path / "ds"), "--output-dir", str(tmp_path / "one"), "--name", "one",
                         "--batch-size", "4", "--device", "cpu", *ARGS], out=out)
    finally:
        torch.set_num_threads(threads)
    assert code == cli.EXIT_OK
    one = load_lora(tmp_path / "one" / "one.safetensors")[0]
    assert two.keys() == one.keys()
    up = [k for k in one if k.endswith("lora_up.weight")]  # zero at the start: all they hold was learned
    diff = max(float((two[k].float() - one[k].float()).abs().max()) for k in up)
    scale = max(float(one[k].float().abs().max()) for k in up)
    assert scale > 1e-3 and diff < 0.02 * scale, (diff, scale)
    assert _losses(proc.stdout) == pytest.approx(_losses(out.getvalue()), abs=2e-4) and len(_losses(proc.stdout)) == 3
