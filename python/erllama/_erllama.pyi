"""Type stub of the native module ``erllama._erllama`` (Rust, PyO3).

The native module is private: the public, typed API lives in the ``erllama``
package. Every blocking call releases the GIL while it runs. Errors are raised
as the classes of :mod:`erllama.errors`.
"""

from collections.abc import Awaitable, Sequence
from typing import Any, Self, final

__all__ = [
    "Context",
    "Engine",
    "Model",
    "Stream",
    "__version__",
    "_quiesce",
    "kvc_gc",
    "kvc_list",
    "kvc_verify",
    "sample_pressure",
    "system_info",
]

__version__: str
"""The version of the native module (the Rust crates' version)."""

def _quiesce(timeout_s: float = 5.0) -> bool:
    """Wait until no task runs on the native runtime (registered with ``atexit``)."""

def sample_pressure(source: str) -> tuple[int, int, list[tuple[str, str]]]:
    """Sample a built-in pressure source once (``system``, ``nvml``, ``noop``)."""

def kvc_list(dir: str) -> list[dict[str, Any]]:
    """Header-parse every ``*.kvc`` file of ``dir`` (no CRC)."""

def kvc_verify(path: str) -> str | None:
    """Full parse of one KVC file; None when valid, else the error."""

def kvc_gc(dir: str) -> tuple[int, int, list[tuple[str, str]]]:
    """Delete temp and invalid files as a startup would; (kept, temps, invalid)."""

def system_info() -> str:
    """Return llama.cpp/ggml's system information line.

    It lists the CPU features and backends that were compiled in and are in
    use, such as ``AVX2 = 1`` or ``CUDA : ARCHS = ...``.
    """

@final
class Model:
    """A GGUF model loaded through llama.cpp.

    A model holds the weights and the vocabulary; it is shared by the
    contexts created from it with :meth:`new_context` and stays alive while
    any of them does.
    """

    # PyO3 classes are built by ``__new__`` (``#[new]``); stubbing it, rather
    # than ``__init__``, keeps ``python -m mypy.stubtest`` in agreement.
    def __new__(cls, path: str, *, n_gpu_layers: int = 0, use_mmap: bool = True) -> Self:
        """Load the GGUF file at ``path``.

        Args:
            path: path of a GGUF file.
            n_gpu_layers: how many layers to offload to a GPU (0 = CPU only).
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

    def info(self) -> dict[str, str | int | bool]:
        """Describe the model.

        Keys: ``architecture`` (str), ``name`` (str), ``quant_type`` (str, e.g.
        ``"q4_1"``), ``n_ctx_train``, ``n_vocab``, ``n_layer``, ``n_embd``,
        ``n_params``, ``size_bytes`` (int), ``has_chat_template`` (bool).
        """

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
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_seq_max: int = 1,
    ) -> Context:
        """Create an inference context; the context drives sequence 0.

        Args:
            n_ctx: the context size in tokens.
            n_batch: the most tokens given to one ``llama_decode`` call.
            n_threads: CPU threads for decoding; ``None`` picks a default from
                the number of cores.
            n_seq_max: sequences the context can hold, sharing one unified KV
                cache of ``n_ctx`` cells.

        Raises:
            InvalidInputError: a size is zero, negative or out of range.
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

_Summary = tuple[str, int, bool] | None

@final
class Engine:
    """The native engine behind :class:`erllama.Engine` (models, requests, cache)."""

    def __new__(
        cls,
        *,
        ram_quota: int,
        ram_file_dir: str | None,
        ram_file_quota: int,
        disk_dir: str | None,
        disk_quota: int,
        writer_limit: int | None,
        policy: dict[str, int],
        scheduler: dict[str, object],
        pressure_source: object,
    ) -> Self: ...
    def load_model(
        self,
        backend: object,
        *,
        path: str,
        model_id: str | None,
        n_ctx: int,
        n_batch: int,
        n_threads: int | None,
        n_gpu_layers: int,
        use_mmap: bool,
        tier: str,
        policy: dict[str, int] | None,
        fingerprint_mode: str,
    ) -> Awaitable[str]:
        """Load a model (``backend``: ``"llama"``, ``"stub"`` or an object); resolves to its id."""

    def reserve_request(self, model_id: str) -> int:
        """Allocate a request id (cancellable before the request starts)."""

    def release_request(self, request_id: int) -> None:
        """Release a reserved id that will not be submitted."""

    def submit(
        self,
        request_id: int,
        model_id: str,
        prompt: str | list[int],
        *,
        max_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        repetition_penalty: float,
        seed: int | None,
        grammar: str | None,
        stop: list[str] | None,
        parent_key: str | None,
    ) -> Awaitable[Stream]:
        """Validate, tokenize and queue a request; resolves to its :class:`Stream`."""

    def cancel(self, request_id: int) -> bool:
        """Cancel a request; True when it was live."""

    def models(self) -> list[str]:
        """Ids of the loaded models."""

    def status(self, model_id: str) -> str:
        """``idle``, ``prefilling``, ``generating`` or ``stopped``."""

    def info(self, model_id: str) -> dict[str, Any]:
        """A model's description."""

    def inflight(self) -> list[tuple[int, str]]:
        """(request id, model id) of the live requests."""

    def tokenize(self, model_id: str, text: str, add_bos: bool) -> Awaitable[list[int]]: ...
    def detokenize(self, model_id: str, tokens: list[int]) -> Awaitable[str]: ...
    def chat_tokens(
        self, model_id: str, messages: list[tuple[str, str]], add_assistant: bool
    ) -> Awaitable[list[int]]: ...
    def embed(self, model_id: str, tokens: list[int]) -> Awaitable[list[float]]: ...
    def load_adapter(
        self, model_id: str, path: str, scale: float, adapter_id: str | None = None
    ) -> Awaitable[tuple[str, str, str, float]]: ...
    def set_adapter_scale(
        self, model_id: str, adapter_id: str, scale: float
    ) -> Awaitable[tuple[str, str, str, float]]: ...
    def unload_adapter(self, model_id: str, adapter_id: str) -> Awaitable[None]: ...
    def adapters(self, model_id: str) -> Awaitable[list[tuple[str, str, str, float]]]: ...
    def evict(self, model_id: str) -> Awaitable[_Summary]: ...
    def save_now(self, model_id: str) -> Awaitable[_Summary]: ...
    def unload(self, model_id: str) -> Awaitable[_Summary]: ...
    def shutdown(self) -> Awaitable[None]: ...
    def cache_counters(self) -> dict[str, int]: ...
    def cache_reset_counters(self) -> None: ...
    def cache_dump(self) -> list[dict[str, Any]]: ...
    def cache_gc(self) -> int: ...
    def cache_evict_bytes(self, n: int, tiers: list[str] | None = None) -> tuple[int, int]: ...
    def cache_bytes(self) -> dict[str, int]: ...
    def cache_settle(self, timeout_s: float = 30.0) -> bool: ...
    def scheduler_status(self) -> dict[str, Any]: ...
    def scheduler_force_check(self) -> tuple[str, int, int, int]: ...
    def scheduler_enable(self, on: bool) -> None: ...
    def scheduler_set_thresholds(
        self, high: float, low: float, min_evict_bytes: int | None = None
    ) -> None: ...
    def scheduler_set_interval(self, interval_ms: int) -> None: ...

@final
class Stream:
    """A running request's events."""

    @property
    def id(self) -> int: ...
    @property
    def model_id(self) -> str: ...
    def next(self) -> Awaitable[tuple[str, int, str] | tuple[str, dict[str, Any]]]:
        """Resolve to the next event; raises StopAsyncIteration after the end."""
