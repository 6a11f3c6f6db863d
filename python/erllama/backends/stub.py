"""The deterministic stub backend in pure Python.

It behaves exactly like the Rust stub (``backend="stub"``): one token per
word (FNV-1a of the word modulo 65536; token 1 is BOS), where a word is a
maximal run of characters that are not Unicode ``White_Space`` (the
characters of :data:`WHITE_SPACE`, the set Rust's ``char::is_whitespace``
uses; ``str.split()`` would also split on U+001C..U+001F and so disagree),
the next token is the FNV-1a hash of the whole context (tokens as u32
little-endian) modulo 65536 and generation never ends by itself, the packed
state is the token list as u32 little-endian, and embeddings are 16 floats in
[0, 1]. Decoding is greedy only: like the Rust stub, it has no
``set_sampling``, so temperature, repetition penalty and grammar are refused
with :class:`~erllama.errors.NotSupportedError` (after the same value checks).
It exists to prove that a backend can be written in Python and to keep cache
tests fast.

The protocol, as used by the engine (the Rust model task calls these with the
GIL held only for the call):

- backend: ``name``, ``n_vocab``, ``tokenize(text, add_bos)``,
  ``detokenize(tokens)``, ``new_context(n_ctx, n_batch)``; optional
  ``fingerprint() -> bytes`` (32), ``embed(tokens)``, ``is_eog(token)``,
  ``token_bytes(token)``, ``chat_tokens(messages, add_assistant)``,
  ``load_adapter(path) -> handle``;
- context: ``prefill(tokens)``, ``decode_one() -> int``, ``kv_pack() -> bytes``,
  ``kv_unpack(data, tokens)``, ``remove_last()``, ``clear()``; optional
  ``set_sampling(params: dict)``, ``set_adapters([(handle, scale), ...])``.

Raise the classes of :mod:`erllama.errors` for bad input; any other exception
fails the request that caused it and the model keeps serving.

>>> b = StubBackend()
>>> b.tokenize("hello world", True)[0] == 1
True
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence

from erllama.errors import ContextOverflowError, InvalidInputError, KvStateError

__all__ = [
    "STUB_BOS",
    "STUB_VOCAB",
    "WHITE_SPACE",
    "StubBackend",
    "StubContext",
    "next_token",
    "word_token",
    "words",
]

STUB_VOCAB = 65536
STUB_BOS = 1
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193
_MASK = 0xFFFFFFFF


def _fnv1a(state: int, data: bytes) -> int:
    for b in data:
        state = ((state ^ b) * _FNV_PRIME) & _MASK
    return state


WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)
"""The Unicode ``White_Space`` characters: what separates the stub's words."""

_SPLIT = re.compile("[" + re.escape("".join(sorted(WHITE_SPACE))) + "]+")


def words(text: str) -> list[str]:
    """The stub's words of ``text`` (maximal runs of non-:data:`WHITE_SPACE`)."""
    return [w for w in _SPLIT.split(text) if w]


def word_token(word: str) -> int:
    """The stub token of one word."""
    return _fnv1a(_FNV_OFFSET, word.encode()) % STUB_VOCAB


def _context_hash(tokens: Sequence[int]) -> int:
    h = _FNV_OFFSET
    for t in tokens:
        h = _fnv1a(h, struct.pack("<I", t))
    return h


def next_token(context: Sequence[int]) -> int:
    """The token the stub generates after ``context``."""
    return _context_hash(context) % STUB_VOCAB


def _check_ids(tokens: Sequence[int]) -> None:
    for i, t in enumerate(tokens):
        if not 0 <= t < STUB_VOCAB:
            from erllama.errors import TokenOutOfRangeError

            raise TokenOutOfRangeError(
                f"token id {t} at index {i} is out of range (vocabulary size {STUB_VOCAB})"
            )


class StubBackend:
    """The Python stub model (no file is read)."""

    name = "python-stub"
    n_vocab = STUB_VOCAB

    def __init__(self) -> None:
        self._words: dict[int, str] = {}

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        out = [STUB_BOS] if add_bos else []
        for w in words(text):
            t = word_token(w)
            self._words.setdefault(t, w)
            out.append(t)
        return out

    def detokenize(self, tokens: Sequence[int]) -> str:
        _check_ids(tokens)
        return " ".join(self._words.get(t, f"<{t}>") for t in tokens if t != STUB_BOS)

    def embed(self, tokens: Sequence[int]) -> list[float]:
        _check_ids(tokens)
        h = _context_hash(tokens)
        out = []
        for i in range(16):
            h = _fnv1a(h, struct.pack("<I", i))
            out.append((h >> 8) / ((1 << 24) - 1))
        return out

    def load_adapter(self, path: str) -> str:
        """Any readable file is an "adapter": it changes the fingerprint, not the output."""
        with open(path, "rb"):
            pass
        return str(path)

    def new_context(self, n_ctx: int, n_batch: int) -> StubContext:
        if n_ctx <= 0 or n_batch <= 0:
            raise InvalidInputError("n_ctx and n_batch must be positive")
        return StubContext(n_ctx)


class StubContext:
    """One stub sequence: the tokens and whether logits are available."""

    def __init__(self, n_ctx: int) -> None:
        self.n_ctx = n_ctx
        self.tokens: list[int] = []
        self.adapters: list[tuple[str, float]] = []
        self._logits = False

    def set_adapters(self, adapters: Sequence[tuple[str, float]]) -> None:
        self.adapters = list(adapters)

    def prefill(self, tokens: Sequence[int]) -> None:
        if not tokens:
            raise InvalidInputError("prefill needs at least one token")
        _check_ids(tokens)
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise ContextOverflowError(
                f"{len(self.tokens)} + {len(tokens)} tokens exceed n_ctx = {self.n_ctx}"
            )
        self.tokens.extend(tokens)
        self._logits = True

    def decode_one(self) -> int:
        if not self._logits:
            raise InvalidInputError("no logits: prefill at least one token first")
        if len(self.tokens) >= self.n_ctx:
            raise ContextOverflowError(f"the context of {self.n_ctx} tokens is full")
        t = next_token(self.tokens)
        self.tokens.append(t)
        return t

    def kv_pack(self) -> bytes:
        return struct.pack(f"<{len(self.tokens)}I", *self.tokens)

    def kv_unpack(self, data: bytes, tokens: Sequence[int]) -> None:
        if len(data) % 4:
            raise KvStateError(f"{len(data)} bytes is not a whole number of u32 tokens")
        packed = list(struct.unpack(f"<{len(data) // 4}I", data))
        if packed != list(tokens):
            raise KvStateError("the state does not hold the given tokens")
        if len(packed) > self.n_ctx:
            raise ContextOverflowError(f"{len(packed)} tokens exceed n_ctx = {self.n_ctx}")
        self.tokens = packed
        self._logits = False

    def remove_last(self) -> None:
        if not self.tokens:
            raise InvalidInputError("the sequence is empty")
        self.tokens.pop()
        self._logits = False

    def clear(self) -> None:
        self.tokens = []
        self._logits = False
