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
  ``detokenize(tokens)``, ``new_context(n_ctx, n_batch, n_seq)``; optional
  ``fingerprint() -> bytes`` (32), ``embed(tokens)``, ``is_eog(token)``,
  ``token_bytes(token)``, ``chat_tokens(messages, add_assistant)``,
  ``load_adapter(path) -> handle``;
- context, ``n_seq`` sequences over ``n_ctx`` cells they share:
  ``decode(batch)`` (a list of ``(seq, tokens, logits)``: append each
  item's tokens to its sequence in one step, all or nothing; ``logits``
  asks for the logits after the last of them), ``sample(seq) -> int`` (the
  next token from those logits, not appended), ``kv_pack(seq) -> bytes``,
  ``kv_unpack(seq, data, tokens)`` (into the cleared sequence),
  ``truncate(seq, n)``, ``copy_prefix(src, dst, n)`` (the empty ``dst``
  shares ``src``'s first ``n`` cells), ``clear(seq)``; optional
  ``set_sampling(seq, params: dict)``, ``set_adapters([(handle, scale),
  ...])`` (clears every sequence). Logits last until the next ``decode``.

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

    def new_context(self, n_ctx: int, n_batch: int, n_seq: int = 1) -> StubContext:
        if n_ctx <= 0 or n_batch <= 0 or n_seq <= 0:
            raise InvalidInputError("n_ctx, n_batch and n_seq must be positive")
        return StubContext(n_ctx, n_seq)


class StubContext:
    """``n_seq`` stub sequences over ``n_ctx`` cells: each sequence's tokens,
    the cells it holds (a copied prefix shares its source's cells, counted
    once) and whether it has logits."""

    def __init__(self, n_ctx: int, n_seq: int = 1) -> None:
        self.n_ctx = n_ctx
        self.seqs: list[list[int]] = [[] for _ in range(n_seq)]
        self.adapters: list[tuple[str, float]] = []
        self._cells: list[list[int]] = [[] for _ in range(n_seq)]
        self._refs: dict[int, int] = {}
        self._next_cell = 0
        self._logits: set[int] = set()

    @property
    def tokens(self) -> list[int]:
        """Sequence 0's tokens."""
        return self.seqs[0]

    @property
    def used_cells(self) -> int:
        """Distinct cells in use."""
        return len(self._refs)

    def _seq(self, seq: int) -> int:
        if not 0 <= seq < len(self.seqs):
            raise InvalidInputError(
                f"sequence {seq} does not exist (the context holds {len(self.seqs)})"
            )
        return seq

    def _add_cells(self, seq: int, n: int) -> None:
        for _ in range(n):
            cell = self._next_cell
            self._next_cell += 1
            self._refs[cell] = 1
            self._cells[seq].append(cell)

    def _drop_cells(self, seq: int, keep: int) -> None:
        for cell in self._cells[seq][keep:]:
            self._refs[cell] -= 1
            if not self._refs[cell]:
                del self._refs[cell]
        del self._cells[seq][keep:]

    def set_adapters(self, adapters: Sequence[tuple[str, float]]) -> None:
        self.adapters = list(adapters)
        for seq in range(len(self.seqs)):
            self.clear(seq)

    def decode(self, batch: Sequence[tuple[int, Sequence[int], bool]]) -> None:
        adding = 0
        seen: set[int] = set()
        for seq, tokens, _ in batch:
            self._seq(seq)
            if seq in seen:
                raise InvalidInputError(f"sequence {seq} appears twice in one batch")
            seen.add(seq)
            if not tokens:
                raise InvalidInputError("decode needs at least one token per item")
            _check_ids(tokens)
            adding += len(tokens)
        if self.used_cells + adding > self.n_ctx:
            raise ContextOverflowError(
                f"{self.used_cells} + {adding} tokens exceed n_ctx = {self.n_ctx}"
            )
        self._logits.clear()
        for seq, tokens, logits in batch:
            self.seqs[seq].extend(tokens)
            self._add_cells(seq, len(tokens))
            if logits:
                self._logits.add(seq)

    def sample(self, seq: int) -> int:
        if self._seq(seq) not in self._logits:
            raise InvalidInputError("no logits: decode at least one token first")
        return next_token(self.seqs[seq])

    def kv_pack(self, seq: int) -> bytes:
        tokens = self.seqs[self._seq(seq)]
        return struct.pack(f"<{len(tokens)}I", *tokens)

    def kv_unpack(self, seq: int, data: bytes, tokens: Sequence[int]) -> None:
        self.clear(self._seq(seq))
        if len(data) % 4:
            raise KvStateError(f"{len(data)} bytes is not a whole number of u32 tokens")
        packed = list(struct.unpack(f"<{len(data) // 4}I", data))
        if packed != list(tokens):
            raise KvStateError("the state does not hold the given tokens")
        _check_ids(packed)
        if self.used_cells + len(packed) > self.n_ctx:
            raise KvStateError(
                f"no room for {len(packed)} cells ({self.used_cells} of {self.n_ctx} in use)"
            )
        self.seqs[seq] = packed
        self._add_cells(seq, len(packed))

    def truncate(self, seq: int, n: int) -> None:
        tokens = self.seqs[self._seq(seq)]
        if not 0 <= n <= len(tokens):
            raise InvalidInputError(f"cannot keep {n} of {len(tokens)} tokens")
        del tokens[n:]
        self._drop_cells(seq, n)
        self._logits.discard(seq)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self._seq(src)
        self._seq(dst)
        if src == dst or self.seqs[dst] or not 0 <= n <= len(self.seqs[src]):
            raise InvalidInputError(
                f"cannot copy {n} tokens of sequence {src} ({len(self.seqs[src])}) "
                f"into sequence {dst}"
            )
        self.seqs[dst] = self.seqs[src][:n]
        for cell in self._cells[src][:n]:
            self._refs[cell] += 1
            self._cells[dst].append(cell)
        self._logits.discard(dst)

    def clear(self, seq: int) -> None:
        self._seq(seq)
        self.seqs[seq] = []
        self._drop_cells(seq, 0)
        self._logits.discard(seq)
