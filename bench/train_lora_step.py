"""LoRA training: our loop's optimizer step against a plain diffusers LoRA loop, same model, data and batch.

Question: is a training step of ``lib_adapters.training`` (the CLI's and the tab's core, over a
``DiffusersBackend``) slower or hungrier than the loop of diffusers' ``train_text_to_image_lora.py``?
Goal: time ratio (ours / plain) <= 1.0 and peak memory ratio <= 1.0 (within the noise, see README).

Both sides, per step: VAE-encode the batch's pixels, encode the captions, noise at uniform timesteps,
UNet forward/backward with rank-``r`` LoRA on attn1/attn2 to_q/to_k/to_v/to_out.0 (the example's
``target_modules``), MSE on eps, clip the gradient norm at 1, AdamW (weight decay 1e-2), zero grads.
Ours: ``Trainer._optimizer_step`` (PNG decode and bucket crop from disk included, as in a real run).
Plain: peft LoRA through ``unet.add_adapter`` (diffusers' PEFT integration), pixels decoded once
beforehand and token ids tokenized once, as the example's dataset map does.

Time: one process, both sides built over identical weights (separate copies), one warm-up step each,
then alternated ABAB for ``--pairs`` pairs; wall clock and process CPU time per step (on the CPU with one
torch thread by default: CPU time then measures the work, not the neighbours' load on a shared machine). Memory: CPU, a child process per side (``--side``) reports
its RSS after loading and its peak RSS during the steps (VmHWM reset after loading); CUDA,
``max_memory_allocated`` per side.
Not a test: pytest never collects bench/. Needs ``peft`` (bench-only: ``pip install peft==0.10.0
accelerate==0.27.2`` keeps the pinned packages).
"""
from __future__ import annotations

import argparse
import copy
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, check, device_sync, environment, load_avg, log, params, rounded, write_json  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_models(args, device: torch.device):
    """A small SD1-structured UNet (context 768), a small VAE and a 4-layer CLIP-L-width text encoder, seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    w = args.width
    unet = UNet2DConditionModel(sample_size=args.resolution // 8, block_out_channels=(w, 2 * w, 4 * w, 4 * w),
                                layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4, sample_size=256)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=768, intermediate_size=3072, num_hidden_layers=4,
                                        num_attention_heads=12, max_position_embeddings=77, bos_token_id=998,
                                        eos_token_id=999, pad_token_id=999))
    return [m.to(device).eval().requires_grad_(False) for m in (unet, vae, text)]


def make_dataset(root: Path, count: int, size: int) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    folder = root / "1_bench"
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = (torch.rand(3, size // 16, size // 16, generator=g) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of pattern number {i}, bench")
    return root


class Ours:
    def __init__(self, args, models, dataset: Path, out: Path, device):
        from lib_adapters.tiny import scaled_linear_alphas_cumprod
        from lib_adapters.tiny_diffusers import WordHashTokenizer
        from lib_adapters.training.backends.diffusers import DiffusersBackend
        from lib_adapters.training.config import LoraConfig, TrainConfig
        from lib_adapters.training.loop import Trainer

        unet, vae, text = models
        backend = DiffusersBackend(unet, vae, [text], [WordHashTokenizer()], scaled_linear_alphas_cumprod())
        config = TrainConfig(dataset, out, "bench", resolution=args.resolution, steps=100_000, batch_size=args.batch,
                             learning_rate=1e-4, precision=args.precision, buckets=False,
                             lora=LoraConfig(rank=args.rank, alpha=float(args.rank)))
        self.trainer = Trainer(config, backend)
        self.trainer._setup(None)  # what run() does before its first step
        self.trainable = sum(p.numel() for p in self.trainer.params)

    def step(self) -> float:
        return self.trainer._optimizer_step()


class Plain:
    """What diffusers' train_text_to_image_lora.py does per step (accelerate and logging left out)."""

    def __init__(self, args, models, dataset: Path, device):
        import numpy as np
        from diffusers import DDPMScheduler
        from peft import LoraConfig
        from PIL import Image

        from lib_adapters.tiny_diffusers import WordHashTokenizer

        self.unet, self.vae, self.text = models
        self.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                         target_modules=TARGETS))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-2)
        self.scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        files = sorted((dataset / "1_bench").glob("*.png"))
        pixels = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]
        self.pixels = torch.stack(pixels).float().div(127.5).sub(1).to(device)
        tok = WordHashTokenizer()
        self.ids = tok([f.with_suffix(".txt").read_text() for f in files], padding="max_length", max_length=77,
                       truncation=True, return_tensors="pt")["input_ids"].to(device)
        self.batch, self.index, self.device = args.batch, 0, device
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        self.autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def step(self) -> float:
        rows = [(self.index + i) % len(self.ids) for i in range(self.batch)]
        self.index += self.batch
        with torch.no_grad():
            latents = self.vae.encode(self.pixels[rows]).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (len(rows),), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        with self.autocast:
            with torch.no_grad():
                hidden = self.text(self.ids[rows])[0]
            pred = self.unet(noisy, t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def build_side(name: str, args, models, dataset: Path, out: Path, device):
    return Ours(args, models, dataset, out, device) if name == "ours" else Plain(args, models, dataset, device)


def status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS, so imports and model building do not count."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_memory_child(args, device) -> None:
    """``--side``: one side alone in this process; prints its RSS after loading and its peak RSS during
    ``--memory-steps`` steps (the peak is reset after loading)."""
    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp) / "ds", args.images, args.resolution)
        models = build_models(args, device)
        side = build_side(args.side, args, models, dataset, Path(tmp) / "out", device)
        loaded = status_mb("VmRSS")
        reset_peak()
        losses = [side.step() for _ in range(args.memory_steps)]
        check(all(v == v for v in losses), "non-finite loss")
        print(f"MEMORY {loaded:.1f} {status_mb('VmHWM'):.1f}", flush=True)


def memory_cpu(args) -> dict:
    result = {}
    for name in ("ours", "plain"):
        argv = [sys.executable, __file__, "--side", name, *sys.argv[1:]]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")), None)
        check(line is not None, f"memory child for {name} failed: {proc.stderr[-2000:]}")
        loaded, peak = map(float, line.split()[1:])
        result[name] = {"rss_after_load_mb": loaded, "peak_rss_during_steps_mb": peak,
                        "step_peak_above_load_mb": round(peak - loaded, 1)}
    return result


def time_both(args, device) -> dict:
    sync = device_sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp) / "ds", args.images, args.resolution)
        base = build_models(args, device)
        sides = {"ours": build_side("ours", args, [copy.deepcopy(m) for m in base], dataset, Path(tmp) / "out", device),
                 "plain": build_side("plain", args, [copy.deepcopy(m) for m in base], dataset, None, device)}
        check(sides["ours"].trainable == sides["plain"].trainable,
              f"trainable parameter counts differ: {sides['ours'].trainable} vs {sides['plain'].trainable}")
        times, cpu = {"ours": [], "plain": []}, {"ours": [], "plain": []}
        peaks = {"ours": 0, "plain": 0}
        for i in range(args.pairs + 1):  # pair 0 is the warm-up
            for name in ("ours", "plain") if i % 2 == 0 else ("plain", "ours"):
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
            log(f"pair {i}: ours {times['ours'][-1] if i else 0:.3f}s plain {times['plain'][-1] if i else 0:.3f}s")
        return {"unet_params": params(base[0]), "trainable_params": sides["ours"].trainable, "times": times, "cpu": cpu,
                "cuda_peak_bytes": peaks if device.type == "cuda" else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=None, help="UNet base channels (SD1.5: 320); default 128 on CPU")
    parser.add_argument("--resolution", type=int, default=None, help="default 192 on CPU, 512 on CUDA")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--precision", default=None, help="fp32 (CPU default) or bf16 (CUDA default)")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default 1 on CPU, so that process "
                        "CPU time measures the work and not a neighbour's load")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--side", choices=["ours", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.width = args.width or (320 if cuda else 128)
    args.resolution = args.resolution or (512 if cuda else 192)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.threads = args.threads or (torch.get_num_threads() if cuda else 1)
    torch.set_num_threads(args.threads)
    if args.side:
        measure_memory_child(args, device)
        return 0
    log(f"timing on {device}: width {args.width}, {args.resolution}px, batch {args.batch}, rank {args.rank}")
    load_before = load_avg()
    timing = time_both(args, device)
    memory = None if cuda else memory_cpu(args)
    med = {k: statistics.median(v) for k, v in timing["times"].items()}
    ratios = [a / b for a, b in zip(timing["times"]["ours"], timing["times"]["plain"])]
    result = {"benchmark": "train_lora_step", "environment": environment(device), "load_avg": [load_before, load_avg()],
              "settings": {k: v for k, v in vars(args).items() if k not in ("side", "out")},
              "unet_params": timing["unet_params"], "trainable_params": timing["trainable_params"],
              "times_s": {k: rounded(v) for k, v in timing["times"].items()},
              "median_s": {k: round(v, 4) for k, v in med.items()}, "time_ratio_of_medians": round(med["ours"] / med["plain"], 3),
              "median_pair_ratio": round(statistics.median(ratios), 3),
              "cpu_times_s": {k: rounded(v) for k, v in timing["cpu"].items()},
              "cpu_median_s": {k: round(statistics.median(v), 4) for k, v in timing["cpu"].items()},
              "cpu_time_ratio_of_medians": round(statistics.median(timing["cpu"]["ours"])
                                                 / statistics.median(timing["cpu"]["plain"]), 3)}
    if cuda:
        peaks = timing["cuda_peak_bytes"]
        result["cuda_peak_mb"] = {k: round(v / 2**20, 1) for k, v in peaks.items()}
        result["memory_ratio"] = round(peaks["ours"] / peaks["plain"], 3)
    else:
        result["cpu_memory"] = memory
        result["memory_ratio"] = round(memory["ours"]["peak_rss_during_steps_mb"] / memory["plain"]["peak_rss_during_steps_mb"], 3)
    out = args.out or RESULTS / f"train_lora_step_{device.type}.json"
    write_json(result, out)
    log(f"wrote {out}")
    mem = result.get("cuda_peak_mb") or {k: v["peak_rss_during_steps_mb"] for k, v in memory.items()}
    headline = result["cpu_time_ratio_of_medians"] if not cuda else result["time_ratio_of_medians"]
    print(f"| {device.type} | {timing['unet_params'] / 1e6:.0f}M UNet, {args.resolution}px, batch {args.batch}, rank "
          f"{args.rank}, {args.precision}, {args.threads} thread(s) | {med['ours']:.2f} / {med['plain']:.2f} | "
          f"{result['time_ratio_of_medians']} | {result['cpu_time_ratio_of_medians']} | "
          f"{mem['ours']:.0f} / {mem['plain']:.0f} | {result['memory_ratio']} |")
    return 0 if headline <= 1.0 and result["memory_ratio"] <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
