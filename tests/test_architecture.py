"""The dependency rule of design.md, enforced on the source: scripts -> lib_adapters.webui -> core."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEBUI_ONLY = {"modules", "gradio", "launch"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _core_files() -> list[Path]:
    return [p for p in (ROOT / "lib_adapters").rglob("*.py") if "webui" not in p.relative_to(ROOT).parts]


def test_core_never_imports_the_webui_or_gradio():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.split(".")[0] in WEBUI_ONLY)
                 for p in _core_files()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_core_never_imports_the_webui_glue():
    offenders = [str(p.relative_to(ROOT)) for p in _core_files()
                 if any(n.startswith("lib_adapters.webui") for n in _imports(p))
                 or "from .webui" in p.read_text() or "from ..webui" in p.read_text()]
    assert offenders == []


def test_scripts_only_reach_the_core_through_the_webui_package():
    for path in (ROOT / "scripts").glob("*.py"):
        ours = [n for n in _imports(path) if n.startswith("lib_adapters")]
        assert ours and all(n.startswith("lib_adapters.webui") for n in ours), (path.name, ours)


def test_importing_the_core_has_no_side_effects():
    """Importing every core module loads no WebUI, gradio or controlnet-aux, and touches no files."""
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in _core_files())
    code = (
        "import sys, builtins\n"
        "opened = []\n"
        "real_open = builtins.open\n"
        "builtins.open = lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1]\n"
        f"for name in {modules!r}:\n"
        "    __import__(name)\n"
        "builtins.open = real_open\n"
        "bad = [m for m in ('modules', 'gradio', 'controlnet_aux', 'diffusers') if m in sys.modules]\n"
        "ours = [f for f in opened if not any(s in f for s in ('lib_adapters', 'site-packages', 'python3', '/proc/'))]\n"
        "print(bad, ours)\n"
        "assert not bad and not ours, (bad, ours)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the inference side's layers (issue 11 §4) ----------------------------------------------------------------------
# What each part of the inference side may import of lib_adapters (itself aside): one direction only, so no cycle
# can form between them. unet/ holds the host bindings and never imports inference/: a binding drives the session
# through the UNetPoints interface (unet/points.py) the session implements.
INFERENCE_SIDE = {
    "errors": set(), "arch": {"errors"}, "models": {"errors"},
    "unet": {"errors", "arch"}, "formats": {"errors", "arch", "models", "unet"},
    "preprocess": {"errors", "formats"}, "face": {"errors", "preprocess"}, "catalog": {"errors", "formats"},
    "inference": {"errors", "arch", "models", "unet", "formats", "preprocess", "face", "catalog"},
}


def _lib_imports(path: Path) -> set[str]:
    """Every lib_adapters module ``path`` imports (absolute, or relative resolved against its package), anywhere."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + [base] if base else parent)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("lib_adapters.")}


def _part(name: str) -> str:
    return name.split(".")[1].removesuffix(".py")


def test_the_inference_side_imports_one_way():
    offenders = {}
    for part, allowed in INFERENCE_SIDE.items():
        files = list((ROOT / "lib_adapters" / part).rglob("*.py")) or [ROOT / "lib_adapters" / f"{part}.py"]
        used = {_part(name) for path in files for name in _lib_imports(path)} - {part}
        if used - allowed:
            offenders[part] = sorted(used - allowed)
    assert offenders == {}


def test_no_module_of_the_inference_side_imports_itself_back():
    """Inside each part, modules import one another one way (a cycle of modules, lazy imports included)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p
               for part in INFERENCE_SIDE for p in (ROOT / "lib_adapters" / part).rglob("*.py")}
    graph = {name: {m for m in modules if any(i == m or i.startswith(m + ".") for i in _lib_imports(path))} - {name}
             for name, path in modules.items()}
    cycles = [(a, b) for a in graph for b in graph[a] if a in _reach(b, graph)]
    assert cycles == []


def _reach(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen
