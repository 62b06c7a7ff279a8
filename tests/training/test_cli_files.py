"""Nothing is lost by the command-line trainer: an existing ``<name>.safetensors`` of another run is replaced only
with ``--overwrite`` (exit 2 otherwise, before the model loads) while a resumed run may replace its own; every earlier
run's checkpoints are set aside under names of their own; temporary files of a killed run are removed at the next
start of that name, and no other file; written files get the umask's usual permissions; a full disk exits 3 with the
file and the free space named, keeping the last good checkpoint."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from test_cli import BASE as CLI_BASE
from test_cli import _run as cli_run
from train_helpers import make_shapes_dataset

pytest.importorskip("diffusers")

from lib_adapters.training import cli  # noqa: E402
from lib_adapters.training.run_checkpoints import latest_checkpoint, read_state  # noqa: E402
from lib_adapters.training.cli_args import build_parser, request_from_args  # noqa: E402
from lib_adapters.training.methods import lora_file  # noqa: E402
from lib_adapters.training.methods.lora_file import load_lora  # noqa: E402
from lib_adapters.training.outputs import atomic_write  # noqa: E402


def _run(tmp_path: Path, *extra: str, name: str = "run") -> tuple[int, str]:
    return cli_run(tmp_path, "--lora-rank", "2", *extra, name=name)


@pytest.fixture
def dataset(tmp_path):
    make_shapes_dataset(tmp_path / "ds", "1_shapes", count=2)
    return tmp_path / "ds"


def test_an_existing_output_is_refused_before_loading_unless_overwrite(tmp_path, dataset, monkeypatch, capsys):
    code, text = _run(tmp_path, "--steps", "2")
    assert code == cli.EXIT_OK, text
    output = tmp_path / "out" / "run.safetensors"
    first = output.read_bytes()
    loads = []
    monkeypatch.setattr(cli, "load_backend", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    code, _ = _run(tmp_path, "--steps", "2", "--seed", "4")
    error = capsys.readouterr().err
    assert code == cli.EXIT_INPUT and loads == [] and output.read_bytes() == first
    assert f"{output} already exists" in error and "another output name" in error and "--overwrite" in error
    assert "Traceback" not in error
    monkeypatch.undo()
    code, text = _run(tmp_path, "--steps", "2", "--seed", "4", "--overwrite")
    assert code == cli.EXIT_OK, text
    assert output.read_bytes() != first and load_lora(output)[1]["ss_seed"] == "4"


def test_resume_replaces_its_own_file_but_not_another_runs(tmp_path, dataset, capsys):
    code, _ = _run(tmp_path, "--steps", "2")
    output = tmp_path / "out" / "run.safetensors"
    run_id = load_lora(output)[1]["ss_session_id"]
    assert code == cli.EXIT_OK and read_state(latest_checkpoint(_config(tmp_path, "2"))).session_id == run_id
    code, text = _run(tmp_path, "--steps", "3", "--resume")  # the same run, longer: its own file
    assert code == cli.EXIT_OK, text
    assert load_lora(output)[1]["ss_steps"] == "3" and load_lora(output)[1]["ss_session_id"] == run_id

    lora_file.save_lora(output, {"x.alpha": torch.tensor(1.0)}, {"ss_session_id": "someone else"})
    theirs = output.read_bytes()
    capsys.readouterr()
    code, _ = _run(tmp_path, "--steps", "4", "--resume")
    assert code == cli.EXIT_INPUT and "already exists" in capsys.readouterr().err and output.read_bytes() == theirs


def _config(tmp_path: Path, steps: str, name: str = "run"):
    args = build_parser().parse_args(["--dataset", str(tmp_path / "ds"), "--output-dir", str(tmp_path / "out"),
                                      "--name", name, *CLI_BASE, "--steps", steps])
    return request_from_args(args).to_config(args.output_dir)


def test_fresh_runs_set_every_earlier_runs_checkpoints_aside(tmp_path, dataset):
    out = tmp_path / "out"
    sessions = []
    for seed in ("1", "2", "3"):
        code, text = _run(tmp_path, "--steps", "2", "--save-every", "1", "--seed", seed, "--overwrite")
        assert code == cli.EXIT_OK, text
        sessions.append(load_lora(out / "run.safetensors")[1]["ss_session_id"])
    aside = sorted(p for p in out.iterdir() if p.name.startswith("run-checkpoints-"))
    assert len(aside) == 2 and "are kept in" in text
    for folder in aside + [out / "run-checkpoints"]:
        assert sorted(p.name for p in folder.iterdir()) == [
            f"run-step00000{i}{s}" for i in (1, 2) for s in (".safetensors", ".state")]
    kept = {read_state(folder / "run-step000002.state").session_id for folder in aside}
    assert kept == set(sessions[:2])  # both earlier runs, none mixed into the newest run's folder
    assert read_state(latest_checkpoint(_config(tmp_path, "2"))).session_id == sessions[2]


def test_a_killed_runs_temporary_files_of_that_name_only_are_removed_at_its_next_start(tmp_path, dataset):
    out = tmp_path / "out"
    checkpoints = out / "run-checkpoints"
    checkpoints.mkdir(parents=True)
    ours = [out / ".run.safetensors.a1b2c3d4.tmp", out / ".run.safetensors.x_9kq0zz.tmp",  # mkstemp's leftovers
            checkpoints / ".run-step000004.state.0f0f0f0f.tmp",
            checkpoints / ".run-step000004.safetensors.abcdefgh.tmp"]
    others = [out / ".other.safetensors.a1b2c3d4.tmp", out / ".run.safetensors.tmp",
              out / "run.safetensors.a1b2c3d4.tmp", out / ".run.safetensors.a1b2c3d4.tmp.keep",
              out / ".run.state.a1b2c3d4.tmp", out / "notes.tmp",
              checkpoints / ".other-step000004.state.0f0f0f0f.tmp", checkpoints / "run-step000004.safetensors"]
    for path in ours + others:
        path.write_bytes(b"x")
    code, text = _run(tmp_path, "--steps", "1", "--resume", str(checkpoints / "nothing.state"))
    assert code == cli.EXIT_INPUT and all(p.exists() for p in ours)  # refused: nothing started, nothing touched
    code, text = _run(tmp_path, "--steps", "1")
    assert code == cli.EXIT_OK, text
    assert not any(p.exists() for p in ours) and all(p.exists() or p.parent == checkpoints for p in others)
    aside = next(p for p in out.iterdir() if p.name.startswith("run-checkpoints-"))  # the stray files went with it
    assert sorted(p.name for p in aside.iterdir()) == [".other-step000004.state.0f0f0f0f.tmp",
                                                       "run-step000004.safetensors"]
    assert sum(f"removed {p}" in text for p in ours) == 4


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_get_the_permissions_a_plain_open_gives(tmp_path, dataset, umask, mode):
    previous = os.umask(umask)
    try:
        code, text = _run(tmp_path, "--steps", "1")
        atomic_write(tmp_path / "plain.bin", lambda tmp: Path(tmp).write_bytes(b"1"))
    finally:
        os.umask(previous)
    assert code == cli.EXIT_OK, text
    state = latest_checkpoint(_config(tmp_path, "1"))
    for path in (tmp_path / "out" / "run.safetensors", state, state.with_suffix(".safetensors"),
                 tmp_path / "plain.bin"):
        assert path.stat().st_mode & 0o777 == mode, path


def _full_disk_at(monkeypatch, fails):
    """The writers of weights (safetensors) and states (torch.save) raise ENOSPC for the files ``fails(path)`` picks,
    after writing part of them, as they do on a full disk."""
    def failing(real):
        def write(obj, tmp, *args, **kwargs):
            if isinstance(tmp, (str, Path)) and fails(Path(tmp).parent / Path(tmp).name[1:].rsplit(".", 2)[0]):
                Path(tmp).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
            return real(obj, tmp, *args, **kwargs)
        return write

    monkeypatch.setattr(lora_file, "save_file", failing(lora_file.save_file))
    monkeypatch.setattr(torch, "save", failing(torch.save))


@pytest.mark.parametrize("part", ["safetensors", "state"])
def test_a_full_disk_at_a_checkpoint_exits_3_naming_the_file_and_keeps_the_last_good_one(tmp_path, dataset, part,
                                                                                        monkeypatch, capsys):
    _full_disk_at(monkeypatch, lambda path: path.name == f"run-step000004.{part}")
    code, _ = _run(tmp_path, "--steps", "6", "--save-every", "2")
    error = capsys.readouterr().err
    checkpoints = tmp_path / "out" / "run-checkpoints"
    assert code == cli.EXIT_DISK_FULL == 3
    assert f"the disk is full: {checkpoints / f'run-step000004.{part}'} could not be written (" in error
    assert "MiB free on that disk" in error and "Traceback" not in error
    assert f"the last good checkpoint {checkpoints / 'run-step000002.state'} is kept: --resume" in error
    # no partial file, and no weights without their state (they would only hold space)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["run-step000002.safetensors", "run-step000002.state"]
    monkeypatch.undo()
    code, text = _run(tmp_path, "--steps", "6", "--save-every", "2", "--resume")
    assert code == cli.EXIT_OK, text
    assert load_lora(tmp_path / "out" / "run.safetensors")[1]["ss_steps"] == "6"


def test_a_full_disk_at_the_final_export_keeps_the_final_checkpoint(tmp_path, dataset, monkeypatch, capsys):
    _full_disk_at(monkeypatch, lambda path: path.name == "run.safetensors")
    code, _ = _run(tmp_path, "--steps", "2")
    error = capsys.readouterr().err
    output = tmp_path / "out" / "run.safetensors"
    assert code == cli.EXIT_DISK_FULL and f"{output} could not be written" in error
    assert "run-step000002.state is kept" in error and not output.exists()
    assert not any(p.name.endswith(".tmp") for p in output.parent.iterdir())
    monkeypatch.undo()
    code, text = _run(tmp_path, "--steps", "2", "--resume")
    assert code == cli.EXIT_OK, text
    assert load_lora(output)[1]["ss_steps"] == "2"
