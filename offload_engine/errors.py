"""One small exception hierarchy: every error the engine raises on purpose.

Each message names the file, tensor or flag at fault and says what to do.
"""


class OffloadError(Exception):
    """Base class of every error raised on purpose by offload-engine."""


class ConfigError(OffloadError, ValueError):
    """A flag or setting is invalid (a budget below the minimum, an unknown scheme...)."""


class SourceError(OffloadError):
    """The checkpoint to convert is missing, empty or in an unsupported form."""


class InexactImportError(SourceError):
    """A quantized source (a GGUF of K-quants) whose codes our layout cannot hold as they
    are; converting it means re-quantizing (``--requantize``)."""


class QuantizationError(OffloadError, ValueError):
    """A tensor cannot be quantized (non-finite values, unsupported dtype or shape)."""


class FormatError(OffloadError):
    """A quantized directory is missing, truncated, inconsistent or of another version."""


class ConversionError(OffloadError):
    """Writing a quantized checkpoint failed; nothing loadable was left behind."""


class ResourceError(OffloadError):
    """Host RAM or device memory is too small for what was asked."""


class WorkerError(OffloadError):
    """A background worker failed; the message names the weight and the cause."""


class ContextLengthError(OffloadError, ValueError):
    """A prompt plus the tokens to generate exceed what the model allows."""
