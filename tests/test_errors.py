"""One error family: every error class glm4v_core defines subclasses GLM4VError (a ValueError), every
one of glm4v_conversion's subclasses ConversionError, and the top level exports each of them."""
import ast
import importlib

from helpers.paths import ROOT

import glm4v_core
from glm4v_conversion.errors import ConversionError
from glm4v_core import GLM4VError


def error_classes(package: str, folder) -> list[tuple[str, str]]:
    """(module, class) for every class named *Error defined in the folder's modules."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        module = ".".join((package, *(p for p in parts if p != "__init__")))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                found.append((module, node.name))
    return found


def test_every_glm4v_core_error_is_a_glm4v_error_and_exported():
    classes = error_classes("glm4v_core", ROOT / "src" / "glm4v_core")
    assert len(classes) >= 20
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, GLM4VError) and issubclass(cls, ValueError), f"{module}.{name}"
        assert getattr(glm4v_core, name) is cls, f"glm4v_core.{name} is not exported"


def test_every_conversion_error_is_a_conversion_error_and_refused_by_the_commands():
    for module, name in error_classes("glm4v_conversion", ROOT / "conversion"):
        assert issubclass(getattr(importlib.import_module(module), name), ConversionError), f"{module}.{name}"
    assert glm4v_core.REFUSED == (GLM4VError, ConversionError)
    assert glm4v_core.ConversionError is ConversionError


def test_a_genuine_bug_is_not_refused():
    """A plain ValueError (a bug, or torch's own) is not in the family: the commands let it through."""
    assert not isinstance(ValueError("shape mismatch"), glm4v_core.REFUSED)
