"""T2I-Adapter and IP-Adapter training: our loop's optimizer step against the reference loops, same model and batch.

Question: is a training step of ``lib_adapters.training`` (the CLI's and the tab's core, over a
``DiffusersBackend``) slower or hungrier than the loop people train these adapters with?
Goal: ours / plain <= 1.0 in step time and in peak memory (within the noise, see README).

Methods (``--method``, default all three), each on the same ``UNet2DConditionModel`` (SD1.x layout,
context 768), VAE, text encoder, images and batch; both sides train the same number of parameters
(checked) with AdamW (weight decay 1e-2) in fp32:

* ``t2i``: a full T2I-Adapter at the UNet's widths. Plain is the loop of diffusers'
  ``examples/t2i_adapter/train_t2i_adapter_sdxl.py`` on an SD1 UNet: VAE-encode, cubic timesteps
  (``t = (1 - u^3) T``), noise, diffusers' ``T2IAdapter(condition)`` ->
  ``down_intrablock_additional_residuals`` of the UNet, MSE on eps, clip at 1, step. Ours: the
  ``t2i_adapter`` method with cubic timesteps (its features reach the UNet through the same argument).
* ``ip`` / ``ip_plus``: an IP-Adapter (linear projection, 4 tokens) / IP-Adapter Plus (Resampler at
  the context width, depth 4, 16 tokens). Plain is the loop of tencent-ailab's ``tutorial_train.py`` /
  ``tutorial_train_plus.py``: CLIP image encoder (no grad), the reference's 5/5/5 % dropout, text
  encoder, ``image_proj(embeds)`` concatenated after the text tokens, diffusers'
  ``IPAdapterAttnProcessor2_0`` (``to_k_ip``/``to_v_ip``) at every attn2 with diffusers'
  ``ImageProjection`` / ``IPAdapterPlusImageProjection``, MSE on eps, step (no clipping, as there).
  Ours: the ``ip_adapter`` method (the panel's attn2 wrapper), clipping off and the CLIP feature cache
  off, so both sides run the image encoder every step. The CLIP vision encoder is a one-layer
  ViT of ViT-H/14's width at 224 px (257 tokens, projection 1024), the same weights on both sides.

Both sides start from the same adapter weights (the reference modules are loaded from ours: our
TencentARC keys through ``tencentarc_to_diffusers``, our IP projection through diffusers' own
``_convert_ip_adapter_image_proj_to_diffusers``), and before timing one UNet forward with the adapter
is checked to give the same prediction on both sides.

Data: ours reads and crops PNGs (and for IP preprocesses the CLIP input) every step, as a real run
does; plain decodes images and conditions, preprocesses CLIP inputs and tokenizes captions once
beforehand, as the examples' dataset ``map``/transforms do. Both encode captions every step (the
T2I example precomputes prompt embeddings; the text encoder's forward is timed alone and reported).

Time, memory and the CUDA path are ``train_common``'s (as ``train_lora_step.py``): one process,
warm-up pair, alternating pairs, one torch thread on CPU, process CPU time; peak RSS of each side
alone in a child process; ``max_memory_allocated`` on CUDA. ``--smoke`` checks the wiring in seconds
at toy sizes. Not a test: pytest never collects bench/.
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, check, environment, load_avg, log, params, write_json  # noqa: E402
from bench.train_common import (alternate, autocast_for, build_models, dataset_images, make_dataset,  # noqa: E402
                                memory_cpu, peak_mb, read_pixels, report_memory, summarize, token_ids)

METHODS = ("t2i", "ip", "ip_plus")
CONDITION = "depth"
DROP = 0.05  # the IP-Adapter tutorial's image / text / both dropout rates


# --- shared setup --------------------------------------------------------------------------------------
def clip_vision(args) -> torch.nn.Module:
    """The CLIP vision encoder: ViT-H/14's width (1280, 16 heads, MLP 5120, projection 1024), ``--clip-layers``
    layers, ``--clip-image`` px at patch 14; seeded. (ViT-H has 32 layers: its cost is the same on both sides.)"""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(2)
    config = CLIPVisionConfig(hidden_size=args.clip_width, intermediate_size=4 * args.clip_width, projection_dim=1024,
                              num_hidden_layers=args.clip_layers, num_attention_heads=args.clip_width // 80,
                              image_size=args.clip_image, patch_size=14, hidden_act="gelu")
    return CLIPVisionModelWithProjection(config).eval().requires_grad_(False)


def save_encoder(model: torch.nn.Module, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "clip_vision_bench.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


class Setup:
    """What both sides of one method get: dataset, base models, encoder file, the run's settings.

    ``shared``: both sides in this process, each with its own copies; else (a memory child) the one side
    takes the originals, so that no freed copy stays in the process's RSS."""

    def __init__(self, args, method: str, root: Path, device: torch.device, shared: bool = True):
        self.args, self.method, self.device, self.shared = args, method, device, shared
        self.dataset = make_dataset(root / "ds", args.images, args.resolution, CONDITION if method == "t2i" else None)
        self.out = root / "out"
        self.models = build_models(args.width, args.resolution, device)
        self.encoder = clip_vision(args) if method != "t2i" else None
        self.encoder_file = save_encoder(self.encoder, root / "clip") if self.encoder is not None else None

    def copies(self) -> list[torch.nn.Module]:
        return [copy.deepcopy(m) for m in self.models] if self.shared else self.models

    def plain_encoder(self) -> torch.nn.Module:
        return copy.deepcopy(self.encoder) if self.shared else self.encoder


# --- ours ----------------------------------------------------------------------------------------------
class Ours:
    """``Trainer._optimizer_step`` of a real run's configuration (after the setup ``run()`` does first)."""

    def __init__(self, setup: Setup):
        from lib_adapters.tiny import scaled_linear_alphas_cumprod
        from lib_adapters.tiny_diffusers import WordHashTokenizer
        from lib_adapters.training.backends.diffusers import DiffusersBackend
        from lib_adapters.training.config import IPAdapterConfig, T2IConfig, TrainConfig
        from lib_adapters.training.loop import Trainer

        args = setup.args
        unet, vae, text = setup.copies()
        self.backend = DiffusersBackend(unet, vae, [text], [WordHashTokenizer()], scaled_linear_alphas_cumprod())
        common = dict(resolution=args.resolution, steps=100_000, batch_size=args.batch, learning_rate=1e-5,
                      precision=args.precision, buckets=False)
        if setup.method == "t2i":
            config = TrainConfig(setup.dataset, setup.out, "bench", method="t2i_adapter", **common,
                                 t2i=T2IConfig(condition=CONDITION, condition_channels=3, timesteps="cubic"))
        else:
            ip = IPAdapterConfig(projection="plus" if setup.method == "ip_plus" else "plain",
                                 image_encoder=setup.encoder_file, cache_features=False,
                                 image_drop=DROP, text_drop=DROP, both_drop=DROP)
            config = TrainConfig(setup.dataset, setup.out, "bench", method="ip_adapter", max_grad_norm=None,
                                 **common, ip=ip)
        self.trainer = Trainer(config, self.backend)
        self.trainer._setup(None)  # what run() does before its first step
        self.method = self.trainer.method
        self.trainable = sum(p.numel() for p in self.trainer.params)

    def step(self) -> float:
        return self.trainer._optimizer_step()


# --- the reference loops -------------------------------------------------------------------------------
class PlainBase:
    """Data prepared once as the examples' datasets do; frozen models; the shared noising."""

    def __init__(self, setup: Setup):
        from diffusers import DDPMScheduler

        self.unet, self.vae, self.text = setup.copies()
        files = dataset_images(setup.dataset)
        self.files, self.device = files, setup.device
        self.pixels = read_pixels(files, setup.device)
        self.ids = token_ids([f.with_suffix(".txt").read_text() for f in files], setup.device)
        self.empty_ids = token_ids([""], setup.device)[0]
        self.scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        self.batch, self.index = setup.args.batch, 0
        self.autocast = autocast_for(setup.device, setup.args.precision)
        self.foreach = True if setup.args.plain_foreach else None

    def rows(self) -> list[int]:
        rows = [(self.index + i) % len(self.files) for i in range(self.batch)]
        self.index += self.batch
        return rows

    def latents(self, rows: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode(self.pixels[rows]).latent_dist.sample() * self.vae.config.scaling_factor

    def optimizer(self, modules: list[torch.nn.Module]) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.trainable = sum(p.numel() for p in self.params)
        # torch's default (None): the for-loop implementation on the CPU, foreach on CUDA; ``--plain-foreach``
        # gives the reference the foreach implementation ours asks for, to tell that choice's cost apart
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, weight_decay=1e-2, foreach=self.foreach)


class PlainT2I(PlainBase):
    """diffusers ``train_t2i_adapter_sdxl.py``'s step on an SD1 UNet (accelerate, logging, EMA-free as there)."""

    def __init__(self, setup: Setup, ours: Ours | None):
        from diffusers import T2IAdapter

        from lib_adapters.formats.t2i import tencentarc_to_diffusers

        super().__init__(setup)
        w = setup.args.width
        torch.manual_seed(3)
        self.adapter = T2IAdapter(in_channels=3, channels=[w, 2 * w, 4 * w, 4 * w], num_res_blocks=2,
                                  downscale_factor=8, adapter_type="full_adapter").to(setup.device)
        if ours is not None:  # the same starting weights as ours
            state = tencentarc_to_diffusers(ours.method.adapter.state_dict(), ours.method.adapter_config)
            self.adapter.load_state_dict(state, strict=True)
        self.adapter.train().requires_grad_(True)
        self.optimizer([self.adapter])
        conditions = [f.with_name(f"{f.stem}.{CONDITION}.png") for f in self.files]
        self.conditions = read_pixels(conditions, setup.device).add(1).div(2)  # [0, 1], as the example's transform

    def features(self, condition: torch.Tensor) -> list[torch.Tensor]:
        return self.adapter(condition)

    def step(self) -> float:
        rows = self.rows()
        latents = self.latents(rows)
        noise = torch.randn_like(latents)
        u = torch.rand(len(rows), device=self.device)  # the example's cubic sampling
        t = ((1 - u**3) * 1000).long().clamp(0, 999)
        noisy = self.scheduler.add_noise(latents, noise, t)
        with self.autocast:
            with torch.no_grad():
                hidden = self.text(self.ids[rows])[0]
            residuals = self.features(self.conditions[rows])
            pred = self.unet(noisy, t, hidden, down_intrablock_additional_residuals=residuals).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def ip_processors(unet: torch.nn.Module, num_tokens: int) -> dict:
    """tutorial_train.py's processor setup, with diffusers' own IP-Adapter processor class: attn2 sites get
    ``to_k_ip``/``to_v_ip`` initialised from the site's ``to_k``/``to_v``."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    widths = list(unet.config.block_out_channels)
    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = AttnProcessor2_0()
            continue
        if name.startswith("mid_block"):
            hidden = widths[-1]
        elif name.startswith("up_blocks"):
            hidden = widths[::-1][int(name[len("up_blocks.")])]
        else:
            hidden = widths[int(name[len("down_blocks.")])]
        proc = IPAdapterAttnProcessor2_0(hidden, unet.config.cross_attention_dim, num_tokens=num_tokens)
        attn = unet.get_submodule(name[: -len(".processor")])
        with torch.no_grad():
            proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
            proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
        procs[name] = proc
    return procs


def ip_state_for_processors(state: dict) -> dict:
    """``ip_adapter.{2k+1}.to_k_ip.weight`` -> ``{k}.to_k_ip.0.weight`` (diffusers keeps one per IP-Adapter)."""
    out = {}
    for key, value in state.items():
        if key.startswith("ip_adapter."):
            number, rest = key[len("ip_adapter."):].split(".", 1)
            out[f"{(int(number) - 1) // 2}.{rest.replace('.weight', '.0.weight')}"] = value
    return out


class PlainIP(PlainBase):
    """tencent-ailab ``tutorial_train.py`` / ``tutorial_train_plus.py``'s step (accelerate and logging left out)."""

    def __init__(self, setup: Setup, ours: Ours | None):
        from PIL import Image
        from transformers import CLIPImageProcessor

        super().__init__(setup)
        self.plus = setup.method == "ip_plus"
        self.encoder = setup.plain_encoder().to(setup.device)
        size = setup.args.clip_image
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.clip_pixels = processor([Image.open(f).convert("RGB") for f in self.files],
                                     return_tensors="pt").pixel_values.to(setup.device)
        torch.manual_seed(3)
        self.image_proj = self.projection(self.encoder.config).to(setup.device)
        tokens = 16 if self.plus else 4
        # The tutorial: attn2 gets an IP processor whose to_k_ip/to_v_ip start as copies of to_k/to_v.
        self.unet.set_attn_processor(ip_processors(self.unet, tokens))
        # The tutorial's concatenated tokens are the processor's deprecated input form: say so once, not per run.
        warnings.filterwarnings("ignore", message="You have passed a tensor as `encoder_hidden_states`")
        # The tutorial's ModuleList holds every processor (attn1's too: its own are modules); diffusers' attn1
        # processor is no module, so the list holds attn2's only: the k-th is the file's ``ip_adapter.{2k+1}``.
        self.adapter_modules = torch.nn.ModuleList(
            p for name, p in self.unet.attn_processors.items() if name.endswith("attn2.processor")).to(setup.device)
        if ours is not None:
            self.load_from(ours)
        self.image_proj.train().requires_grad_(True)
        self.adapter_modules.requires_grad_(True)
        self.optimizer([self.image_proj, self.adapter_modules])

    def projection(self, clip) -> torch.nn.Module:
        """diffusers' own projection classes at the tutorials' shapes (SD1.x: context 768)."""
        from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

        context = self.unet.config.cross_attention_dim
        if self.plus:
            return IPAdapterPlusImageProjection(embed_dims=clip.hidden_size, output_dims=context, hidden_dims=context,
                                                depth=4, dim_head=64, heads=context // 64, num_queries=16, ffn_ratio=4)
        return ImageProjection(image_embed_dim=clip.projection_dim, cross_attention_dim=context,
                               num_image_text_embeds=4)

    def load_from(self, ours: Ours) -> None:
        """Ours' starting weights, in the reference's file layout: the projection converted by diffusers' own
        loader code, the processors' ``to_k_ip``/``to_v_ip`` by key."""
        state = ours.method.model.state_dict()
        proj_state = {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}
        converted = self.unet._convert_ip_adapter_image_proj_to_diffusers(proj_state)
        self.image_proj.load_state_dict(converted.state_dict(), strict=True)
        self.adapter_modules.load_state_dict(ip_state_for_processors(state), strict=True)

    def embeds(self, clip_pixels: torch.Tensor, drop_image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.plus:  # the plus tutorial zeroes the dropped images' pixels, then takes hidden_states[-2]
                clip_pixels = torch.where(drop_image.view(-1, 1, 1, 1), torch.zeros_like(clip_pixels), clip_pixels)
                return self.encoder(clip_pixels, output_hidden_states=True).hidden_states[-2]
            embeds = self.encoder(clip_pixels).image_embeds
            return torch.where(drop_image.view(-1, 1), torch.zeros_like(embeds), embeds)

    def predict(self, noisy, t, hidden, embeds) -> torch.Tensor:
        """The tutorial's ``IPAdapter.forward``: image tokens after the text tokens, then the UNet."""
        ip_tokens = self.image_proj(embeds)
        return self.unet(noisy, t, torch.cat([hidden, ip_tokens], dim=1)).sample

    def step(self) -> float:
        rows = self.rows()
        latents = self.latents(rows)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (len(rows),), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        u = torch.rand(len(rows), device=self.device)  # the dataset's draw: image, text, both, neither
        drop_image = (u < DROP) | ((u >= 2 * DROP) & (u < 3 * DROP))
        drop_text = (u >= DROP) & (u < 3 * DROP)
        ids = torch.where(drop_text.view(-1, 1), self.empty_ids.expand(len(rows), -1), self.ids[rows])
        with self.autocast:
            embeds = self.embeds(self.clip_pixels[rows], drop_image)
            with torch.no_grad():
                hidden = self.text(ids)[0]
            pred = self.predict(noisy, t, hidden, embeds)
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return float(loss.detach())


def build_sides(setup: Setup, only: str | None = None) -> dict:
    """Both sides, the reference starting from ours' weights; ``only``: one side alone (a memory child)."""
    plain_class = PlainT2I if setup.method == "t2i" else PlainIP
    if only == "plain":
        return {"plain": plain_class(setup, None)}
    ours = Ours(setup)
    if only == "ours":
        return {"ours": ours}
    return {"ours": ours, "plain": plain_class(setup, ours)}


# --- checks and extra timings --------------------------------------------------------------------------
def probe_inputs(setup: Setup, plain: PlainBase):
    g = torch.Generator().manual_seed(7)
    s = setup.args.resolution // 8
    x = torch.randn(setup.args.batch, 4, s, s, generator=g).to(setup.device)
    t = torch.tensor([100, 800][: setup.args.batch] + [500] * max(0, setup.args.batch - 2), device=setup.device)
    return x, t, plain.ids[: setup.args.batch]


def check_same_prediction(setup: Setup, ours: Ours, plain: PlainBase) -> float:
    """One UNet forward with the adapter on each side, same inputs and weights: the two loops must compute the
    same function (else a ratio would compare different work). Returns the largest difference."""
    from lib_adapters.training.methods.t2i_adapter import inject_features

    x, t, ids = probe_inputs(setup, plain)
    with torch.no_grad():
        hidden = plain.text(ids)[0]
        if setup.method == "t2i":
            condition = plain.conditions[: len(ids)]
            with inject_features(ours.backend.unet, ours.method.adapter(condition)):
                a = ours.backend.apply(x, t, hidden)
            b = plain.unet(x, t, hidden, down_intrablock_additional_residuals=plain.features(condition)).sample
        else:
            embeds = plain.embeds(plain.clip_pixels[: len(ids)], torch.zeros(len(ids), dtype=torch.bool))
            with ours.method.tokens_active(ours.method.image_tokens(embeds)):
                a = ours.backend.apply(x, t, hidden)
            b = plain.predict(x, t, hidden, embeds)
    diff = float((a - b).abs().max())
    check(torch.allclose(a, b, atol=1e-4, rtol=1e-4), f"{setup.method}: ours and plain predict differently ({diff})")
    return diff


def text_encoder_seconds(setup: Setup, plain: PlainBase) -> float:
    """CPU time of one text-encoder forward of a batch (min of 3): what precomputed prompt embeddings save."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            start = time.process_time()
            plain.text(plain.ids[: setup.args.batch])
            best = min(best, time.process_time() - start)
    return round(best, 4)


# --- runs ------------------------------------------------------------------------------------------------
def memory_child(args, device) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(args, args.method[0], Path(tmp), device, shared=False)
        if args.side == "ours":
            setup.encoder = None  # ours loads the saved file; its tensors reuse the freed memory
        gc.collect()
        side = build_sides(setup, only=args.side)[args.side]
        del setup
        gc.collect()
        report_memory(side, args.memory_steps)


def time_method(args, method: str, device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(args, method, Path(tmp), device)
        sides = build_sides(setup)
        diff = check_same_prediction(setup, sides["ours"], sides["plain"])
        log(f"{method}: same prediction on both sides (max difference {diff:.2e}); "
            f"{sides['ours'].trainable} trainable parameters each")
        timing = alternate(sides, args.pairs, device)
        extra = {"unet_params": params(setup.models[0]), "trainable_params": sides["ours"].trainable,
                 "optimizer_foreach": {"ours": sides["ours"].trainer.optimizer.defaults.get("foreach"),
                                       "plain": sides["plain"].opt.defaults.get("foreach")},
                 "prediction_max_difference": diff, "text_encoder_forward_cpu_s": text_encoder_seconds(setup, sides["plain"])}
        if setup.encoder is not None:
            extra["clip_vision_params"] = params(setup.encoder)
        sides["ours"].method.close()
        return {**timing, **extra}


def run_method(args, method: str, device) -> dict:
    log(f"{method}: timing on {device}: width {args.width}, {args.resolution}px, batch {args.batch}")
    load_before = load_avg()
    timing = time_method(args, method, device)
    gc.collect()
    memory = None
    if device.type != "cuda" and (not args.smoke or method == args.method[0]):  # smoke: one method's children
        memory = memory_cpu(__file__, child_argv(args, method))
    keys = ("unet_params", "trainable_params", "clip_vision_params", "prediction_max_difference",
            "text_encoder_forward_cpu_s", "optimizer_foreach")
    return {"load_avg": [load_before, load_avg()], **{k: timing[k] for k in keys if k in timing},
            **summarize(timing, memory)}


def child_argv(args, method: str) -> list[str]:
    argv = ["--method", method, "--device", args.device, "--width", str(args.width), "--resolution",
            str(args.resolution), "--batch", str(args.batch), "--precision", args.precision, "--threads",
            str(args.threads), "--images", str(args.images), "--memory-steps", str(args.memory_steps),
            "--clip-layers", str(args.clip_layers), "--clip-image", str(args.clip_image),
            "--clip-width", str(args.clip_width)] + (["--plain-foreach"] if args.plain_foreach else [])
    return argv


def table_row(device: torch.device, args, method: str, r: dict) -> str:
    mem = peak_mb(r)
    mem_text = f"{mem['ours']:.0f} / {mem['plain']:.0f}" if mem else "not measured"
    return (f"| {device.type} | {method} | {r['unet_params'] / 1e6:.0f}M UNet, {args.resolution}px, batch {args.batch}, "
            f"{r['trainable_params'] / 1e6:.1f}M trainable, {args.precision} | "
            f"{r['cpu_median_s']['ours']:.2f} / {r['cpu_median_s']['plain']:.2f} | {r['cpu_time_ratio_of_medians']} | "
            f"{r['time_ratio_of_medians']} | {mem_text} | {r.get('memory_ratio', 'n/a')} |")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=None, help="UNet base channels (SD1.5: 320); default 128 on CPU")
    parser.add_argument("--resolution", type=int, default=None, help="default 192 on CPU, 512 on CUDA")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", default=None, help="fp32 (CPU default) or bf16 (CUDA default)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default 1 on CPU")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--clip-layers", type=int, default=1, help="CLIP vision layers (ViT-H/14: 32)")
    parser.add_argument("--clip-image", type=int, default=224)
    parser.add_argument("--clip-width", type=int, default=1280)
    parser.add_argument("--plain-foreach", action="store_true",
                        help="the reference's AdamW with foreach=True, as ours (a diagnostic of that choice)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, one pair: checks the wiring in seconds")
    parser.add_argument("--side", choices=["ours", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if args.smoke:
        args.width, args.resolution, args.pairs, args.images = args.width or 32, args.resolution or 64, 1, 4
        args.memory_steps, args.clip_image, args.clip_width = 1, 28, 160
    args.width = args.width or (320 if cuda else 128)
    args.resolution = args.resolution or (512 if cuda else 192)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.threads = args.threads or (torch.get_num_threads() if cuda else 1)
    return args


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.side:
        memory_child(args, device)
        return 0
    results = {m: run_method(args, m, device) for m in args.method}
    result = {"benchmark": "train_adapters_step", "environment": environment(device),
              "settings": {k: v for k, v in vars(args).items() if k not in ("side", "out")}, "methods": results}
    default = RESULTS / f"train_adapters_step_{device.type}{'_smoke' if args.smoke else ''}.json"
    out = args.out or (Path(tempfile.gettempdir()) / default.name if args.smoke else default)
    write_json(result, out)
    log(f"wrote {out}")
    for method, r in results.items():
        print(table_row(device, args, method, r))
    met = all(r["cpu_time_ratio_of_medians" if device.type == "cpu" else "time_ratio_of_medians"] <= 1.0
              and r.get("memory_ratio", 0) <= 1.0 for r in results.values())
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
