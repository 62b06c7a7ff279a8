"""The command line's closing summary covers the whole run: after Ctrl-C and ``--resume`` it gives the same loss
means of the first and last tenth, step count and (summed) time as the uninterrupted run; a checkpoint written before
the loss record existed still resumes, and the summary says which steps it covers."""
from __future__ import annotations

import re

import pytest
import torch
from test_cli import _run
from train_helpers import make_shapes_dataset

pytest.importorskip("diffusers")

from lib_adapters.training import cli  # noqa: E402

SUMMARY = re.compile(r"loss: mean of the first (\d+) step\(s\) ([\d.]+) -> last (\d+) step\(s\) ([\d.]+) \((.*)\)")


def _summary(text: str) -> tuple:
    (line,) = [m for m in map(SUMMARY.search, text.splitlines()) if m]
    return line.groups()


def _stop_after(monkeypatch, step: int) -> None:
    original = cli.ConsoleCallbacks.on_progress

    def press_ctrl_c(self, progress):  # what SIGINT's handler does, at a known step
        original(self, progress)
        if progress.step == step:
            self.request_stop()

    monkeypatch.setattr(cli.ConsoleCallbacks, "on_progress", press_ctrl_c)


def test_a_resumed_runs_summary_covers_every_step_of_the_run(tmp_path, monkeypatch):
    make_shapes_dataset(tmp_path / "ds", "2_shapes")
    code, text = _run(tmp_path, "--steps", "10", name="full")
    assert code == cli.EXIT_OK, text
    full = _summary(text)
    assert full[0] == full[2] == "1" and full[4].startswith("10 steps in ")

    _stop_after(monkeypatch, 4)
    code, text = _run(tmp_path, "--steps", "10", name="cut")
    assert code == cli.EXIT_INTERRUPTED and _summary(text)[4].startswith("4 steps in ")
    monkeypatch.undo()
    _stop_after(monkeypatch, 7)
    code, text = _run(tmp_path, "--steps", "10", "--resume", name="cut")
    assert code == cli.EXIT_INTERRUPTED and _summary(text)[4].startswith("7 steps in ")
    monkeypatch.undo()
    code, text = _run(tmp_path, "--steps", "10", "--resume", name="cut")
    assert code == cli.EXIT_OK, text
    resumed = _summary(text)
    # the same losses (exact resume), so the same means, over the same 10 steps: not the last session's 3
    assert resumed[:4] == full[:4] and resumed[4].startswith("10 steps in ") and resumed[4].endswith("the whole run")
    state = torch.load(tmp_path / "out" / "cut-checkpoints" / "cut-step000010.state", weights_only=True)
    assert state["losses"].dtype == torch.float32 and state["losses"].shape == (10,)
    assert state["seconds"] > 0


def test_a_checkpoint_from_before_the_loss_record_resumes_and_the_summary_says_what_it_covers(tmp_path, monkeypatch):
    make_shapes_dataset(tmp_path / "ds", "2_shapes")
    _stop_after(monkeypatch, 3)
    assert _run(tmp_path, "--steps", "6", name="old")[0] == cli.EXIT_INTERRUPTED
    monkeypatch.undo()
    path = tmp_path / "out" / "old-checkpoints" / "old-step000003.state"
    state = torch.load(path, weights_only=True)
    for key in ("losses", "seconds", "session_id"):  # as the states of earlier versions were written
        del state[key]
    torch.save(state, path)
    code, text = _run(tmp_path, "--steps", "6", "--resume", name="old")
    assert code == cli.EXIT_OK, text
    assert _summary(text)[4].startswith("steps 4..6 in ") and "has no record of the earlier losses" in text
