"""The error family of glm4v_conversion: ConversionError is the base of every error it raises for a
refused input (a checkpoint, config, quantization request or destination); glm4v_core re-exports it."""


class ConversionError(ValueError):
    """An input glm4v_conversion refuses; raised itself for a conversion that cannot start (the
    destination is in the way, busy, not writable, or the disk is too small)."""
