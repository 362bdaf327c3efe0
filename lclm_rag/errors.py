"""Exceptions raised by lclm-rag. Every message names the offending input and how to fix it."""


class LclmRagError(Exception):
    """Base class: catch this to handle any lclm-rag failure."""


class ModelNotFoundError(LclmRagError):
    """A model id or path could not be resolved to local weights."""


class CheckpointError(LclmRagError):
    """A checkpoint directory is missing a file or is inconsistent."""


class ConfigError(LclmRagError, ValueError):
    """An invalid setting (ratio, pooling, widths, ...)."""


class InputError(LclmRagError, ValueError):
    """Bad user input: empty passage, non-string text, empty question, ..."""


class CompressorMismatchError(LclmRagError):
    """Latents produced by one compressor were about to be mixed with another's."""


class StoreError(LclmRagError):
    """The vector store refused an operation or could not be reached."""


class EngineError(LclmRagError):
    """A decode engine is not installed, not reachable, or refused a request."""
