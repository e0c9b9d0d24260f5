"""The dependency rules of DESIGN.md, checked on every module's imports (parsed, never imported).

pipeline -> extract, generator, cache; extract -> cache; generator -> cache; cache -> nothing of
ours. Every import statement counts, also those inside functions; relative imports are resolved
against the module's package, so `from ..generator import x` in extract/ is caught.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("cache", "extract", "generator", "pipeline")

# folder -> import prefixes its modules may not use
FORBIDDEN = {
    # "depends on nothing else of ours"; scoring from cached tokens never needs CLIP or decord
    "cache": ("diffret.extract", "diffret.generator", "diffret.pipeline", "open_clip", "decord"),
    "generator": ("open_clip", "decord", "diffret.extract", "diffret.pipeline"),
    "extract": ("diffret.generator", "diffret.pipeline"),
    "pipeline": (),
}


def module_name(path: Path) -> str:
    """diffret.<folder>.<...> of a source file (a package's __init__.py names the package)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("diffret",) + (parts[:-1] if parts[-1] == "__init__" else parts))


def imported_names(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, relative ones resolved.

    `from a import b` yields a.b (b may be a submodule); `__import__("m")` and
    `importlib.import_module("m")` with a literal name yield m.
    """
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{module} line {node.lineno}: relative import beyond the top package")
                anchor = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base else anchor
            out += [(node.lineno, base if a.name == "*" else f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in ("__import__", "import_module"):
                out.append((node.lineno, node.args[0].value))
    return out


def sources(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def breaks(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_resolver_on_examples():
    """The checker itself: relative imports resolve from modules and from packages."""
    src = ("from ..generator import sampler\nfrom . import video\nfrom .annotations.base import Caption\n"
           "def f():\n    import decord\n")
    assert [n for _, n in imported_names(src, "diffret.extract.stage1", False)] == [
        "diffret.generator.sampler", "diffret.extract.video", "diffret.extract.annotations.base.Caption", "decord"]
    assert [n for _, n in imported_names("from .base import Caption\nfrom ... import pipeline\n",
                                         "diffret.extract.annotations", True)] == [
        "diffret.extract.annotations.base.Caption", "diffret.pipeline"]
    assert [n for _, n in imported_names("from .x import *\n", "diffret.cache.wti", False)] == ["diffret.cache.x"]
    assert imported_names("import importlib\nimportlib.import_module('open_clip')\n", "diffret.cache.a", False)[1] \
        == (2, "open_clip")
    assert breaks("diffret.generator.sampler", FORBIDDEN["extract"])
    assert not breaks("diffret.generatorx", FORBIDDEN["extract"]) and not breaks("diffret.cache.wti", FORBIDDEN["extract"])
    with pytest.raises(ValueError, match="beyond the top package"):
        imported_names("from ... import x\n", "diffret.cache.wti", False)


@pytest.mark.parametrize("folder", FOLDERS)
def test_folder_keeps_the_dependency_rules(folder):
    files = sources(folder)
    assert files, f"no modules found under {folder}/"
    broken = []
    for path in files:
        for line, name in imported_names(path.read_text(encoding="utf-8"), module_name(path),
                                         path.name == "__init__.py"):
            if breaks(name, FORBIDDEN[folder]):
                broken.append(f"{path.relative_to(ROOT)} line {line}: imports {name}")
    assert not broken, f"{folder}/ breaks DESIGN.md's dependency rules:\n" + "\n".join(broken)


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_module_imports_private_names(folder):
    """`from <our module> import _name` reaches into another module's internals."""
    broken = []
    for path in sources(folder):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("diffret")):
                broken += [f"{path.relative_to(ROOT)} line {node.lineno}: {a.name}" for a in node.names
                           if a.name.startswith("_") and not a.name.startswith("__")]
    assert not broken, "private names imported across modules:\n" + "\n".join(broken)
