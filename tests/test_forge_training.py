"""The Train Adapter tab's jobs on Forge (main and Classic, the stub of tests/stubs_forge with its training side)
against the same jobs on the A1111 stub, on tiny models built from the same seed.

The truth is parity: a LoRA, T2I-Adapter and IP-Adapter (plain, plus, FaceID) run on Forge has the A1111 run's
loss at every step (<= 1e-5, fp32) and publishes the same weights. The stub keeps what would break a naive port: Forge's
weights are inference tensors (a run that does not make them ordinary fails), main's Linear layers are not
``nn.Linear``, Classic runs a block's layers without calling the block, Forge's VAE samples the posterior, its
text entry points run under inference mode and load the current ``forge_objects``' patchers, and a LoRA of the
prompt is merged into the shared weights when Forge loads its patcher. Then: interrupt and resume, a user's LoRA
merged by Forge kept out of the run and merged again afterwards, the published LoRA read by Forge's LoRA extension
in the next generation (also after a second run of the same name), the published adapters driving the next
generation through the panel's Forge path, and the web route and the script's host choice on Forge.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

TESTS = Path(__file__).resolve().parent
for _path in (TESTS / "stubs" / "extensions-builtin" / "Lora", TESTS / "training"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import driver  # noqa: E402
from fixtures.clip import save_clip_vision, tiny_clip_vision  # noqa: E402
from lib_adapters.formats.reader import read_state_dict  # noqa: E402
from lib_adapters.training.methods.lora import is_linear  # noqa: E402
from lib_adapters.training.request import TrainRequest  # noqa: E402
from lib_adapters.webui import host  # noqa: E402
from lib_adapters.webui.host import HostKind  # noqa: E402
from lib_adapters.webui.training import forge_host  # noqa: E402
from lib_adapters.webui.training.forge_host import ForgeTrainingHost  # noqa: E402
from lib_adapters.webui.training.host import TrainingHost  # noqa: E402
from lib_adapters.webui.training.jobs import JobState, TrainingJobs  # noqa: E402
from modules import paths, shared  # noqa: E402
from stubs_forge import lora_networks  # noqa: E402
from stubs_forge import training as forge_training  # noqa: E402
from stubs_forge import webui as forge_webui  # noqa: E402
from train_helpers import make_shapes_dataset  # noqa: E402

A1111, MAIN, CLASSIC = None, "main", "classic"
FORGES = [MAIN, CLASSIC]
TOLERANCE = 1e-5
TIMEOUT = 120


@pytest.fixture
def env(tmp_path):
    driver.reset_webui(tmp_path / "webui")
    dataset = make_shapes_dataset(tmp_path / "dataset", "2_shapes")
    encoder = save_clip_vision(tiny_clip_vision(), Path(paths.models_path) / "clip_vision")
    host.forget()
    try:
        yield SimpleNamespace(dataset=dataset, encoder=encoder, lora_dir=Path(shared.cmd_opts.lora_dir),
                              adapters=Path(paths.models_path) / "adapters")
    finally:
        host.forget()


@contextlib.contextmanager
def webui_on(flavour: str | None, arch: str = "sd1", seed: int = 0):
    """The tiny model of ``arch``/``seed`` loaded in the stub WebUI, on A1111 (with its Lora extension) or on Forge
    ``flavour`` (stub, training side, Forge's LoRA extension); yields (sd_model, tiny model, training host)."""
    tiny = driver.load_tiny_model(arch, seed)
    if flavour is None:
        import networks
        networks.install()
        try:
            yield shared.sd_model, tiny, TrainingHost()
        finally:
            networks.uninstall()
        return
    stub = forge_webui.install(flavour, tiny)
    training = forge_training.install(stub)
    lora_networks.install()
    host.forget()
    try:
        yield shared.sd_model, tiny, ForgeTrainingHost(host.current())
    finally:
        lora_networks.uninstall()
        training.uninstall()
        stub.uninstall()
        host.forget()


def add_conditions(dataset: Path, condition: str = "depth") -> None:
    for path in sorted((dataset / "2_shapes").glob("*.png")):
        if "." not in path.stem:
            with Image.open(path) as im:
                Image.fromarray(255 - np.asarray(im.convert("RGB"))).save(path.with_name(f"{path.stem}.{condition}.png"))


LORA = dict(method="lora", rank=4, alpha=4.0)  # the UNet's attention layers: the quick run
METHODS = {
    "lora": dict(LORA, train_text_encoder=True, lora_targets="attention+ff+conv"),
    "t2i": dict(method="t2i_adapter", t2i_condition="depth", sample_every=2, sample_prompts=["a red circle"],
                sample_steps=2),
    "ip plain": dict(method="ip_adapter", ip_projection="plain"),
    "ip plus": dict(method="ip_adapter", ip_projection="plus", sample_every=2, sample_prompts=["a red circle"],
                    sample_steps=2),
}


def request(env, name: str, **changes) -> TrainRequest:
    values = dict(dataset_dir=str(env.dataset), output_name=name, resolution=64, steps=4, batch_size=2,
                  learning_rate=1e-3, save_every=0, seed=3)
    values.update(changes)
    if values.get("method") == "ip_adapter":
        values.setdefault("ip_image_encoder", env.encoder.name)
    return TrainRequest.from_dict(values)


class WatchingHost(ForgeTrainingHost):
    """Records, at every step, the UNet modules that carry an instance ``forward`` the stub did not give them: on
    Forge the methods' contributions must go through Forge's patches, as the panel's do."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wrapped: list[list[str]] = []
        self.stubs = {n for n, m in self._unet().named_modules() if "forward" in m.__dict__}

    def _unet(self):
        return self._objects().unet.model.diffusion_model

    def report(self, p, first_step, method, output_name):
        super().report(p, first_step, method, output_name)
        self.wrapped.append([n for n, m in self._unet().named_modules()
                             if "forward" in m.__dict__ and n not in self.stubs])


def train(training_host, req: TrainRequest, *, resume: bool = False, jobs: TrainingJobs | None = None):
    jobs = jobs or TrainingJobs(training_host)
    jobs.start(req, resume=resume)
    return jobs.wait(TIMEOUT)


def generate(prompt: str = "a red circle", unit: dict | None = None) -> np.ndarray:
    scripts = {"Adapters": [unit]} if unit is not None else None
    processed = driver.txt2img(prompt=prompt, seed=5, steps=3, alwayson_scripts=scripts)
    return np.asarray(processed.images[0], dtype=np.float32)


def unet_weights(tiny) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tiny.model.diffusion_model.state_dict().items()}


# -- what the stub keeps from the real Forge ---------------------------------------------------------------------
@pytest.mark.parametrize("flavour", FORGES)
def test_forge_weights_are_inference_tensors_and_a_naive_port_fails(env, flavour, monkeypatch):
    """Without making Forge's inference tensors ordinary no run gets through; with it, the same run finishes."""
    with webui_on(flavour) as (model, tiny, training_host):
        unet = tiny.model.diffusion_model
        assert all(p.is_inference() for p in unet.parameters())
        attn = unet.input_blocks[1][1].transformer_blocks[0].attn1
        assert is_linear(attn.to_q) and isinstance(attn.to_q, torch.nn.Linear) == (flavour == CLASSIC)
        with monkeypatch.context() as m:
            m.setattr(forge_host, "make_ordinary", lambda roots: 0)
            failed = train(training_host, request(env, "naive", **LORA))
        assert failed.state is JobState.FAILED and "nference" in failed.error, failed.error
        done = train(training_host, request(env, "ported", **LORA))
        assert done.state is JobState.FINISHED, done.error
        assert not any(p.is_inference() for p in unet.parameters())


def test_make_ordinary_gives_parameters_created_in_inference_mode_a_version_counter():
    """Forge main's loader creates its ``Parameter`` objects under ``torch.inference_mode()`` (the real app's
    first LoRA run failed with "Inference tensors do not track version counter": a new ``.data`` gives such a
    tensor no version counter). After ``make_ordinary`` a backward passes through them; the objects, their
    attributes, values and ``requires_grad`` are kept, and buffers are ordinary too."""
    with torch.inference_mode():
        layer = torch.nn.Linear(4, 3)
        layer.weight = torch.nn.Parameter(torch.randn(3, 4), requires_grad=False)
        layer.bias = torch.nn.Parameter(torch.randn(3))
        layer.register_buffer("scale", torch.ones(3))
    layer.weight.forge_note = "kept"
    weight, bias = layer.weight, layer.bias
    values = {k: v.clone() for k, v in layer.state_dict().items()}
    assert weight.is_inference() and bias.is_inference() and layer.scale.is_inference()
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="nference"):
        torch.nn.functional.linear(x, weight, bias).sum().backward()

    assert forge_host.make_ordinary([layer]) == 3
    assert layer.weight is weight and layer.bias is bias and weight.forge_note == "kept"
    assert not any(t.is_inference() for t in (weight, bias, layer.scale))
    assert weight.requires_grad is False and bias.requires_grad is True
    assert all(torch.equal(values[k], v) for k, v in layer.state_dict().items())
    (torch.nn.functional.linear(x, weight, bias) * layer.scale).sum().backward()
    assert x.grad is not None and bias.grad is not None
    assert forge_host.make_ordinary([layer]) == 0


def test_make_ordinary_without_swap_tensors_gives_the_module_new_parameters(monkeypatch):
    """On a torch without ``torch.utils.swap_tensors`` (before 2.3) the module gets ordinary Parameters instead."""
    with torch.inference_mode():
        layer = torch.nn.Linear(4, 3)
    old = layer.weight
    monkeypatch.delattr(torch.utils, "swap_tensors")
    assert forge_host.make_ordinary([layer]) == 2
    assert layer.weight is not old and torch.equal(layer.weight, old) and not layer.weight.is_inference()
    x = torch.randn(2, 4, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("flavour", FORGES)
def test_what_forge_cannot_train_is_refused_before_anything_starts(env, flavour):
    from lib_adapters.errors import IncompatibleModelError

    with webui_on(flavour) as (model, tiny, training_host):
        kmodel = model.forge_objects_original.unet.model
        kmodel.storage_dtype = "nf4"  # Forge main's 4-bit UNet
        with pytest.raises(IncompatibleModelError, match="nf4"):
            TrainingJobs(training_host).start(request(env, "quantized", **LORA))
        del kmodel.storage_dtype
        kmodel.diffusion_model = torch.nn.Module()  # Flux, SD3: no ldm UNet
        try:
            with pytest.raises(IncompatibleModelError, match="input_blocks"):
                TrainingJobs(training_host).start(request(env, "flux", **LORA))
        finally:
            kmodel.diffusion_model = tiny.model.diffusion_model
    assert not list(env.lora_dir.glob("*.safetensors"))


# -- parity with A1111 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_forge_as_on_a1111(env, method):
    if method == "t2i":
        add_conditions(env.dataset)
    folder = env.lora_dir if method == "lora" else env.adapters
    runs = _trained_on_each_host(env, method.replace(" ", "_"), METHODS[method], folder)
    reference, weights = runs[A1111]
    assert len(reference.losses) == 4
    if "sample_every" in METHODS[method]:
        assert len(reference.samples) == 2
    _assert_forge_runs_match(runs)
    for flavour in FORGES:
        assert len(runs[flavour][0].samples) == len(reference.samples)


def _trained_on_each_host(env, prefix: str, settings: dict, folder: Path) -> dict:
    """The same request trained on A1111 and on each Forge (its UNet never wrapped there): flavour -> (status, the
    published file's tensors)."""
    runs = {}
    for flavour in [A1111, *FORGES]:
        name = f"{prefix}_{flavour or 'a1111'}"
        with webui_on(flavour) as (_, _, training_host):
            if flavour is not None:
                training_host = WatchingHost(host.current())
            status = train(training_host, request(env, name, **settings))
        assert status.state is JobState.FINISHED, (flavour, status.error)
        if flavour is not None:
            assert training_host.wrapped == [[]] * 4, flavour
        runs[flavour] = (status, read_state_dict(folder / f"{name}.safetensors"))
    return runs


def _assert_forge_runs_match(runs: dict) -> None:
    """Each Forge run has the A1111 run's loss at every step and its weights."""
    reference, weights = runs[A1111]
    for flavour in FORGES:
        status, forge_weights = runs[flavour]
        assert np.abs(np.subtract(status.losses, reference.losses)).max() <= TOLERANCE, flavour
        assert forge_weights.keys() == weights.keys()
        assert max(float((forge_weights[k].float() - weights[k].float()).abs().max()) for k in weights) <= 1e-3



def test_faceid_trains_on_forge_as_on_a1111(env, tmp_path):
    """FaceID (plain): the face embeddings of the run's images and the attention LoRA the reference trains with it
    reach Forge's UNet through Forge's patches, with the A1111 run's loss at every step and the same weights."""
    from face.face_pack import face_image, write_pack

    write_pack(Path(paths.models_path))
    faces = tmp_path / "me"
    faces.mkdir()
    for seed in (1, 2, 3):
        Image.fromarray(face_image(seed)).save(faces / f"{seed}.png")
        (faces / f"{seed}.txt").write_text("a portrait of me")
    settings = dict(method="ip_adapter", ip_projection="faceid", ip_lora_rank=4, ip_image_encoder="",
                    dataset_dir=str(faces))
    runs = _trained_on_each_host(env, "faceid", settings, env.adapters)
    reference, weights = runs[A1111]
    assert len(reference.losses) == 4 and any("lora" in k for k in weights), list(weights)[:8]
    _assert_forge_runs_match(runs)


@pytest.mark.parametrize("flavour", FORGES)
def test_sdxl_lora_with_both_text_encoders_matches_a1111(env, flavour):
    """SDXL: main's two text engines with each sample's size embedding, Classic's conditioner; both encoders get
    LoRA (lora_te1/lora_te2)."""
    from lib_adapters.training.backends.base import SizeCondition

    runs, conds = {}, {}
    sizes = [SizeCondition((64, 96), (0, 16), (64, 64)), SizeCondition((80, 64), (8, 0), (64, 64))]
    for where in (A1111, flavour):
        with webui_on(where, arch="sdxl") as (_, _, training_host):
            runs[where] = train(training_host, request(env, f"xl_{where or 'a1111'}", **METHODS["lora"]))
            conds[where] = training_host.make_backend().encode_prompts(["a red circle", "a blue square"], sizes)
        assert runs[where].state is JobState.FINISHED, runs[where].error
    for key in ("crossattn", "vector"):  # the tiny SDXL UNet does not read the vector: compare it here
        assert float((conds[flavour][key] - conds[A1111][key]).abs().max()) <= TOLERANCE, key
    assert np.abs(np.subtract(runs[flavour].losses, runs[A1111].losses)).max() <= TOLERANCE
    keys = read_state_dict(Path(runs[flavour].output)).keys()
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)


@pytest.mark.parametrize("flavour", FORGES)
def test_gradient_checkpointing_on_forge_changes_no_number(env, flavour):
    """Checkpointed layers are recomputed after the UNet call, when Forge's transformer_options hold the last
    block's keys: each recomputation must see its own call's (the IP patches find their site by them)."""
    settings = dict(METHODS["ip plus"], sample_every=0, sample_prompts=[])
    with webui_on(flavour) as (_, _, training_host):
        plain = train(training_host, request(env, "plain", **settings))
        checkpointed = train(training_host, request(env, "checkpointed", **settings, gradient_checkpointing=True))
    assert plain.state is checkpointed.state is JobState.FINISHED, (plain.error, checkpointed.error)
    assert np.abs(np.subtract(checkpointed.losses, plain.losses)).max() <= TOLERANCE
    a, b = (read_state_dict(env.adapters / f"{n}.safetensors") for n in ("plain", "checkpointed"))
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-3


@pytest.mark.parametrize("flavour", FORGES)
def test_forge_unloads_no_model_of_the_run_while_it_goes_on(env, flavour, monkeypatch):
    """With --always-offload-from-vram every load of Forge's loader unloads every other model; Forge's own text
    (Classic, every encode) and VAE (every sample's decode) code loads its patcher at each use: the UNet, CLIP and
    VAE of the run must stay loaded all the same."""
    from stubs_forge import loader as stub_loader

    with webui_on(flavour) as (model, _, training_host):
        loader = training_host._loader()
        monkeypatch.setattr(stub_loader, "ALWAYS_OFFLOAD", True)
        stub_loader.evicted.clear()
        status = train(training_host, request(env, "kept", **LORA, sample_every=2, sample_prompts=["a red circle"],
                                              sample_steps=2))
        assert status.state is JobState.FINISHED, status.error
        base = model.forge_objects_original
        kept = (base.unet, base.clip.patcher, base.vae.patcher)
        assert not [p for p in stub_loader.evicted if any(p is q for q in kept)]
        loader.load_model_gpu(base.vae.patcher)  # after the run Forge's loader is its own again: it unloads them
        assert [p for p in stub_loader.evicted if p is base.unet]


# -- a user's LoRA, merged by Forge ---------------------------------------------------------------------------------
def user_lora(env, tiny, name: str = "user", seed: int = 11) -> None:
    """A random LoRA (UNet and text encoder) in the Lora dir, as a user would have."""
    from lib_adapters.training.backends.ldm import LdmBackend
    from lib_adapters.training.config import LoraConfig
    from lib_adapters.training.methods.lora import build_lora_network
    from lib_adapters.training.methods.lora_file import save_lora

    network = build_lora_network(LdmBackend(tiny), LoraConfig(rank=2, alpha=2.0, train_text_encoder=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras.values():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.5)
    save_lora(env.lora_dir / f"{name}.safetensors", network.kohya_state_dict(torch.float32), {"ss_output_name": name})


@pytest.mark.parametrize("flavour", FORGES)
def test_a_lora_merged_by_forge_stays_out_of_the_run_and_comes_back(env, flavour):
    with webui_on(A1111) as (_, tiny, training_host):
        reference = train(training_host, request(env, "clean", **LORA))
    with webui_on(flavour) as (model, tiny, training_host):
        user_lora(env, tiny)
        base = unet_weights(tiny)
        plain = generate()
        with_user = generate("a red circle <lora:user:1>")
        assert np.abs(with_user - plain).mean() > 0.5
        merged = unet_weights(tiny)
        assert max(float((merged[k] - base[k]).abs().max()) for k in base) > 1e-3  # Forge merged it
        objects = model.forge_objects

        status = train(training_host, request(env, "mine", **LORA))
        assert status.state is JobState.FINISHED, status.error
        assert np.abs(np.subtract(status.losses, reference.losses)).max() <= TOLERANCE  # trained on the base
        assert model.forge_objects is objects
        assert np.array_equal(generate("a red circle <lora:user:1>"), with_user)  # merged again by Forge
        assert np.array_equal(generate(), plain)
        assert all(torch.equal(v, base[k]) for k, v in unet_weights(tiny).items())  # the base, bit for bit


# -- interrupt and resume -------------------------------------------------------------------------------------------
class StoppingHost(ForgeTrainingHost):
    def __init__(self, *args, stop_at: int, jobs_ref: list, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at, self.jobs_ref = stop_at, jobs_ref

    def report(self, p, first_step, method, output_name):
        super().report(p, first_step, method, output_name)
        if p.step == self.stop_at:
            self.jobs_ref[0].interrupt()


@pytest.mark.parametrize("flavour, method", [(MAIN, "lora"), (CLASSIC, "t2i")])
def test_interrupt_publishes_and_resume_continues_on_forge(env, flavour, method):
    if method == "t2i":
        add_conditions(env.dataset)
    settings = dict(LORA if method == "lora" else METHODS[method], steps=6, save_every=2, sample_every=0,
                    sample_prompts=[])
    folder = env.lora_dir if method == "lora" else env.adapters
    with webui_on(flavour) as (_, _, _):
        whole = train(ForgeTrainingHost(host.current()), request(env, "whole", **settings))
        jobs_ref: list = []
        stopping = StoppingHost(host.current(), stop_at=3, jobs_ref=jobs_ref)
        jobs = TrainingJobs(stopping)
        jobs_ref.append(jobs)
        stopped = train(stopping, request(env, "parts", **settings), jobs=jobs)
        assert stopped.state is JobState.INTERRUPTED and stopped.step == 3, stopped.error
        assert (folder / "parts.safetensors").is_file() and stopped.checkpoint.endswith(".state")
        resumed = train(ForgeTrainingHost(host.current()), request(env, "parts", **settings), resume=True)
    assert whole.state is resumed.state is JobState.FINISHED, (whole.error, resumed.error)
    assert resumed.step == 6 and len(resumed.losses) == 3
    assert np.abs(np.subtract(stopped.losses + resumed.losses, whole.losses)).max() <= TOLERANCE
    a, b = read_state_dict(folder / "whole.safetensors"), read_state_dict(folder / "parts.safetensors")
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-3  # fp16 files


# -- the published file in the next generation ----------------------------------------------------------------------
@pytest.mark.parametrize("flavour", FORGES)
def test_the_published_lora_is_read_by_forge_in_the_next_generation_also_after_a_second_run(env, flavour):
    with webui_on(flavour) as (model, tiny, training_host):
        plain = generate()
        first = train(training_host, request(env, "style", **LORA, learning_rate=5e-2))
        assert first.state is JobState.FINISHED, first.error
        styled = generate("a red circle <lora:style:1>")
        assert np.abs(styled - plain).mean() > 0.5
        # a second run of the same name: Forge's LoRA extension must not keep the first file's weights
        second = train(training_host, request(env, "style", **LORA, learning_rate=5e-2, seed=9, overwrite=True))
        assert second.state is JobState.FINISHED, second.error
        restyled = generate("a red circle <lora:style:1>")
        assert np.abs(restyled - styled).mean() > 0.5
        assert np.array_equal(generate(), plain)


@pytest.fixture
def panel(env):
    from test_panel_e2e import _load_script_module

    module = _load_script_module()
    import lib_adapters.webui.panel as panel_module
    panel_module._resources = None
    driver.build_runners([module.AdaptersScript])
    try:
        yield panel_module
    finally:
        module.release_resources()
        panel_module._resources = None


@pytest.mark.parametrize("flavour, method", [(CLASSIC, "t2i"), (MAIN, "ip plus")])
def test_a_published_adapter_drives_the_next_forge_generation(env, panel, flavour, method):
    if method == "t2i":
        add_conditions(env.dataset)
    name = method.replace(" ", "_")
    image = np.asarray(Image.open(sorted((env.dataset / "2_shapes").glob("*.png"))[0]).convert("RGB"))
    with webui_on(flavour) as _:
        status = train(ForgeTrainingHost(host.current()), request(env, name, **METHODS[method], learning_rate=1e-2))
        assert status.state is JobState.FINISHED, status.error
        assert name in panel.resources().catalog.names()  # listed without a refresh click
        base = generate()
        used = generate(unit={"enabled": True, "model": name, "image": image, "weight": 1.0})
        zero = generate(unit={"enabled": True, "model": name, "image": image, "weight": 0.0})
    assert np.abs(used - base).mean() > 0.5
    assert np.array_equal(zero, base)


# -- the route and the script on Forge ------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", FORGES)
def test_the_route_and_the_scripts_host_train_on_forge(env, flavour, tmp_path):
    """The training script picks Forge's host; a LoRA and a T2I-Adapter job go through the web route and finish."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_adapters.webui.training.api import PREFIX, register_api

    conditioned = make_shapes_dataset(tmp_path / "conditioned", "2_shapes")  # condition files are not LoRA images
    add_conditions(conditioned)
    jobs_done = {}
    with webui_on(flavour) as _:
        spec = importlib.util.spec_from_file_location("adapters_train_forge", TESTS.parent / "scripts" / "adapters_train.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        jobs = script.jobs()
        assert type(jobs.host) is ForgeTrainingHost
        assert jobs.host.host.kind is (HostKind.FORGE if flavour == MAIN else HostKind.FORGE_CLASSIC)
        app = FastAPI()
        register_api(app, jobs)
        client = TestClient(app)
        common = dict(dataset_dir=str(env.dataset), resolution=64, steps=3, batch_size=2, learning_rate=1e-3,
                      save_every=0)
        for name, body in (("routed", dict(common, rank=4, alpha=4)),
                           ("routed_depth", dict(common, method="t2i_adapter", t2i_condition="depth",
                                                 dataset_dir=str(conditioned)))):
            response = client.post(PREFIX, json=dict(body, output_name=name))
            assert response.status_code == 200, response.text
            jobs.wait(TIMEOUT)
            jobs_done[name] = client.get(PREFIX).json()
    for name, folder in (("routed", env.lora_dir), ("routed_depth", env.adapters)):
        status = jobs_done[name]
        assert status["state"] == "finished", status["error"]
        assert status["output"] == str(folder / f"{name}.safetensors") and len(status["losses"]) == 3
