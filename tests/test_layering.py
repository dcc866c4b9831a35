"""The package's layering rules (docs/architecture.md, "Layering"), read from the source with `ast`.

- model/ imports nothing of glm4v_core outside model/, config and errors; glm4v_kernels only through
  model/ops.py. So the model never imports a transform (quantization, LoRA, distributed plans).
- No library module imports a command module (cli.py, */cli.py, */*_cli.py).
- glm4v_conversion imports neither glm4v_core nor glm4v_kernels; glm4v_kernels imports no glm4v_core.
- No import cycle anywhere; imports inside functions count (only `if TYPE_CHECKING:` blocks do not).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers.paths import ROOT

PACKAGES = {"glm4v_core": ROOT / "src" / "glm4v_core", "glm4v_kernels": ROOT / "kernels",
            "glm4v_conversion": ROOT / "conversion"}
MODEL_MAY_IMPORT = ("glm4v_core.model", "glm4v_core.config", "glm4v_core.errors")


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Every module of the packages by dotted name (a package is its __init__)."""
    files = {}
    for name, root in packages.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((name, *parts))] = path
    return files


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules `name` imports, at module level or inside functions."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    skip: set[int] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if _type_checking_only(node):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    files = module_files(packages)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def is_command(module: str) -> bool:
    """A command module: cli.py or NAME_cli.py (the flags, messages and exit codes of one command)."""
    leaf = module.rpartition(".")[2]
    return leaf == "cli" or leaf.endswith("_cli")


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if module.startswith("glm4v_core.model") and target.startswith("glm4v_core"):
                if not target.startswith(MODEL_MAY_IMPORT):
                    found.append(f"{module} imports {target}: model/ imports only model/, config and errors")
            kernels_from_core = target.startswith("glm4v_kernels") and module.startswith("glm4v_core")
            if kernels_from_core and module != "glm4v_core.model.ops":
                found.append(f"{module} imports {target}: the kernels are reached only through glm4v_core.model.ops")
            if is_command(target) and not is_command(module) and not module.endswith("__main__"):
                found.append(f"{module} imports the command module {target}")
            if module.startswith("glm4v_conversion") and not target.startswith("glm4v_conversion"):
                found.append(f"{module} imports {target}: glm4v_conversion is the lowest layer")
            if module.startswith("glm4v_kernels") and target.startswith("glm4v_core"):
                found.append(f"{module} imports {target}: the kernels know nothing of the model package")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, as the list of modules around it (depth-first search)."""
    found, done, stack = [], set(), []

    def visit(module: str) -> None:
        if module in stack:
            found.append([*stack[stack.index(module):], module])
            return
        if module in done:
            return
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            visit(target)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGES)


def test_the_graph_sees_every_room(graph):
    assert {"glm4v_core.model.glm4v", "glm4v_core.transforms.lora", "glm4v_core.parity.cli",
            "glm4v_kernels", "glm4v_conversion.atomic"} <= set(graph)
    assert "glm4v_core.model.ops" in graph["glm4v_core.model.decoder"]
    assert "glm4v_core.transforms.distributed" in graph["glm4v_core.cli"]  # a function-level import counts


def test_the_rules_hold(graph):
    assert violations(graph) == []


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_a_deliberate_violation_is_seen(tmp_path):
    """The checker itself: a model module importing a transform, a library module importing a command,
    and a function-level cycle are each reported."""
    root = tmp_path / "glm4v_core"
    for room in ("model", "transforms", "training"):
        (root / room).mkdir(parents=True)
        (root / room / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "model" / "glm4v.py").write_text("from glm4v_core.transforms.quant import QuantLinear\n")
    (root / "transforms" / "quant.py").write_text("def f():\n    from glm4v_core.training import cli\n")
    (root / "training" / "cli.py").write_text("import glm4v_core.model.glm4v\n")
    graph = import_graph({"glm4v_core": root})
    found = violations(graph)
    assert any("model.glm4v imports glm4v_core.transforms.quant" in v for v in found), found
    assert any("transforms.quant imports the command module glm4v_core.training.cli" in v for v in found), found
    assert cycles(graph) == [["glm4v_core.model.glm4v", "glm4v_core.transforms.quant", "glm4v_core.training.cli",
                              "glm4v_core.model.glm4v"]]


def test_no_module_over_400_lines():
    """One job per file: a module that grows past 400 lines is split by job."""
    long = {name: n for name, path in module_files({"glm4v_core": PACKAGES["glm4v_core"]}).items()
            if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}, long
