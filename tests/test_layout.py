"""The folders name the stages of the data path; a module may import only its own
folder or folders below it. This walks every import (function-level ones too) so the
layout stays true as modules are added."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "offload_engine"
# Low to high. "" is the package root (errors, units, version): usable by everyone.
STAGES = ["", "quant", "kernels", "model", "checkpoint", "planning", "runtime", "decode",
          "quality", "server", "cli"]
# The root __init__ is the public facade: it lazily re-exports the top of the stack.
FACADES = {"__init__.py", "__main__.py"}


def _stage_of(module: str) -> str:
    """'offload_engine.runtime.cache.arena' -> 'runtime'; root modules -> ''."""
    parts = module.split(".")[1:]
    if len(parts) >= 1 and parts[0] in STAGES:
        return parts[0]
    return ""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported_modules(path: Path):
    """(line, absolute module) for every import of offload_engine in the file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    return _imports(path.read_text(), package)


def _imports(source: str, package: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("offload_engine"):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("offload_engine"):
                target = node.module
            else:
                continue
            if node.module is None or target == "offload_engine":  # `from . import x`
                for alias in node.names:
                    yield node.lineno, f"{target}.{alias.name}"
            else:
                yield node.lineno, target


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_folder_is_a_known_stage():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(STAGES), f"add {folders - set(STAGES)} to STAGES in its place"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_data_path(path):
    if path.parent == PACKAGE and path.name in FACADES:
        return
    own = STAGES.index(_stage_of(_module_name(path)))
    upward = [f"line {line}: {target}" for line, target in _imported_modules(path)
              if STAGES.index(_stage_of(target)) > own]
    assert not upward, (f"{path.relative_to(PACKAGE)} ({STAGES[own] or 'root'}) imports from a "
                        f"higher stage: {upward}; move the shared piece down instead")


def test_the_walk_sees_upward_imports():
    """The check itself: imports inside functions, relative and absolute, are resolved."""
    source = ("def f():\n    from ..decode import generate\n"
              "import offload_engine.cli.main\nfrom . import store\nfrom ...errors import X\n")
    found = {target for _, target in _imports(source, "offload_engine.runtime.cache")}
    assert found == {"offload_engine.runtime.decode", "offload_engine.cli.main",
                     "offload_engine.runtime.cache.store", "offload_engine.errors"}
    upward = {t for _, t in _imports("def f():\n    from ..decode import x\n",
                                     "offload_engine.runtime")}
    assert upward == {"offload_engine.decode"}
    assert STAGES.index(_stage_of("offload_engine.decode")) > STAGES.index("runtime")


def test_every_folder_says_what_it_may_use():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) >= 2, f"{init}: a two-line docstring, please"
