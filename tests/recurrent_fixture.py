"""Writes a tiny random-weight recurrent (``mamba``) GGUF model (test fixture).

A Mamba model keeps no per-token KV cache: its memory is a recurrent state
(a rolling convolution window and an SSM state per sequence) that folds in
every token seen so far and cannot be cut back to an earlier position. A
cache of prompt prefixes therefore cannot be reused with it, and erllama
must report such a model as not cacheable when it loads it. This fixture
gives the tests such a model without a download: about 0.4 MB, random
(untrained) weights, so the text it generates is noise.

The layout follows llama.cpp's ``LLM_ARCH_MAMBA`` (``src/models/mamba.cpp``):
hparams ``mamba.context_length``, ``mamba.embedding_length``,
``mamba.block_count``, ``mamba.ssm.{conv_kernel,inner_size,state_size,
time_step_rank}`` and ``mamba.attention.layer_norm_rms_epsilon``, with
``inner_size == 2 * embedding_length`` (the only expansion factor llama.cpp
supports). Tensors, as GGUF dims ``ne`` (numpy shapes are reversed):
``token_embd.weight`` ``[n_embd, n_vocab]``, ``output_norm.weight``
``[n_embd]``, ``output.weight`` ``[n_embd, n_vocab]`` and per block ``i``:
``blk.i.attn_norm.weight`` ``[n_embd]``, ``blk.i.ssm_in.weight``
``[n_embd, 2 * d_inner]``, ``blk.i.ssm_conv1d.{weight,bias}``
``[d_conv, d_inner]`` / ``[d_inner]``, ``blk.i.ssm_x.weight``
``[d_inner, dt_rank + 2 * d_state]``, ``blk.i.ssm_dt.{weight,bias}``
``[dt_rank, d_inner]`` / ``[d_inner]``, ``blk.i.ssm_a`` ``[d_state, d_inner]``
(stores ``A = -exp(A_log)``, so negative), ``blk.i.ssm_d`` ``[d_inner]`` and
``blk.i.ssm_out.weight`` ``[d_inner, n_embd]``.

The tokenizer is a small SentencePiece-style (``llama``) vocab: ``<unk>``,
``<s>``, ``</s>``, the 256 byte-fallback tokens ``<0x00>``..``<0xFF>`` (so any
text tokenizes), then single characters and a few whole words with every
prefix (llama.cpp's SPM tokenizer merges pairs only into tokens that exist).

The output is deterministic: the same seed writes the same bytes. Use as a
module (``write_tiny_mamba``) or a script::

    python tests/recurrent_fixture.py --out tiny-mamba.gguf

Needs the ``gguf`` and ``numpy`` packages (pinned in requirements-dev.txt);
the script exits with status 3 and a clear message when one is missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

MISSING_GGUF = 3
ARCHITECTURE = "mamba"

N_EMBD = 64
N_LAYER = 2
D_INNER = 2 * N_EMBD
D_CONV = 4
D_STATE = 16
DT_RANK = 4
N_CTX_TRAIN = 512
RMS_EPS = 1e-5

SPACE = "\u2581"  # SentencePiece's word-boundary marker.
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"
WORDS = ("hello", "world", "the", "and", "of", "to", "in", "is", "it", "a", "erllama", "mamba")

# llama.cpp token types (gguf.TokenType).
TYPE_NORMAL = 1
TYPE_UNKNOWN = 2
TYPE_CONTROL = 3
TYPE_BYTE = 6


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Returns the token texts, scores and types of the fixture's SPM vocab."""
    tokens = ["<unk>", "<s>", "</s>"]
    scores = [0.0, 0.0, 0.0]
    types = [TYPE_UNKNOWN, TYPE_CONTROL, TYPE_CONTROL]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        scores.append(0.0)
        types.append(TYPE_BYTE)
    pieces = [SPACE, *CHARS]
    for word in WORDS:
        text = SPACE + word
        for end in range(2, len(text) + 1):
            if text[:end] not in pieces:
                pieces.append(text[:end])
    for piece in pieces:
        tokens.append(piece)
        # Longer pieces score higher, so the tokenizer prefers whole words.
        scores.append(-10.0 + len(piece))
        types.append(TYPE_NORMAL)
    return tokens, scores, types


def write_tiny_mamba(path: Path, seed: int = 0) -> Path:
    """Writes a tiny random-weight ``mamba`` GGUF model to ``path``.

    Args:
        path: where to write the model (overwritten if it exists).
        seed: seed of the random weights (same seed, same file).

    Returns:
        ``path`` as a ``Path``.
    """
    import gguf
    import numpy as np

    path = Path(path)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def normal(*shape: int, std: float) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    writer.add_name("tiny-random-mamba")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    # Not a transformer: no attention heads, no feed-forward (as convert_hf_to_gguf writes).
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_ssm_conv_kernel(D_CONV)
    writer.add_ssm_inner_size(D_INNER)
    writer.add_ssm_state_size(D_STATE)
    writer.add_ssm_time_step_rank(DT_RANK)
    writer.add_layer_norm_rms_eps(RMS_EPS)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    # numpy shapes are the GGUF dims reversed.
    ones = np.ones
    writer.add_tensor("token_embd.weight", normal(n_vocab, N_EMBD, std=0.5))
    writer.add_tensor("output_norm.weight", ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", normal(n_vocab, N_EMBD, std=0.5))
    # A as Mamba initialises it (A_log = log(1..d_state) for every channel).
    a = -np.tile(np.arange(1, D_STATE + 1, dtype=np.float32), (D_INNER, 1))
    for i in range(N_LAYER):
        blk = f"blk.{i}"
        # dt bias: inverse softplus of a time step in [1e-3, 1e-1].
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=D_INNER))
        dt_bias = (dt + np.log(-np.expm1(-dt))).astype(np.float32)
        writer.add_tensor(f"{blk}.attn_norm.weight", ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{blk}.ssm_in.weight", normal(2 * D_INNER, N_EMBD, std=0.125))
        writer.add_tensor(f"{blk}.ssm_conv1d.weight", normal(D_INNER, D_CONV, std=0.5))
        writer.add_tensor(f"{blk}.ssm_conv1d.bias", normal(D_INNER, std=0.1))
        writer.add_tensor(f"{blk}.ssm_x.weight", normal(DT_RANK + 2 * D_STATE, D_INNER, std=0.09))
        writer.add_tensor(f"{blk}.ssm_dt.weight", normal(D_INNER, DT_RANK, std=0.5))
        writer.add_tensor(f"{blk}.ssm_dt.bias", dt_bias)
        writer.add_tensor(f"{blk}.ssm_a", a.copy())
        writer.add_tensor(f"{blk}.ssm_d", ones(D_INNER, dtype=np.float32))
        writer.add_tensor(f"{blk}.ssm_out.weight", normal(N_EMBD, D_INNER, std=0.09))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="model GGUF to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import gguf  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as exc:
        print(
            f"recurrent_fixture: the {exc.name!r} package is missing; install the dev "
            "requirements (pip install -r requirements-dev.txt)",
            file=sys.stderr,
        )
        return MISSING_GGUF
    print(write_tiny_mamba(Path(args.out), seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
