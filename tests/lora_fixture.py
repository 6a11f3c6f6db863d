"""Writes a tiny random LoRA adapter GGUF for a llama.cpp model (test fixture).

The adapter follows llama.cpp's LoRA GGUF layout (``src/llama-adapter.cpp``):
metadata ``general.type = "adapter"``, ``adapter.type = "lora"``,
``adapter.lora.alpha`` and the base model's ``general.architecture``; for each
adapted weight ``W`` (GGUF dims ``ne = [n_in, n_out]``) a pair of F32 tensors
``<name>.lora_a`` with ``ne = [n_in, rank]`` and ``<name>.lora_b`` with
``ne = [rank, n_out]``. llama.cpp adds ``scale * alpha / rank * B @ A @ x`` to
``W @ x``.

The values are random, not trained: large enough that greedy output visibly
changes. Use as a module (``make_lora``) or a script::

    python tests/lora_fixture.py --model MODEL.gguf --out adapter.gguf

Needs the ``gguf`` package (pinned in requirements-dev.txt); the script
exits with status 3 and a clear message when it is missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

MISSING_GGUF = 3
DEFAULT_TARGETS = ("attn_q", "attn_v")


def make_lora(
    path: str | Path,
    model_path: str | Path,
    rank: int = 4,
    seed: int = 0,
    scale_of_weights: float = 0.1,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    layers: Sequence[int] | None = None,
    architecture: str | None = None,
) -> Path:
    """Writes a random LoRA adapter for the GGUF model at ``model_path``.

    Args:
        path: where to write the adapter.
        model_path: the base model GGUF (read for its architecture and the
            shapes of the adapted tensors).
        rank: the LoRA rank.
        seed: seed of the random values (same seed, same file).
        scale_of_weights: standard deviation of the A and B entries.
        alpha: ``adapter.lora.alpha``; ``None`` writes ``rank`` (an
            effective multiplier of 1).
        targets: which weights of each block to adapt (``attn_q``, ...).
        layers: which blocks to adapt; ``None`` adapts every block.
        architecture: overrides ``general.architecture`` (to build an
            adapter the model must reject).

    Returns:
        ``path`` as a ``Path``.
    """
    import gguf
    import numpy as np

    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    path = Path(path)
    reader = gguf.GGUFReader(str(model_path))
    arch_field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise ValueError(f"{model_path} has no general.architecture")
    model_arch = str(arch_field.contents())
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}

    wanted = []
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight":
            continue
        if parts[2] not in targets:
            continue
        if layers is not None and int(parts[1]) not in layers:
            continue
        if len(shape) != 2:
            raise ValueError(f"{name} has {len(shape)} dims, expected 2")
        wanted.append((name, shape))
    if not wanted:
        raise ValueError(f"no tensors of {model_path} match {list(targets)} / {layers}")
    wanted.sort(key=lambda item: (int(item[0].split(".")[1]), item[0]))

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), architecture or model_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank if alpha is None else alpha))
    for name, (n_in, n_out) in wanted:
        # numpy shapes are the GGUF dims reversed.
        a = rng.normal(0.0, scale_of_weights, size=(rank, n_in)).astype(np.float32)
        b = rng.normal(0.0, scale_of_weights, size=(n_out, rank)).astype(np.float32)
        writer.add_tensor(f"{name}.lora_a", a)
        writer.add_tensor(f"{name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base model GGUF")
    parser.add_argument("--out", required=True, help="adapter GGUF to write")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale-of-weights", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    parser.add_argument("--architecture", default=None)
    args = parser.parse_args(argv)
    try:
        import gguf  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as exc:
        print(
            f"lora_fixture: the {exc.name!r} package is missing; install the dev "
            "requirements (pip install -r requirements-dev.txt)",
            file=sys.stderr,
        )
        return MISSING_GGUF
    out = make_lora(
        args.out,
        args.model,
        rank=args.rank,
        seed=args.seed,
        scale_of_weights=args.scale_of_weights,
        alpha=args.alpha,
        targets=[t for t in args.targets.split(",") if t],
        architecture=args.architecture,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
