"""Type stub of the native module ``erllama._erllama`` (Rust, PyO3).

The native module is private: the public, typed API lives in the ``erllama``
package. Every blocking call releases the GIL while it runs. Every value from
Python is checked first: out of range, not finite or of the wrong type raises
:class:`~erllama.errors.InvalidInputError` naming the parameter. Errors are
raised as the classes of :mod:`erllama.errors` (``EXCEPTION_CLASSES`` lists
them); a Rust panic is an :class:`~erllama.errors.InternalError`, never a
``PanicException``. Results are the immutable records below.
"""

from collections.abc import Awaitable, Mapping, Sequence
from os import PathLike
from typing import Literal, Self, final

__all__ = [
    "EXCEPTION_CLASSES",
    "REQUEST_OPTIONS",
    "AdapterInfo",
    "CacheRow",
    "CheckResult",
    "Completion",
    "Context",
    "Engine",
    "KvcFile",
    "LlamaModelInfo",
    "Model",
    "ModelInfo",
    "SaveSummary",
    "SchedulerStatus",
    "Server",
    "Stats",
    "Stream",
    "__version__",
    "_quiesce",
    "_target_features",
    "_test_panic",
    "_test_panic_async",
    "kvc_gc",
    "kvc_list",
    "kvc_verify",
    "remote_rows",
    "remote_stats",
    "sample_pressure",
    "system_info",
]

__version__: str
"""The version of the native module (the Rust crates' version)."""

_target_features: str
"""``<arch>:<Rust target features>`` this module was compiled for, also
recorded in its file for ``erllama._cpu`` to check before loading it."""

EXCEPTION_CLASSES: tuple[str, ...]
"""The names of the :mod:`erllama.errors` classes the native module raises."""

REQUEST_OPTIONS: tuple[tuple[str, int | float | None], ...]
"""``(name, default)`` of every request option, in declaration order (the
native side of :class:`erllama.engine.CompletionOptions`)."""

_Path = str | PathLike[str]

def _quiesce(timeout_s: float = 5.0) -> bool:
    """Wait until no task runs on the native runtime (registered with ``atexit``)."""

def _test_panic() -> None:
    """Panic inside the boundary guard (tests: it must raise InternalError)."""

def _test_panic_async() -> Awaitable[None]:
    """Panic inside an awaitable (tests: it must raise InternalError)."""

def sample_pressure(source: str) -> tuple[int, int, list[tuple[str, str]]]:
    """Sample a built-in pressure source once (``system``, ``nvml``, ``noop``)."""

def kvc_list(dir: _Path) -> list[KvcFile]:
    """Header-parse every ``*.kvc`` file of ``dir`` (no CRC)."""

def kvc_verify(path: _Path) -> str | None:
    """Full parse of one KVC file; None when valid, else the error."""

def kvc_gc(dir: _Path) -> tuple[int, int, list[tuple[str, str]]]:
    """Delete temp and invalid files as a startup would; (kept, temps, invalid)."""

def remote_rows(url: str, prefix: str = ..., limit: int = 1000) -> list[tuple[str, int, int, int]]:
    """A remote tier's rows, least recently used first: (key hex, bytes, hits,
    last use in ms since the epoch)."""

def remote_stats(url: str, prefix: str = ...) -> tuple[int, int]:
    """A remote tier's totals: (rows, bytes)."""

def system_info() -> str:
    """Return llama.cpp/ggml's system information line.

    It lists the CPU features and backends that were compiled in and are in
    use, such as ``AVX2 = 1`` or ``CUDA : ARCHS = ...``.
    """

class _Record:
    def to_dict(self) -> dict[str, object]:
        """The fields as a dict (nested records stay records)."""

    def __eq__(self, value: object, /) -> bool: ...
    def __ne__(self, value: object, /) -> bool: ...
    __hash__: None  # type: ignore[assignment]

@final
class Stats(_Record):
    """What happened to one request."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def prefill_ms(self) -> float:
        """Admission to the first token's logits: lookup, restore and prefill."""
    @property
    def generation_ms(self) -> float: ...
    @property
    def restore_ms(self) -> float:
        """Time restoring from the cache (part of ``prefill_ms``)."""
    @property
    def queue_ms(self) -> float:
        """Time waiting in the model's queue."""
    @property
    def cache_hit_kind(self) -> Literal["exact", "partial", "cold"]: ...
    @property
    def hit_source(self) -> Literal["exact", "resume", "longest_prefix", "shared"] | None: ...
    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV state came from the cache."""
    @property
    def cache_tier(self) -> Literal["ram", "ram_file", "disk", "remote"] | None:
        """The tier that served the cached tokens (``remote``: fetched from
        Redis and stored in the model's tier on the way)."""
    @property
    def finish_reason(self) -> Literal["stop", "length", "cancelled"]: ...
    @property
    def cancelled(self) -> bool: ...
    @property
    def fallback_from(self) -> Literal["exact", "resume", "longest_prefix"] | None:
        """A row found by this lookup failed to restore (then removed, counted)."""
    @property
    def fallback_reason(self) -> str | None:
        """Why it could not be restored."""
    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the model computed for this request: the prompt less
        what came from the cache or another sequence (1 for an exact hit
        whose row has no stored logits, 0 for one whose row has them)."""
    @property
    def decode_tokens(self) -> int:
        """Generated tokens fed back to the model; a sampled token is fed only
        when the next one is wanted, so at most ``completion_tokens - 1``."""
    @property
    def breakpoint_written(self) -> int:
        """The largest breakpoint whose row this request wrote (0: none; a
        breakpoint whose row existed was only renewed)."""
    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended generation, if one did."""

@final
class Completion(_Record):
    """A finished request."""

    @property
    def request_id(self) -> int: ...
    @property
    def text(self) -> str:
        """The generated text (a stop string excluded)."""
    @property
    def tokens(self) -> list[int]:
        """The generated token ids (an end-of-generation token excluded)."""
    @property
    def stats(self) -> Stats: ...
    @property
    def finish_key(self) -> str | None:
        """Key (hex) of the state saved at the end: the next turn's ``parent_key``."""

@final
class ModelInfo(_Record):
    """A loaded model."""

    @property
    def id(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def status(self) -> Literal["idle", "prefilling", "generating", "stopped"]: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def quant_type(self) -> str: ...
    @property
    def quant_bits(self) -> int: ...
    @property
    def tier(self) -> Literal["ram", "ram_file", "disk"]: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def fingerprint_mode(self) -> Literal["safe", "gguf_chunked", "fast_unsafe"]: ...
    @property
    def cacheable(self) -> bool:
        """Whether the model's state is cached (no lookup or save when not)."""
    @property
    def memory(self) -> str:
        """``kv``, ``kv_iswa``, ``recurrent``, ``hybrid`` or ``unknown``."""
    @property
    def cache_reason(self) -> str | None:
        """Why the state is not cacheable."""
    @property
    def parallel(self) -> int:
        """Sequences computed together (``load_model(parallel=...)``)."""
    @property
    def cache_type_k(self) -> str:
        """The K cache's element type (``load_model(cache_type_k=...)``)."""
    @property
    def cache_type_v(self) -> str:
        """The V cache's element type."""
    @property
    def flash_attn(self) -> str:
        """Flash attention as loaded: ``auto``, ``on`` or ``off``."""
    @property
    def running(self) -> int:
        """Requests running now."""
    @property
    def queued(self) -> int:
        """Requests waiting for a sequence or for KV cells."""
    @property
    def warm_sequences(self) -> int:
        """Finished sequences kept for sharing their prefix."""
    @property
    def kv_cells_used(self) -> int:
        """KV cells in use, out of ``parallel * n_ctx`` on llama (each sequence has
        ``n_ctx`` of its own) or ``n_ctx`` on the stub backends (one shared pool)."""

@final
class LlamaModelInfo(_Record):
    """A GGUF model's metadata, and whether its state is cacheable."""

    @property
    def architecture(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def quant_type(self) -> str: ...
    @property
    def n_ctx_train(self) -> int: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def n_layer(self) -> int: ...
    @property
    def n_embd(self) -> int: ...
    @property
    def n_params(self) -> int: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def has_chat_template(self) -> bool: ...
    @property
    def n_swa(self) -> int:
        """The sliding window (0 for none)."""
    @property
    def memory(self) -> str: ...
    @property
    def cacheable(self) -> bool: ...
    @property
    def cache_reason(self) -> str | None: ...

@final
class AdapterInfo(_Record):
    """A LoRA adapter loaded on a model."""

    @property
    def id(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def sha256(self) -> str:
        """SHA-256 of the adapter file; with the scale it enters the model's
        effective fingerprint, so cache rows of different adapter sets never mix."""
    @property
    def scale(self) -> float: ...

@final
class SaveSummary(_Record):
    """What an ``evict``, ``save_now`` or ``unload`` saved."""

    @property
    def key(self) -> str: ...
    @property
    def tokens(self) -> int: ...
    @property
    def already_present(self) -> bool: ...

@final
class CacheRow(_Record):
    """One row of the cache index."""

    @property
    def key(self) -> str: ...
    @property
    def tier(self) -> Literal["ram", "ram_file", "disk"]: ...
    @property
    def status(self) -> Literal["available", "writing", "evicting"]: ...
    @property
    def size(self) -> int: ...
    @property
    def refcount(self) -> int: ...
    @property
    def hits(self) -> int: ...
    @property
    def last_used(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def save_reason(self) -> str: ...
    @property
    def context_size(self) -> int: ...
    @property
    def created(self) -> int: ...

@final
class CheckResult(_Record):
    """What one scheduler check did."""

    @property
    def outcome(
        self,
    ) -> Literal[
        "skipped(disabled)",
        "skipped(below_watermark)",
        "skipped(nothing_to_evict)",
        "skipped(unavailable)",
        "evicted",
    ]: ...
    @property
    def count(self) -> int:
        """Cache rows evicted."""
    @property
    def bytes(self) -> int:
        """Bytes those rows held."""
    @property
    def contexts(self) -> int:
        """Idle model contexts saved and released (``evict_idle_models``)."""

@final
class SchedulerStatus(_Record):
    """The scheduler's settings and its last readings."""

    @property
    def enabled(self) -> bool: ...
    @property
    def interval_ms(self) -> int: ...
    @property
    def high_watermark(self) -> float: ...
    @property
    def low_watermark(self) -> float: ...
    @property
    def min_evict_bytes(self) -> int: ...
    @property
    def evict_tiers(self) -> list[str]: ...
    @property
    def evict_idle_models(self) -> bool: ...
    @property
    def pressure_source(self) -> str: ...
    @property
    def available(self) -> bool | None:
        """Whether the last sample worked (None before the first check)."""
    @property
    def unavailable_reason(self) -> str | None: ...
    @property
    def sampler_details(self) -> list[tuple[str, str]]: ...
    @property
    def last_used(self) -> int: ...
    @property
    def last_total(self) -> int: ...
    @property
    def last_ratio(self) -> float: ...
    @property
    def last_evicted_bytes(self) -> int: ...
    @property
    def sampled_at(self) -> float | None:
        """Unix time of the last sample."""
    @property
    def last_evicted_at(self) -> float | None: ...
    @property
    def checks(self) -> int: ...
    @property
    def last_outcome(self) -> str | None: ...
    @property
    def tier_bytes(self) -> dict[str, int]:
        """Bytes held per cache tier now."""

@final
class KvcFile(_Record):
    """One ``*.kvc`` file of a directory, header-parsed (no CRC)."""

    @property
    def file(self) -> str: ...
    @property
    def key(self) -> str | None:
        """The key recomputed from the contents (None when the header fails)."""
    @property
    def name_ok(self) -> bool: ...
    @property
    def tokens(self) -> int: ...
    @property
    def save_reason(self) -> str | None: ...
    @property
    def hits(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def created(self) -> int: ...
    @property
    def last_used(self) -> int: ...
    @property
    def context_size(self) -> int: ...
    @property
    def quant(self) -> str | None: ...
    @property
    def prompt(self) -> str | None: ...
    @property
    def logits(self) -> int:
        """Stored logits: the scores of the token after ``tokens`` (0: none)."""
    @property
    def error(self) -> str | None: ...

@final
class Model:
    """A GGUF model loaded through llama.cpp.

    A model holds the weights and the vocabulary; it is shared by the
    contexts created from it with :meth:`new_context` and stays alive while
    any of them does.
    """

    # PyO3 classes are built by ``__new__`` (``#[new]``); stubbing it, rather
    # than ``__init__``, keeps ``python -m mypy.stubtest`` in agreement.
    def __new__(
        cls, path: _Path, *, n_gpu_layers: int | None = None, use_mmap: bool = True
    ) -> Self:
        """Load the GGUF file at ``path``.

        Args:
            path: path of a GGUF file.
            n_gpu_layers: how many layers to offload to a GPU (None or 0 = CPU only).
            use_mmap: map the file instead of reading it into memory.

        Raises:
            ModelFileNotFoundError: ``path`` does not exist or is not a file.
            ModelLoadError: the file is not a GGUF file or llama.cpp refused it.
            InvalidInputError: ``n_gpu_layers`` is negative.
        """

    @property
    def path(self) -> str:
        """The path the model was loaded from."""

    @property
    def n_vocab(self) -> int:
        """The size of the vocabulary; valid token ids are ``0 <= id < n_vocab``."""

    def info(self) -> LlamaModelInfo:
        """Describe the model, and whether its state is cacheable (the first
        call probes the state layout in a small context)."""

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Split ``text`` into token ids.

        Args:
            text: the text to tokenize.
            add_bos: prepend the beginning-of-sequence token when the model
                uses one.
            special: parse control-token text such as ``"<|im_start|>"`` as the
                control token. Leave it off for text typed by a user, so that
                user text can never inject control tokens.
        """

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """Turn token ids back into text.

        Args:
            tokens: token ids.
            special: render control tokens as their text instead of dropping
                them.

        Raises:
            TokenOutOfRangeError: a token id is negative or ``>= n_vocab``.
        """

    def apply_chat_template(
        self, messages: Sequence[tuple[str, str]], *, add_assistant: bool = True
    ) -> str:
        """Render ``(role, content)`` messages through the GGUF's chat template.

        Args:
            messages: the conversation, e.g. ``[("system", "..."), ("user", "...")]``.
            add_assistant: open the assistant's turn at the end.

        Raises:
            NoTemplateError: the model has no chat template.
            InvalidInputError: a role or content contains a NUL character.
        """

    def chat_tokens(
        self, messages: Sequence[tuple[str, str]], *, add_assistant: bool = True
    ) -> list[int]:
        """Render and tokenize a chat: template markup becomes control tokens,
        message contents never do (typed ``<|im_start|>`` stays plain text).

        Raises:
            NoTemplateError: the model has no chat template.
            InvalidInputError: a content contains NUL or the reserved U+F8F0/U+F8F1.
        """

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (end-of-sequence, end-of-turn, ...).

        Raises:
            TokenOutOfRangeError: ``token`` is negative or ``>= n_vocab``.
        """

    def new_context(
        self,
        *,
        n_ctx: int | None = None,
        n_batch: int | None = None,
        n_threads: int | None = None,
        n_seq_max: int | None = None,
        cache_type_k: str | None = None,
        cache_type_v: str | None = None,
        flash_attn: str | None = None,
    ) -> Context:
        """Create an inference context; the context drives sequence 0.

        Args:
            n_ctx: the context size in tokens (8..4194304; None: 4096).
            n_batch: the most tokens given to one ``llama_decode`` call
                (1..65536; None: 512).
            n_threads: CPU threads for decoding; ``None`` picks a default from
                the number of cores.
            n_seq_max: sequences the context can hold, each with ``n_ctx``
                KV cells of its own (1..256; None: 1).
            cache_type_k, cache_type_v: the KV cache's element types
                (``"f16"``, the default, ``"q8_0"``, ``"q4_0"``, ``"f32"``,
                ``"bf16"``, ``"q5_1"``, ``"q5_0"``, ``"q4_1"``); any but f16
                turns flash attention on unless ``flash_attn`` says otherwise.
            flash_attn: ``"auto"`` (None; llama.cpp's choice), ``"on"`` or
                ``"off"`` (not with a quantized V cache).

        Raises:
            InvalidInputError: a size is zero, negative or out of range, an
                unknown KV cache type or flash attention setting, or
                ``flash_attn="off"`` with a quantized V cache.
            ContextError: llama.cpp could not create the context.
        """

@final
class Context:
    """An inference context of a :class:`Model`: one sequence of tokens and its KV cache.

    A context is used by one thread at a time; its calls release the GIL.
    """

    @property
    def n_ctx(self) -> int:
        """The context size in tokens."""

    @property
    def n_past(self) -> int:
        """How many tokens the sequence holds now."""

    def tokens(self) -> list[int]:
        """The tokens the sequence holds now, in order (``len == n_past``)."""

    def prefill(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to the sequence and compute the logits of the last one.

        The tokens are fed in batches of at most ``n_batch``.

        Raises:
            EmptyInputError: ``tokens`` is empty.
            TokenOutOfRangeError: a token id is negative or ``>= n_vocab``.
            ContextOverflowError: ``n_past + len(tokens) > n_ctx``.
            DecodeError: ``llama_decode`` failed.
        """

    def logits(self) -> list[float]:
        """The logits for the next token, one per vocabulary entry.

        Raises:
            InvalidInputError: nothing was decoded since the last restore, removal or clear.
        """

    def decode_one(self) -> int:
        """Greedily pick the next token, feed it to the sequence and return it.

        The token is the argmax of the current logits; feeding it computes the
        logits for the next call.

        Raises:
            InvalidInputError: there are no logits (a fresh or cleared
                context, or right after :meth:`kv_unpack` or
                :meth:`remove_last`).
            ContextOverflowError: the context is full.
            DecodeError: ``llama_decode`` failed.
        """

    def generate(self, max_tokens: int) -> list[int]:
        """Call :meth:`decode_one` until an end-of-generation token or ``max_tokens``.

        The end-of-generation token, when one is produced, is the last item of
        the result (like every token from :meth:`decode_one`, it has been fed
        to the sequence). ``max_tokens == 0`` returns ``[]``.

        Raises:
            InvalidInputError: ``max_tokens`` is negative, or there are no logits.
            ContextOverflowError: ``n_past + max_tokens > n_ctx`` (checked
                before anything is decoded).
            DecodeError: ``llama_decode`` failed.
        """

    def kv_pack(self) -> bytes:
        """Serialise the sequence's KV state (llama.cpp's per-sequence state API).

        The bytes restore with :meth:`kv_unpack` into a context of the same
        model created with the same parameters.

        Raises:
            KvStateError: llama.cpp could not serialise the state.
        """

    def kv_unpack(self, data: bytes, tokens: Sequence[int]) -> None:
        """Restore a state made by :meth:`kv_pack` into a cleared sequence.

        The sequence is cleared first, so no stale cells remain. ``tokens``
        are the tokens the state holds (what :meth:`tokens` returned when the
        state was packed). No logits are available afterwards: to continue,
        call :meth:`remove_last` and :meth:`prefill` the last token again.

        Raises:
            KvStateError: ``data`` is not a valid sequence state for this
                context (llama.cpp refused it, or it holds a different number
                of cells than ``len(tokens)``); the sequence is left cleared.
            TokenOutOfRangeError: a token id is negative or ``>= n_vocab``.
            ContextOverflowError: ``len(tokens) > n_ctx``.
        """

    def remove_last(self) -> None:
        """Drop the last token of the sequence and its KV cell; the logits become invalid.

        Raises:
            InvalidInputError: the sequence is empty.
        """

    def clear(self) -> None:
        """Empty the sequence and its KV cache."""

@final
class Server:
    """A running HTTP server (:meth:`erllama.Engine.serve`)."""

    @property
    def host(self) -> str:
        """The address it listens on."""
    @property
    def port(self) -> int:
        """The port it listens on (the one picked when 0 was asked)."""
    def stop(self) -> Awaitable[None]:
        """Stops accepting connections and waits for the requests in flight; idempotent."""

@final
class Engine:
    """The native engine behind :class:`erllama.Engine` (models, requests, cache)."""

    def __new__(
        cls,
        *,
        ram_quota: int,
        ram_file_dir: _Path | None,
        ram_file_quota: int,
        disk_dir: _Path | None,
        disk_quota: int,
        writer_limit: int | None,
        policy: Mapping[str, int],
        scheduler: Mapping[str, object],
        pressure_source: object,
        ram_file_load: str | None = None,
        remote: Mapping[str, object] | None = None,
    ) -> Self: ...
    def serve(
        self,
        host: str,
        port: int,
        *,
        api_key: str | None = None,
        max_queue: int,
        max_body_bytes: int,
    ) -> Awaitable[Server]:
        """Start the HTTP server over this engine; resolves to the running server."""

    def load_model(
        self,
        backend: object,
        *,
        path: _Path,
        model_id: str | None,
        n_ctx: int,
        n_batch: int,
        n_threads: int | None,
        n_gpu_layers: int,
        use_mmap: bool,
        tier: str,
        policy: Mapping[str, int] | None,
        fingerprint_mode: str,
        parallel: int,
        cache_type_k: str | None = None,
        cache_type_v: str | None = None,
        flash_attn: str | None = None,
    ) -> Awaitable[str]:
        """Load a model (``backend``: ``"llama"``, ``"stub"`` or an object); resolves to its id."""

    def submit(
        self,
        model_id: str,
        prompt: str | Sequence[int],
        options: Mapping[str, object] | None = None,
    ) -> Stream:
        """Submit a request and return its stream at once (see ``REQUEST_OPTIONS``).

        Raises InvalidInputError for a bad option and NotFoundError for an
        unknown model now; a bad prompt (empty, ids out of range, too long)
        ends the stream with its error.
        """

    def cancel(self, request_id: int) -> bool:
        """Cancel a request; True when it was live."""

    def models(self) -> list[str]:
        """Ids of the loaded models."""

    def status(self, model_id: str) -> Literal["idle", "prefilling", "generating", "stopped"]:
        """A model's status, answered at once."""

    def info(self, model_id: str) -> ModelInfo:
        """A model's description."""

    def inflight(self) -> list[tuple[int, str]]:
        """(request id, model id) of the live requests."""

    def tokenize(self, model_id: str, text: str, add_bos: bool) -> Awaitable[list[int]]: ...
    def detokenize(self, model_id: str, tokens: Sequence[int]) -> Awaitable[str]: ...
    def chat_tokens(
        self, model_id: str, messages: Sequence[tuple[str, str]], add_assistant: bool
    ) -> Awaitable[list[int]]: ...
    def embed(self, model_id: str, tokens: Sequence[int]) -> Awaitable[list[float]]: ...
    def load_adapter(
        self, model_id: str, path: _Path, scale: float, adapter_id: str | None = None
    ) -> Awaitable[AdapterInfo]: ...
    def set_adapter_scale(
        self, model_id: str, adapter_id: str, scale: float
    ) -> Awaitable[AdapterInfo]: ...
    def unload_adapter(self, model_id: str, adapter_id: str) -> Awaitable[None]: ...
    def adapters(self, model_id: str) -> Awaitable[list[AdapterInfo]]: ...
    def evict(self, model_id: str) -> Awaitable[list[SaveSummary]]: ...
    def save_now(self, model_id: str) -> Awaitable[list[SaveSummary]]: ...
    def unload(self, model_id: str) -> Awaitable[list[SaveSummary]]: ...
    def shutdown(self) -> Awaitable[None]: ...
    def cache_counters(self) -> dict[str, int]: ...
    def cache_reset_counters(self) -> None: ...
    def cache_dump(self) -> list[CacheRow]: ...
    def cache_gc(self) -> int: ...
    def cache_evict_bytes(self, n: int, tiers: Sequence[str] | None = None) -> tuple[int, int]: ...
    def cache_bytes(self) -> dict[str, int]: ...
    def cache_pin(self, key: str, ttl_s: float) -> None: ...
    def cache_unpin(self, key: str) -> bool: ...
    def cache_pins(self) -> dict[str, float]: ...
    def cache_settle(self, timeout_s: float | None = None) -> bool: ...
    def scheduler_status(self) -> SchedulerStatus: ...
    def scheduler_force_check(self) -> CheckResult: ...
    def scheduler_enable(self, on: bool) -> None: ...
    def scheduler_set_thresholds(
        self, high: float, low: float, min_evict_bytes: int | None = None
    ) -> None: ...
    def scheduler_set_interval(self, interval_ms: int) -> None: ...

@final
class Stream:
    """A running request: ``await ready()`` then ``take()``, per event.

    An event leaves the stream's buffer only in :meth:`take`, so cancelling
    the task awaiting :meth:`ready` never loses one.
    """

    @property
    def id(self) -> int:
        """The request id (cancellable from the moment the stream exists)."""
    @property
    def model_id(self) -> str: ...
    @property
    def completion(self) -> Completion | None:
        """The completion, once the request ended successfully."""
    @property
    def done(self) -> bool:
        """Whether the final event was taken."""
    def ready(self) -> Awaitable[None]:
        """Resolves once an event is buffered (at once after the end)."""
    def take(self) -> str | None:
        """The buffered event: a text piece, or None at the end; raises the
        request's error."""
