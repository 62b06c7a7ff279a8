"""The command-line trainer on the built-in tiny model: a run whose LoRA the WebUI's Lora extension maps key for key,
a Ctrl-C that saves and a ``--resume`` that ends where an uninterrupted run ends, bad inputs as one message and an
exit code, and options generated from the config dataclasses."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import make_shapes_dataset

pytest.importorskip("diffusers")

from lib_adapters.training import cli  # noqa: E402
from lib_adapters.training.cli_args import build_parser, places_from_args, request_from_args  # noqa: E402
from lib_adapters.training.config import LoraTargets, Precision  # noqa: E402
from lib_adapters.training.methods.lora_file import load_lora  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = ["--resolution", "64", "--batch-size", "2", "--learning-rate", "1e-3", "--seed", "3", "--device", "cpu"]
LORA = ["--lora-rank", "4"]  # LoRA runs only: another method's run refuses LoRA's knobs, as the web API does


def _run(tmp_path: Path, *extra: str, name: str = "cli", lora: bool = True) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(["--dataset", str(tmp_path / "ds"), "--output-dir", str(tmp_path / "out"), "--name", name,
                     *BASE, *(LORA if lora else ()), *extra], out=out)
    return code, out.getvalue()


def test_a_run_on_the_tiny_model_writes_a_lora_the_webui_maps_key_for_key(tmp_path):
    from tiny_model import build_tiny_sd_model
    from webui_lora import accepts_lora, match_keys

    make_shapes_dataset(tmp_path / "ds", "2_shapes")
    code, text = _run(tmp_path, "--steps", "4", "--lora-targets", "attention+ff")
    assert code == cli.EXIT_OK, text
    output = tmp_path / "out" / "cli.safetensors"
    assert f"done: {output}" in text and "built-in tiny model" in text and "<lora:cli:1>" in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith("step ")] == ["1/4", "2/4", "3/4", "4/4"]
    assert "ETA" in text and "loss: mean of the first" in text
    tensors, metadata = load_lora(output)
    assert metadata["ss_steps"] == "4" and metadata["ss_network_dim"] == "4" and metadata["ss_base_model_version"] == "sd_v1"
    # the tiny model's diffusers UNet has SD1.x's structure: every key lands on the stub WebUI's ldm model
    matched, failed = match_keys(tensors, build_tiny_sd_model("sd1"))
    assert failed == {} and len(matched) == len([k for k in tensors if k.endswith(".lora_down.weight")]) > 30
    assert all(accepts_lora(e) for e in matched.values())
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if k.endswith("lora_up.weight"))


def test_ctrl_c_saves_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    make_shapes_dataset(tmp_path / "ds", "2_shapes")
    code, _ = _run(tmp_path, "--steps", "4", name="full")
    assert code == cli.EXIT_OK
    original = cli.ConsoleCallbacks.on_progress

    def press_ctrl_c_after_step_2(self, progress):  # what SIGINT's handler does, at a known step
        original(self, progress)
        if progress.step == 2:
            self.request_stop()

    monkeypatch.setattr(cli.ConsoleCallbacks, "on_progress", press_ctrl_c_after_step_2)
    code, text = _run(tmp_path, "--steps", "4", name="cut")
    assert code == cli.EXIT_INTERRUPTED and "interrupted at step 2" in text and "--resume" in text
    assert (tmp_path / "out" / "cut-checkpoints" / "cut-step000002.state").is_file()
    # the weights so far are published as on a finished run (the tab and the API do the same), through the method
    interrupted, metadata = load_lora(tmp_path / "out" / "cut.safetensors")
    assert metadata["ss_steps"] == "2" and f"the weights so far: {tmp_path / 'out' / 'cut.safetensors'}" in text
    assert {t.dtype for t in interrupted.values()} == {torch.float16}  # the save precision, not the checkpoint's fp32
    monkeypatch.setattr(cli.ConsoleCallbacks, "on_progress", original)
    code, text = _run(tmp_path, "--steps", "4", "--resume", name="cut")
    assert code == cli.EXIT_OK and text.count("step ") >= 2 and "step 3/4" in text and "step 1/4" not in text
    full, _ = load_lora(tmp_path / "out" / "full.safetensors")
    cut, _ = load_lora(tmp_path / "out" / "cut.safetensors")
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)


def test_bad_inputs_exit_with_a_message_and_no_traceback(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "a.png").write_bytes(b"not an image")
    (tmp_path / "ds" / "a.txt").write_text("x")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "lib_adapters.training", "--dataset", str(tmp_path / "ds"),
                           "--output-dir", str(tmp_path / "out"), "--name", "bad"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == cli.EXIT_INPUT
    assert proc.stderr.startswith("error: ") and "a.png" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    for argv, words in ((["--lora-rank", "0"], "LoRA rank"), (["--resume"], "no checkpoint"),
                        (["--resume", str(tmp_path / "nope.state")], "does not exist"),
                        (["--checkpoint", str(tmp_path / "missing")], "does not exist"),
                        (["--method", "ip_adapter", "--sample-image", str(tmp_path / "gone.png")],
                         f"the sample image {tmp_path / 'gone.png'} does not exist")):
        make_shapes_dataset(tmp_path / "good", "1_x", count=1)
        err = io.StringIO()
        sys_stderr, sys.stderr = sys.stderr, err
        try:
            code = cli.main(["--dataset", str(tmp_path / "good"), "--output-dir", str(tmp_path / "o2"), "--name", "n",
                             *argv])
        finally:
            sys.stderr = sys_stderr
        assert code == cli.EXIT_INPUT and words in err.getvalue(), (argv, err.getvalue())


def test_every_request_field_is_an_option_and_json_config_loses_to_flags(tmp_path):
    """Flags, --config keys, the API's body and the tab come from one schema: every config field a request can set
    (all but the places: output folder, encoder and annotator folders) is a flag named as in the request."""
    from dataclasses import fields

    from lib_adapters.training.config import IPAdapterConfig, LoraConfig, T2IConfig, TrainConfig, knob_of
    from lib_adapters.training.request import REQUEST_FIELDS

    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {f"--{f.name.replace('_', '-')}" for f in REQUEST_FIELDS} <= flags
    configurable = {(cls, f.name) for cls in (TrainConfig, LoraConfig, T2IConfig, IPAdapterConfig) for f in fields(cls)
                    if not knob_of(f).place and f.name not in ("lora", "t2i", "ip")}
    parts = {None: TrainConfig, "lora": LoraConfig, "t2i": T2IConfig, "ip": IPAdapterConfig}
    assert {(parts[f.part], f.attr) for f in REQUEST_FIELDS if f.part != "job"} == configurable
    assert {"--lora-rank", "--dataset", "--name", "--lora-train-text-encoder"} <= flags  # the earlier spellings
    (tmp_path / "c.json").write_text('{"dataset_dir": "d", "output_name": "n", "steps": 7, "rank": 16, '
                                     '"lora_targets": "attention+ff", "sample_prompts": ["a", "b"]}')
    args = parser.parse_args(["--config", str(tmp_path / "c.json"), "--output-dir", "o", "--lora-rank", "2",
                              "--precision", "bf16", "--no-buckets", "--max-grad-norm", "none", "--min-snr-gamma", "5"])
    config = request_from_args(args).to_config(args.output_dir, places=places_from_args(args))
    assert (config.steps, config.lora.rank, config.lora.targets) == (7, 2, LoraTargets.ATTENTION_FF)
    assert config.precision is Precision.BF16 and config.buckets is False and config.max_grad_norm is None
    assert config.min_snr_gamma == 5.0 and config.sample_prompts == ("a", "b") and config.output_name == "n"
    (tmp_path / "bad.json").write_text('{"stepz": 1}')
    with pytest.raises(Exception, match="unknown field.*stepz"):
        request_from_args(parser.parse_args(["--config", str(tmp_path / "bad.json")]))
    (tmp_path / "nested.json").write_text('{"dataset_dir": "d", "output_name": "n", "lora": {"rank": 4}}')
    with pytest.raises(Exception, match="holds lora: a config file holds a request as the web API takes it"):
        request_from_args(parser.parse_args(["--config", str(tmp_path / "nested.json")]))


def test_a_non_finite_loss_exits_1_naming_the_kept_checkpoint(tmp_path, monkeypatch, capsys):
    from lib_adapters.training import loop

    make_shapes_dataset(tmp_path / "ds", "2_shapes")
    real, calls = loop.diffusion_loss, []

    def nan_from_the_third_batch(prediction, target, weights=None):
        calls.append(1)
        loss = real(prediction, target, weights)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(loop, "diffusion_loss", nan_from_the_third_batch)
    code, text = _run(tmp_path, "--steps", "4", "--save-every", "1", name="nan")
    err = capsys.readouterr().err
    kept = tmp_path / "out" / "nan-checkpoints" / "nan-step000002.state"
    assert code == cli.EXIT_TRAINING and err.startswith("error: the loss became nan at step 3")
    assert f"{kept} is kept unchanged" in err and "lower learning rate" in err and "Traceback" not in err
    assert kept.is_file() and not (tmp_path / "out" / "nan.safetensors").exists()


def test_the_cli_trains_a_t2i_adapter_that_our_loader_reads(tmp_path):
    """The same jobs as the tab and the API: --method t2i_adapter with --t2i-* flags, on the built-in tiny model."""
    from PIL import Image

    from lib_adapters.formats.adapter_file import load_adapter

    make_shapes_dataset(tmp_path / "ds", "2_shapes")
    for i in range(4):
        with Image.open(tmp_path / "ds" / "2_shapes" / f"{i}.png") as image:
            image.convert("L").save(tmp_path / "ds" / "2_shapes" / f"{i}.edges.png")
    code, text = _run(tmp_path, "--steps", "2", "--method", "t2i_adapter", "--t2i-condition", "edges",
                      "--t2i-condition-channels", "1", "--t2i-adapter-kind", "light", "--sample-every", "2",
                      "--sample-prompts", "a circle", "--sample-steps", "2", "--sample-image",
                      str(tmp_path / "ds" / "2_shapes" / "3.edges.png"), name="edges_adapter", lora=False)
    assert code == cli.EXIT_OK, text
    assert (tmp_path / "out" / "edges_adapter-samples" / "step000002-0.png").is_file()
    output = tmp_path / "out" / "edges_adapter.safetensors"
    assert f"done: {output}" in text and "models/adapters" in text and "<lora:" not in text
    from lib_adapters.formats.t2i import LoadedT2IAdapter
    from lib_adapters.models.t2i_adapter import T2IKind

    loaded = load_adapter(output)
    assert isinstance(loaded, LoadedT2IAdapter) and loaded.config.kind is T2IKind.LIGHT
    assert loaded.config.in_channels == 1 * 8 * 8  # one channel, pixel-unshuffled by 8 as the released adapters


def test_the_cli_trains_an_ip_adapter_plus_that_our_loader_reads(tmp_path):
    """--method ip_adapter with --ip-* flags, on the built-in tiny model, with a CLIP vision encoder file."""
    from fixtures.clip import save_clip_vision, tiny_clip_vision

    from lib_adapters.formats.adapter_file import load_adapter
    from lib_adapters.formats.ip import LoadedIPAdapter
    from lib_adapters.models.ip_adapter import IPProjection

    make_shapes_dataset(tmp_path / "ds", "2_shapes")
    encoder = save_clip_vision(tiny_clip_vision(), tmp_path / "clip")
    code, text = _run(tmp_path, "--steps", "2", "--method", "ip_adapter", "--ip-projection", "plus",
                      "--ip-image-encoder", str(encoder), name="ref_adapter", lora=False)
    assert code == cli.EXIT_OK, text
    output = tmp_path / "out" / "ref_adapter.safetensors"
    assert f"done: {output}" in text and "reference image" in text and "<lora:" not in text
    loaded = load_adapter(output)
    assert isinstance(loaded, LoadedIPAdapter) and loaded.variant is IPProjection.PLUS and loaded.projection.num_tokens == 16


def test_the_cli_trains_a_faceid_that_our_loader_reads(tmp_path, monkeypatch, capsys):
    """--ip-projection faceid with insightface's pack found through --ip-face-models (none given and none in
    ~/.insightface/models: exit 2 before the model loads, saying where the pack goes)."""
    from PIL import Image

    from face.face_pack import face_image, write_pack
    from lib_adapters.formats.adapter_file import load_adapter
    from lib_adapters.formats.faceid import LoadedFaceIDAdapter
    from lib_adapters.models.faceid import FaceIDVariant

    (tmp_path / "ds" / "1_me").mkdir(parents=True)
    for seed in (1, 2):
        Image.fromarray(face_image(seed)).save(tmp_path / "ds" / "1_me" / f"{seed}.png")
        (tmp_path / "ds" / "1_me" / f"{seed}.txt").write_text("a portrait of me")
    faceid = ["--steps", "2", "--method", "ip_adapter", "--ip-projection", "faceid", "--ip-lora-rank", "4"]
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.insightface/models, and this checkout is in no WebUI
    with monkeypatch.context() as m:
        m.setattr(cli, "load_backend", lambda *a, **k: pytest.fail("the model was loaded"))
        code, _ = _run(tmp_path, *faceid, name="me", lora=False)
    err = capsys.readouterr().err
    assert code == cli.EXIT_INPUT and "put the 'buffalo_l' pack in models/insightface/models/buffalo_l/" in err, err
    assert "--ip-face-models DIR" in err and "non-commercial" in err and "Traceback" not in err

    packs = write_pack(tmp_path / "webui_models").parent
    code, text = _run(tmp_path, *faceid, "--ip-face-models", str(packs), name="me", lora=False)
    assert code == cli.EXIT_OK, text
    output = tmp_path / "out" / "me.safetensors"
    assert f"done: {output}" in text and "models/adapters" in text and "<lora:" not in text
    loaded = load_adapter(output)
    assert isinstance(loaded, LoadedFaceIDAdapter) and loaded.variant is FaceIDVariant.FACEID
    assert loaded.config.num_tokens == 4 and {lora.rank for lora in loaded.lora.values()} == {4}
    assert len(list((tmp_path / "out" / "cache").rglob("*.faceemb"))) == 2  # each image's embedding, kept


def test_bad_output_names_and_wrong_named_files_exit_2_before_the_model_loads(tmp_path, monkeypatch):
    from lib_adapters.training.methods.lora_file import save_lora
    make_shapes_dataset(tmp_path / "ds", "1_x", count=1)
    lora = tmp_path / "a_lora.safetensors"
    save_lora(lora, {"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 4),
                     "lora_unet_a.alpha": torch.tensor(4.0)}, {})
    monkeypatch.setattr(cli, "load_backend", lambda *a, **k: pytest.fail("the model was loaded"))
    t2i = ["--method", "t2i_adapter", "--t2i-condition", "canny", "--t2i-condition-channels", "1",
           "--t2i-preprocessor", "canny"]
    for name, argv, words in (("a\x01b", [], "control characters"), ("x" * 121, [], "at most 120 characters"),
                              ("ok", [*t2i, "--t2i-init-from", str(lora)],
                               f"t2i_init_from: {lora} cannot be used: a_lora: this is a LoRA file, not a T2I-Adapter"),
                              ("ok", ["--method", "ip_adapter", "--ip-image-encoder", str(lora)],
                               f"ip_image_encoder: {lora} cannot be used: it holds a LoRA file")):
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        code = cli.main(["--dataset", str(tmp_path / "ds"), "--output-dir", str(tmp_path / "out"), "--name", name,
                         *argv])
        assert code == cli.EXIT_INPUT and words in err.getvalue(), (name, err.getvalue())
        assert "Traceback" not in err.getvalue()
