"""Fake of ``modules/launch_utils.py``: what an extension's ``install.py`` calls through ``launch``.

No subprocess is ever started: ``run`` and ``run_pip`` append to :data:`run_calls` /
:data:`run_pip_calls` and return ``""`` so a test can run an ``install.py`` and assert what it would
install. ``run_pip`` is still a no-op when ``args.skip_install`` is set, like the real one (then
nothing is recorded). ``is_installed`` is the real lookup (importlib metadata, then ``find_spec``).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass

from modules import cmd_args, paths_internal
from modules.paths_internal import extensions_dir, script_path  # noqa: F401

args, _ = cmd_args.parser.parse_known_args([])

python = sys.executable
git = os.environ.get("GIT", "git")
index_url = os.environ.get("INDEX_URL", "")
dir_repos = "repositories"
default_command_live = os.environ.get("WEBUI_LAUNCH_LIVE_OUTPUT") == "1"


@dataclass
class RunCall:
    command: str
    desc: str | None
    errdesc: str | None
    live: bool


@dataclass
class PipCall:
    command: str
    desc: str | None
    live: bool


run_calls: list[RunCall] = []
run_pip_calls: list[PipCall] = []


def reset_calls() -> None:
    run_calls.clear()
    run_pip_calls.clear()


def commit_hash() -> str:
    return "82a973c04367123ae98bd9abdf80d9eda9b910e2"


def git_tag() -> str:
    return "v1.10.1"


def run(command: str, desc: str | None = None, errdesc: str | None = None, custom_env=None,
        live: bool = default_command_live) -> str:
    """Record the shell command (the real one runs it and raises RuntimeError on failure)."""
    if desc is not None:
        print(desc)
    run_calls.append(RunCall(command, desc, errdesc, live))
    return ""


def is_installed(package: str) -> bool:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def repo_dir(name: str) -> str:
    return os.path.join(paths_internal.script_path, dir_repos, name)


def run_pip(command: str, desc: str | None = None, live: bool = default_command_live):
    """Record ``pip <command>`` (the real one runs ``python -m pip <command> --prefer-binary``)."""
    if args.skip_install:
        return None
    run_pip_calls.append(PipCall(command, desc, live))
    index_url_line = f" --index-url {index_url}" if index_url != "" else ""
    return run(f'"{python}" -m pip {command} --prefer-binary{index_url_line}', desc=f"Installing {desc}",
               errdesc=f"Couldn't install {desc}", live=live)


def check_run_python(code: str) -> bool:
    """The real one runs ``python -c code``; the stub evaluates nothing and answers True."""
    return True


def git_clone(url: str, dir: str, name: str, commithash: str | None = None) -> None:
    run(f'"{git}" clone "{url}" "{dir}"', f"Cloning {name} into {dir}...", f"Couldn't clone {name}")


def git_pull_recursive(dir: str) -> None:
    """Not needed by tests."""


def list_extensions(settings_file: str) -> list[str]:
    root = paths_internal.extensions_dir
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def run_extension_installer(extension_dir: str) -> None:
    """The real one runs ``install.py`` in a subprocess; tests should ``runpy.run_path`` it instead."""


def prepare_environment() -> None:
    """Nothing to prepare."""


def configure_for_tests() -> None:
    """Nothing to configure."""


def start() -> None:
    raise RuntimeError("the stub WebUI cannot be started")
