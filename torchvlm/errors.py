"""Exceptions raised by torchvlm.

Every error meant for a user derives from :class:`TorchVLMError` and carries a one-line message that names
the offending thing (file, key, field, argument). The CLI prints ``error: <message>`` for these and exits 2.
"""

from __future__ import annotations


class TorchVLMError(Exception):
    """Base class of all user-facing torchvlm errors."""


class ModelNotFoundError(TorchVLMError, FileNotFoundError):
    """A model id/path could not be resolved to a local directory or file."""


class ConfigError(TorchVLMError, ValueError):
    """config.json (or equivalent metadata) is missing, unreadable or lacks a required field."""


class UnknownArchitectureError(TorchVLMError, ValueError):
    """The checkpoint's architecture / model_type is not supported."""


class CheckpointError(TorchVLMError, ValueError):
    """Weights are missing, unexpected, wrongly shaped, or a weight file is corrupt."""


class ImageError(TorchVLMError, ValueError):
    """An image could not be loaded or decoded."""


class ProcessorError(TorchVLMError, ValueError):
    """Inputs cannot be turned into model inputs (e.g. more images than image placeholders)."""


class GenerationError(TorchVLMError, ValueError):
    """Invalid generation arguments."""
