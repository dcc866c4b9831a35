"""The error family: every input glm4v_core refuses raises a subclass of GLM4VError.

GLM4VError subclasses ValueError, so code written against the older ValueError contract still
catches it. The commands catch `REFUSED` (this family and glm4v_conversion's) and print one line;
any other exception is a bug and keeps its traceback. This module imports no torch.
"""
from __future__ import annotations

from glm4v_conversion.errors import ConversionError


class GLM4VError(ValueError):
    """An input, file or request that glm4v_core refuses; the message names it and what would be accepted."""


class CLIError(GLM4VError):
    """A problem with the command line or the files it names."""


# What a command turns into a one-line message and exit status 1.
REFUSED = (GLM4VError, ConversionError)
