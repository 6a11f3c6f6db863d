"""erllama: local LLM inference over llama.cpp with a token-exact KV cache.

The engine is written in Rust; this package is its typed Python face::

    import asyncio, erllama
    from erllama.testmodel import fetch_test_model

    async def main() -> None:
        cache = erllama.CacheConfig(disk_dir="/tmp/erllama-cache")
        async with erllama.Engine(cache=cache) as engine:
            model = await engine.load_model(fetch_test_model(), n_ctx=4096)
            result = await model.complete("The capital of France is", max_tokens=16)
            print(result.text, result.stats.cache_hit_kind)

    asyncio.run(main())

:class:`Engine` (asyncio) and :mod:`erllama.blocking` (scripts) are the API;
:class:`LlamaModel` and :class:`Context` give low-level access to one
llama.cpp context.

Every error erllama raises on purpose is an :class:`ErllamaError`; see
:mod:`erllama.errors`. The command line is ``erllama`` (or
``python -m erllama``).
"""

import atexit as _atexit

from erllama import _cpu

# Before anything imports the native module: load the build this CPU runs best.
_cpu.load()

from erllama._erllama import Context, system_info
from erllama._erllama import Model as LlamaModel
from erllama._erllama import __version__ as __version__
from erllama._erllama import _quiesce as _quiesce
from erllama.config import CacheConfig, Policy, SchedulerConfig
from erllama.engine import (
    AdapterInfo,
    CacheRow,
    CacheView,
    CheckResult,
    Completion,
    Engine,
    Model,
    ModelInfo,
    SaveSummary,
    SchedulerStatus,
    SchedulerView,
    Server,
    Stats,
    Stream,
)
from erllama.errors import (
    AlreadyLoadedError,
    BackendError,
    BusyError,
    CacheError,
    ContextError,
    ContextOverflowError,
    DecodeError,
    EmptyInputError,
    ErllamaError,
    GrammarError,
    InternalError,
    InvalidInputError,
    KvStateError,
    ModelFetchError,
    ModelFileNotFoundError,
    ModelLoadError,
    NoTemplateError,
    NotFoundError,
    NotSupportedError,
    TokenOutOfRangeError,
    UnknownTierError,
    WorkerError,
)

__all__ = [
    "AdapterInfo",
    "AlreadyLoadedError",
    "BackendError",
    "BusyError",
    "CacheConfig",
    "CacheError",
    "CacheRow",
    "CacheView",
    "CheckResult",
    "Completion",
    "Context",
    "ContextError",
    "ContextOverflowError",
    "DecodeError",
    "EmptyInputError",
    "Engine",
    "ErllamaError",
    "GrammarError",
    "InternalError",
    "InvalidInputError",
    "KvStateError",
    "LlamaModel",
    "Model",
    "ModelFetchError",
    "ModelFileNotFoundError",
    "ModelInfo",
    "ModelLoadError",
    "NoTemplateError",
    "NotFoundError",
    "NotSupportedError",
    "Policy",
    "SaveSummary",
    "SchedulerConfig",
    "SchedulerStatus",
    "SchedulerView",
    "Server",
    "Stats",
    "Stream",
    "TokenOutOfRangeError",
    "UnknownTierError",
    "WorkerError",
    "__version__",
    "system_info",
]

# Let the native runtime's workers finish handing results back to asyncio
# before the interpreter finalizes (see ``_erllama._quiesce``).
_atexit.register(_quiesce, 5.0)
