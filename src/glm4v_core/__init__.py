"""glm4v-core: a readable, exact, fast PyTorch reimplementation of GLM-4V-9B.

The package is in rooms, one job each (docs/architecture.md has the map and the import rules):

    model/        the GLM4V module and its parts: vision tower, projector, decoder, splice, cache, loss
    processing/   tokenizer, image preprocessing, conversation -> model inputs
    generation/   sampling, the compiled decode step, the loop, text streaming
    transforms/   what is applied to a built model: quantization, LoRA, tensor parallel / FSDP2
    training/     `glm4v finetune`: its config, trainer, data and resumable state
    parity/       `glm4v parity` and `glm4v make-reference`: comparison against the HF reference
    serving/      `glm4v serve`: an OpenAI-compatible HTTP endpoint over the generation runtime (the [serve] extra)

The public names below are imported on first use (a module-level __getattr__), so that
`import glm4v_core.config` or `glm4v_core.processing.tokenizer` does not pull in torch and triton.
"""
from importlib import import_module

_WHERE = {
    # the model
    "GLM4V": "model.glm4v", "ModelOutput": "model.glm4v", "Prompt": "model.glm4v", "KVCache": "model.cache",
    "GLM4VConfig": "config", "VisionConfig": "config", "BUNDLED_CHECKPOINT": "config",
    # checkpoints
    "load_model": "checkpoint", "save_model": "checkpoint",
    # hub ids: resolved from the local Hugging Face cache; `glm4v download` fetches into it
    "resolve_hub_id": "hub", "download_snapshot": "download", "HubError": "hub",
    # inputs
    "Tokenizer": "processing.tokenizer", "resolve_tokenizer": "processing.tokenizer",
    "load_image": "processing.image", "build_inputs": "processing.chat",
    "build_batch": "processing.chat", "ModelInputs": "processing.chat",
    # generation
    "generate": "generation.loop", "stream_tokens": "generation.loop", "Step": "generation.loop",
    "Sampling": "generation.sampling", "stream_text": "generation.streaming",
    "GenerationStats": "generation.loop", "TextDeltas": "generation.streaming",
    # transforms
    "quantize_model": "transforms.quant", "LoRAConfig": "transforms.lora", "add_lora": "transforms.lora",
    "load_adapters": "transforms.adapter_files", "save_adapters": "transforms.adapter_files",
    "remove_lora": "transforms.lora",
    # parity
    "run_parity": "parity.run",
    # training
    "FinetuneConfig": "training.config",
    # errors: GLM4VError is the base of every error below; ConversionError is glm4v_conversion's base
    "GLM4VError": "errors", "ConversionError": "errors", "REFUSED": "errors", "CLIError": "errors",
    "ConfigError": "config",
    "InputError": "model.splice", "LabelError": "model.loss", "CacheFullError": "model.cache",
    "BackendError": "model.ops", "InitError": "model.init", "TokenizerError": "processing.tokenizer",
    "ImageError": "processing.image", "NonFiniteLogitsError": "generation.sampling", "DeviceError": "checkpoint",
    "SaveError": "checkpoint", "LoRAError": "transforms.lora", "DistributedError": "transforms.distributed",
    "FinetuneError": "training.config", "DataError": "training.data", "ResumeError": "training.state",
    "ReferenceFileError": "parity.reference", "ReportError": "parity.report",
    "MemoryPlanError": "training.memory_plan",
    "RequestError": "serving.protocol", "QueueFullError": "serving.batcher", "ServerClosingError": "serving.batcher",
    "CaptureError": "parity.capture", "SamplingError": "generation.sampling", "CheckpointError": "checkpoint",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
