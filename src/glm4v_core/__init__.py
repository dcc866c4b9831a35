"""glm4v-core: a readable, exact, fast PyTorch reimplementation of GLM-4V-9B.

The public names below are imported on first use (a module-level __getattr__), so that
`import glm4v_core.config` or `glm4v_core.tokenizer` does not pull in torch and triton.
"""
import sys
import types
from importlib import import_module

_WHERE = {"GLM4V": "model", "InputError": "model", "ModelOutput": "model", "GLM4VConfig": "config",
          "VisionConfig": "config", "load_model": "weights", "generate": "generate", "stream_text": "generate",
          "LabelError": "loss", "save_model": "save"}

__all__ = ["GLM4V", "GLM4VConfig", "VisionConfig", "InputError", "LabelError", "ModelOutput", "load_model",
           "save_model", "generate", "stream_text"]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Package(types.ModuleType):
    """`generate` names both a submodule and its function; the function is what this package exports.
    Importing the submodule makes Python set the package attribute to the module, which this
    property ignores, so `from glm4v_core import generate` is the function in any import order."""

    @property
    def generate(self):
        return import_module(".generate", __name__).generate

    @generate.setter
    def generate(self, module) -> None:
        pass  # the submodule stays reachable as sys.modules["glm4v_core.generate"]


sys.modules[__name__].__class__ = _Package
