"""Shared helpers for the training tests: small datasets made on the fly, tiny models, a WebUI-faithful SDXL view."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image, ImageDraw
from torch import nn

from lib_adapters.training.progress import TrainCallbacks

SHAPES = (("a red circle", (220, 30, 30), "ellipse"), ("a blue square", (30, 30, 220), "rectangle"),
          ("a green circle", (30, 200, 30), "ellipse"), ("a yellow square", (230, 220, 20), "rectangle"))


def shape_image(color, kind: str, size: tuple[int, int] = (64, 64)) -> Image.Image:
    w, h = size
    image = Image.new("RGB", size, (255, 255, 255))
    getattr(ImageDraw.Draw(image), kind)((w // 5, h // 5, w - w // 5, h - h // 5), fill=color)
    return image


def make_shapes_dataset(root: Path, folder: str = "2_shapes", count: int = 4, size=(64, 64)) -> Path:
    """``count`` coloured shapes with captions in ``root/folder``."""
    target = root / folder
    target.mkdir(parents=True, exist_ok=True)
    for i, (caption, color, kind) in enumerate(SHAPES[:count]):
        shape_image(color, kind, size).save(target / f"{i}.png")
        (target / f"{i}.txt").write_text(caption)
    return root


def tiny(arch: str = "sd1", seed: int = 0):
    """(the stub ``shared.sd_model`` look-alike, an ``LdmBackend`` over it)."""
    from tiny_model import build_tiny_sd_model

    from lib_adapters.training.backends.ldm import LdmBackend

    model = build_tiny_sd_model(arch, seed)
    return model, LdmBackend(model)


class _OpenClipBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 4)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 2 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(2 * width, width)))


def webui_sdxl_view(sd_model, width: int = 16, layers: int = 2):
    """The stub SDXL model as the WebUI's Lora extension sees a real one: the second text encoder is OpenCLIP
    (``embedders[1].wrapped.model.transformer.resblocks.N.{attn,mlp.c_fc,mlp.c_proj}``), not transformers-named."""
    resblocks = nn.ModuleList(_OpenClipBlock(width) for _ in range(layers))
    open_clip = nn.Module()
    open_clip.transformer = nn.Module()
    open_clip.transformer.resblocks = resblocks
    second = SimpleNamespace(wrapped=SimpleNamespace(named_modules=lambda: [(f"model.{n}" if n else "model", m)
                                                                            for n, m in open_clip.named_modules()]))
    embedders = [sd_model.conditioner.embedders[0], second]
    return SimpleNamespace(is_sdxl=True, conditioner=SimpleNamespace(embedders=embedders), model=sd_model.model)


def unet_inputs(model, batch: int = 2, size: int = 8, seed: int = 3):
    """Latents, timesteps and conditioning for one UNet call on the tiny model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a red circle", "a blue square"][:batch])
    return x, t, cond


# -- inputs that turn NaN (the non-finite loss diagnosis) -----------------------------------------------------
def poison_word(embedder, word: str) -> None:
    """A text encoder (the stub WebUI's chunked CLIP embedder) whose output is NaN for every caption with ``word``."""
    original = embedder.encode_with_transformers
    token = embedder.tokenizer.encode_words(word)[0]

    def encode(tokens):
        z, pooled = original(tokens)
        rows = (tokens == token).any(dim=1)
        z = z.clone()
        z[rows] = float("nan")
        return z, pooled

    embedder.encode_with_transformers = encode


def poison_black_images(model) -> None:
    """A VAE whose encoding is NaN for an all-black image."""
    original = model.encode_first_stage

    def encode(x):
        z = original(x).mode().clone()
        z[(x.flatten(1) <= -0.99).all(dim=1)] = float("nan")
        return z

    model.encode_first_stage = encode


# -- an informative stand-in VAE (learning tests) ---------------------------------------------------------
POOL_SCALE = 3 ** 0.5  # colours uniform in [-1, 1] have variance 1/3: latents of random colours get about unit variance


class PooledLatents:
    """Mix-in for a training backend: a fixed, informative map in place of the VAE. The tiny model's random VAE
    sends differently coloured images to nearly the same latents (std ~0.05), so nothing the image shows reaches
    the denoising target. Here latents are the image's 8x8 average pool (RGB -> 3 channels, times ``POOL_SCALE``)
    and a constant 4th channel; decoding is the nearest-neighbour inverse."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(pixels.float(), 8) * POOL_SCALE
        return torch.cat([pooled, torch.zeros_like(pooled[:, :1])], 1).to(self.device)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(latents[:, :3].float() / POOL_SCALE, scale_factor=8, mode="nearest")

    def identity(self):
        return replace(super().identity(), vae="avg-pool-8")  # never mixed with the VAE's latents in a cache


def tiny_pooled(arch: str = "sd1", seed: int = 0, parameterization: str = "eps"):
    """``tiny()`` with the ``PooledLatents`` stand-in VAE: (model, backend). ``parameterization="v"`` makes the
    model a v-prediction one (as SD2-768-v), whose target ``sqrt(a) eps - sqrt(1 - a) x0`` contains the clean
    latents themselves: the learning tests use it because the tiny model's random, frozen UNet is no denoiser, so
    an eps target (noise alone) leaves a condition describing ``x0`` next to nothing to improve."""
    from tiny_model import build_tiny_sd_model

    from lib_adapters.training.backends.ldm import LdmBackend

    class PooledLdmBackend(PooledLatents, LdmBackend):
        pass

    model = build_tiny_sd_model(arch, seed)
    model.parameterization = parameterization
    return model, PooledLdmBackend(model)


def half_colour_image(color) -> Image.Image:
    """64x64: the left half ``color``, the right half its complement, so each latent channel is a left/right
    pattern of amplitude ``color`` (the tiny UNet's per-channel GroupNorms drop a flat colour's offset)."""
    image = Image.new("RGB", (64, 64), tuple(255 - int(c) for c in color))
    image.paste(tuple(int(c) for c in color), (0, 0, 32, 64))
    return image


def reading_clip_vision(folder: Path, images: list, targets: torch.Tensor, seed: int = 0,
                        name: str = "clip_vision_reading") -> Path:
    """The tiny CLIP vision encoder (``fixtures.clip``) saved with its ``visual_projection`` refitted by least
    squares so that its ``image_embeds`` of ``images`` (calibration RGB arrays) read ``targets`` [N, width]: a
    stand-in for a real encoder, whose embeddings say plainly what colour an image is (the random one's are
    dominated by what all images share). Everything before the projection is the random encoder's own."""
    import numpy as np

    from fixtures.clip import save_clip_vision, tiny_clip_vision

    from lib_adapters.formats.clip_vision import load_clip_vision
    from lib_adapters.models.clip_vision import CropMode

    model = tiny_clip_vision(seed)
    encoder = load_clip_vision(save_clip_vision(model, Path(folder), name))
    with torch.no_grad():
        pixels = encoder.preprocess([np.asarray(i) for i in images], CropMode.CENTER)
        pooled = encoder.model.vision_model(pixel_values=pixels).pooler_output.double()
        eye = torch.eye(pooled.shape[1], dtype=torch.float64)
        weight = torch.linalg.solve(pooled.T @ pooled + 1e-2 * eye, pooled.T @ targets.double())
        model.visual_projection.weight.copy_(weight.T.float())
    return save_clip_vision(model, Path(folder), name)


def held_out_noising(backend, latents: torch.Tensor, seed: int = 123):
    """Fixed noise and timesteps in [100, 900) for a held-out loss: (noisy latents, timesteps, target)."""
    from lib_adapters.training.objective import add_noise, training_target

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(100, 900, (latents.shape[0],), generator=g)
    noisy = add_noise(latents, noise, t, backend.alphas_cumprod)
    return noisy, t, training_target(backend.parameterization, latents, noise, t, backend.alphas_cumprod)


def colour_images(folder: Path, colours, caption: str | None) -> list[Path]:
    """``half_colour_image`` of each colour as ``folder/<i>.png``, with ``caption`` beside it (None: no caption)."""
    folder.mkdir(parents=True)
    paths = []
    for i, colour in enumerate(colours):
        paths.append(folder / f"{i}.png")
        half_colour_image(colour).save(paths[-1])
        if caption is not None:
            (folder / f"{i}.txt").write_text(caption)
    return paths


def held_out_loss(backend, paths: list[Path], caption: str, method=None, features: torch.Tensor | None = None) -> float:
    """The denoising loss of 64x64 images under ``caption`` with ``held_out_noising``'s fixed noise and timesteps:
    of the base model (``method`` None), or with an IP method's tokens of ``features`` (one row per image)."""
    from lib_adapters.training.buckets import Bucket, load_pixels, place

    pixels = torch.stack([load_pixels(p, place(64, 64, Bucket(64, 64))) for p in paths])
    noisy, t, target = held_out_noising(backend, backend.encode_images(pixels))
    with torch.no_grad():
        cond = backend.encode_prompts([caption] * len(paths))
        if method is None:
            return float((backend.apply(noisy, t, cond) - target).pow(2).mean())
        with method.tokens_active(method.image_tokens(features)):
            return float((backend.apply(noisy, t, cond) - target).pow(2).mean())


# -- face analysis stand-ins (IP-Adapter FaceID) -----------------------------------------------------------------
class ColourFaces:
    """A stand-in face analyzer (``FaceAnalyzer.analyze``'s contract: a ``FaceResult``, ``NoFaceError`` without a
    face) whose unit-length embedding says an image's colour, as ArcFace's says a face's identity: ``[scale * c, 1]``
    normed, ``c`` the mean RGB of the left half in [-1, 1], spread over the 512 dimensions by a fixed random rotation
    (an ArcFace embedding fills them all). With ``scale`` 3 two random colours' embeddings have a cosine of about
    0.1, near the 0 of two people's ArcFace embeddings; the constant keeps the brightness that norming would drop.
    Images whose left half is pure grey (r == g == b) have no face. Counts its calls."""

    def __init__(self, scale: float = 3.0, seed: int = 0):
        import numpy as np

        self.scale, self.calls = scale, 0
        q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(512, 4)))
        self.rotation = q.astype(np.float32)  # [512, 4], orthonormal columns: norms are kept

    def analyze(self, image):
        import numpy as np

        from lib_adapters.face import FaceResult, NoFaceError

        self.calls += 1
        pixels = np.asarray(image, dtype=np.float32)
        left = pixels[:, : pixels.shape[1] // 2].reshape(-1, 3).mean(0)
        if np.ptp(left) == 0:
            raise NoFaceError("No face found in the image.")
        embedding = self.rotation @ np.append((left / 127.5 - 1) * self.scale, 1.0).astype(np.float32)
        return FaceResult(box=np.array([0, 0, 8, 8], np.float32), score=0.9, keypoints=np.zeros((5, 2), np.float32),
                          embedding=embedding, normed_embedding=embedding / np.linalg.norm(embedding), index=0,
                          faces_found=1)


def use_face_analyzer(monkeypatch, analyzer) -> None:
    """Runs analyse faces with ``analyzer`` instead of the configured pack's onnxruntime sessions."""
    monkeypatch.setattr("lib_adapters.training.face_data.open_face_analyzer", lambda ip: analyzer)


class StopAt(TrainCallbacks):
    """Training callbacks that interrupt the run once step ``step`` is done (a user's Interrupt, a Ctrl-C)."""

    def __init__(self, step: int):
        self.step, self.seen = step, 0

    def on_progress(self, progress) -> None:
        self.seen = progress.step

    def interrupted(self) -> bool:
        return self.seen >= self.step


def resumes_bit_for_bit(config) -> dict[str, torch.Tensor]:
    """``config(name)`` (a ``TrainConfig`` writing to folder ``name``) trained straight through as "a", and as "b"
    interrupted after step 2 then resumed, each on a fresh tiny SD1 model: the same losses and the same exported
    tensors, bit for bit. Returns those tensors."""
    from safetensors.torch import load_file

    from lib_adapters.training.loop import train
    from lib_adapters.training.run_checkpoints import checkpoint_paths

    straight = train(config("a"), tiny("sd1")[1])
    first = train(config("b"), tiny("sd1")[1], callbacks=StopAt(2))
    assert first.interrupted and first.step == 2
    second = train(config("b"), tiny("sd1")[1], resume_from=checkpoint_paths(config("b"), 2)[1])
    assert first.losses + second.losses == straight.losses
    a, b = load_file(str(straight.output)), load_file(str(second.output))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a


def trained_ip_method(config, backend):
    """``config`` trained on ``backend`` (its loss lower at the end of the run than at the start), then its exported
    (fp16) file loaded into a fresh IP method, as the panel would load it; ``close()`` it after use."""
    import numpy as np

    from lib_adapters.training.loop import train
    from lib_adapters.training.methods.ip_adapter import IPAdapterMethod

    result = train(config, backend)
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10]), result.losses
    method = IPAdapterMethod(backend, config.ip)
    method.load_trainable_file(result.output)
    return method
