"""The dependency rule of design.md, enforced on the source: scripts -> lib_adapters.webui -> core, and no import
cycle inside lib_adapters."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


# -- import cycles ------------------------------------------------------------------------------------------------
PACKAGE = ROOT / "lib_adapters"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imported(name: str, path: Path) -> set[str]:
    """Every lib_adapters module ``name`` imports, at module level or inside functions (a cycle of lazy imports is
    still a cycle: it only hides which side owns what)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in MODULES:  # an attribute: its module
                candidate = candidate.rpartition(".")[0]
            if candidate.startswith("lib_adapters") and candidate != name:
                found.add(candidate)
    return found


IMPORTS = {name: _imported(name, path) for name, path in MODULES.items()}
PACKAGES = sorted(name for name, path in MODULES.items() if path.name == "__init__.py")


def _child(package: str, module: str) -> str | None:
    """The direct child of ``package`` (a module or a sub-package) that holds ``module``."""
    if not module.startswith(package + "."):
        return None
    return package + "." + module[len(package) + 1:].split(".")[0]


def _cycles(package: str) -> list[set[str]]:
    """Groups of ``package``'s direct children that import each other (strongly connected components)."""
    edges: dict[str, set[str]] = {}
    for module, imported in IMPORTS.items():
        source = _child(package, module)
        for target in filter(None, (_child(package, i) for i in imported)):
            if source is not None and target != source:
                edges.setdefault(source, set()).add(target)
    reach = {node: _reachable(node, edges) for node in edges}
    groups = {frozenset(n for n in reach if n in reach[node] and node in reach[n]) | {node} for node in reach}
    return sorted((set(g) for g in groups if len(g) > 1), key=sorted)


def _reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_between_the_parts_of_a_package(package):
    """Inside every package, its modules and sub-packages import one another one way only (design.md's layers)."""
    cycles = _cycles(package)
    assert cycles == []


def test_the_cycle_check_finds_a_lazy_cycle(tmp_path, monkeypatch):
    """The check above is not vacuous: an import inside a function is read, relative to its package, and two modules
    importing each other that way are a cycle."""
    lazy = tmp_path / "a.py"
    lazy.write_text("def f():\n    from ..training.loop import train\n    from . import cli\n")
    assert _imported("lib_adapters.training.a", lazy) == {"lib_adapters.training.loop", "lib_adapters.training.cli"}
    monkeypatch.setitem(IMPORTS, "lib_adapters.x.a", {"lib_adapters.x.b.c"})
    monkeypatch.setitem(IMPORTS, "lib_adapters.x.b.c", {"lib_adapters.x.a"})
    assert _cycles("lib_adapters.x") == [{"lib_adapters.x.a", "lib_adapters.x.b"}]


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


def _part(module: str) -> str:
    """The first level under lib_adapters ("formats", "errors", ...); "" for the package itself."""
    return (module.split(".") + [""])[1]


def test_the_inference_side_imports_one_way():
    offenders = {}
    for part, allowed in INFERENCE_SIDE.items():
        used = {_part(i) for name, imported in IMPORTS.items() if _part(name) == part for i in imported} - {part}
        if used - allowed:
            offenders[part] = sorted(used - allowed)
    assert offenders == {}
