"""glm4v-core: a readable, exact, fast PyTorch reimplementation of GLM-4V-9B."""
from .config import GLM4VConfig, VisionConfig
from .generate import generate, stream_text
from .loss import LabelError
from .model import GLM4V, InputError, ModelOutput
from .save import save_model
from .weights import load_model

__all__ = ["GLM4V", "GLM4VConfig", "VisionConfig", "InputError", "LabelError", "ModelOutput", "load_model",
           "save_model", "generate", "stream_text"]
