"""erllama: local LLM inference over llama.cpp with a token-exact KV cache.

The engine is written in Rust; this package is its typed Python face. For now
it exposes the llama.cpp model and context (:class:`Model`, :class:`Context`),
the exception hierarchy and a helper that fetches a tiny test model::

    import erllama
    from erllama.testmodel import fetch_test_model

    model = erllama.Model(str(fetch_test_model()))
    ctx = model.new_context(n_ctx=2048)
    ctx.prefill(model.tokenize("The capital of France is"))
    print(model.detokenize(ctx.generate(16)))

Every error erllama raises on purpose is an :class:`ErllamaError`; see
:mod:`erllama.errors`. The command line is ``erllama`` (or
``python -m erllama``).
"""

from erllama._erllama import Context, Model, system_info
from erllama._erllama import __version__ as __version__
from erllama.errors import (
    AlreadyLoadedError,
    ContextError,
    ContextOverflowError,
    DecodeError,
    EmptyInputError,
    ErllamaError,
    InvalidInputError,
    KvStateError,
    ModelFetchError,
    ModelFileNotFoundError,
    ModelLoadError,
    NoTemplateError,
    NotFoundError,
    NotSupportedError,
    TokenOutOfRangeError,
    WorkerError,
)

__all__ = [
    "AlreadyLoadedError",
    "Context",
    "ContextError",
    "ContextOverflowError",
    "DecodeError",
    "EmptyInputError",
    "ErllamaError",
    "InvalidInputError",
    "KvStateError",
    "Model",
    "ModelFetchError",
    "ModelFileNotFoundError",
    "ModelLoadError",
    "NoTemplateError",
    "NotFoundError",
    "NotSupportedError",
    "TokenOutOfRangeError",
    "WorkerError",
    "__version__",
    "system_info",
]
