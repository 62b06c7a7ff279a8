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
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, environment, load_avg, log, params, write_json  # noqa: E402
from bench.train_common import (alternate, autocast_for, build_models, dataset_images, make_dataset,  # noqa: E402
                                memory_cpu, peak_mb, read_pixels, report_memory, summarize, token_ids)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


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
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        self.unet, self.vae, self.text = models
        self.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                         target_modules=TARGETS))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-2)
        self.scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        files = dataset_images(dataset)
        self.pixels = read_pixels(files, device)
        self.ids = token_ids([f.with_suffix(".txt").read_text() for f in files], device)
        self.batch, self.index, self.device = args.batch, 0, device
        self.autocast = autocast_for(device, args.precision)

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


def measure_memory_child(args, device) -> None:
    """``--side``: one side alone in this process (see ``train_common.report_memory``)."""
    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp) / "ds", args.images, args.resolution)
        models = build_models(args.width, args.resolution, device)
        report_memory(build_side(args.side, args, models, dataset, Path(tmp) / "out", device), args.memory_steps)


def time_both(args, device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp) / "ds", args.images, args.resolution)
        base = build_models(args.width, args.resolution, device)
        sides = {"ours": build_side("ours", args, [copy.deepcopy(m) for m in base], dataset, Path(tmp) / "out", device),
                 "plain": build_side("plain", args, [copy.deepcopy(m) for m in base], dataset, None, device)}
        timing = alternate(sides, args.pairs, device)
        return {**timing, "unet_params": params(base[0]), "trainable_params": sides["ours"].trainable}


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
    memory = None if cuda else memory_cpu(__file__, sys.argv[1:])
    result = {"benchmark": "train_lora_step", "environment": environment(device), "load_avg": [load_before, load_avg()],
              "settings": {k: v for k, v in vars(args).items() if k not in ("side", "out")},
              "unet_params": timing["unet_params"], "trainable_params": timing["trainable_params"],
              **summarize(timing, memory)}
    med = result["median_s"]
    out = args.out or RESULTS / f"train_lora_step_{device.type}.json"
    write_json(result, out)
    log(f"wrote {out}")
    mem = peak_mb(result)
    headline = result["cpu_time_ratio_of_medians"] if not cuda else result["time_ratio_of_medians"]
    print(f"| {device.type} | {timing['unet_params'] / 1e6:.0f}M UNet, {args.resolution}px, batch {args.batch}, rank "
          f"{args.rank}, {args.precision}, {args.threads} thread(s) | {med['ours']:.2f} / {med['plain']:.2f} | "
          f"{result['time_ratio_of_medians']} | {result['cpu_time_ratio_of_medians']} | "
          f"{mem['ours']:.0f} / {mem['plain']:.0f} | {result['memory_ratio']} |")
    return 0 if headline <= 1.0 and result["memory_ratio"] <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
