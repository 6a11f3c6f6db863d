"""The ``erllama`` command line, run as a user would (``python -m erllama``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from erllama.cli import main

PROMPT = "The capital of France is"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "erllama", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("erllama: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_help() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for command in (
        "fetch-model",
        "generate",
        "info",
        "demo",
        "complete",
        "chat",
        "cache",
        "bench",
    ):
        assert command in proc.stdout
    proc = run_cli("generate", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--max-tokens" in proc.stdout
    assert "--json" in proc.stdout


def test_no_command_is_a_usage_error() -> None:
    proc = run_cli()
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


@pytest.mark.real_model
def test_generate_json(model_path: Path) -> None:
    proc = run_cli("generate", "--model", str(model_path), "--max-tokens", "8", "--json", PROMPT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == {
        "text",
        "tokens",
        "prompt_tokens",
        "completion_tokens",
        "prefill_s",
        "decode_s",
        "prefill_tok_s",
        "decode_tok_s",
    }
    assert 1 <= result["completion_tokens"] <= 8
    assert len(result["tokens"]) == result["completion_tokens"]
    assert all(isinstance(t, int) for t in result["tokens"])
    assert result["prompt_tokens"] >= 5
    assert isinstance(result["text"], str)
    assert result["prefill_s"] > 0
    assert result["decode_s"] > 0
    assert result["prefill_tok_s"] > 0
    assert result["decode_tok_s"] > 0


@pytest.mark.real_model
def test_generate_chat_answers_through_the_template(model_path: Path) -> None:
    plain = run_cli("generate", "--model", str(model_path), "--max-tokens", "4", "--json", "Hi")
    chat = run_cli(
        "generate",
        "--model",
        str(model_path),
        "--chat",
        "--system",
        "Be brief.",
        "--max-tokens",
        "24",
        "--json",
        "Name a colour.",
    )
    assert chat.returncode == 0, chat.stderr
    result = json.loads(chat.stdout)
    # The rendered system + user turns are far longer than the raw text.
    assert result["prompt_tokens"] > json.loads(plain.stdout)["prompt_tokens"] + 10
    assert result["text"].strip(), "an instruct model answers a chat turn"


@pytest.mark.real_model
def test_generate_text_and_stats(model_path: Path) -> None:
    proc = run_cli("generate", "--model", str(model_path), "--max-tokens", "8", PROMPT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    stats = proc.stderr.strip().splitlines()[-1]
    assert stats.startswith("prompt ")
    assert "prefill" in stats
    assert "generated" in stats
    assert stats.count("tok/s") == 2


@pytest.mark.real_model
def test_generate_is_deterministic(model_path: Path) -> None:
    args = ("generate", "--model", str(model_path), "--max-tokens", "8", "--json", PROMPT)
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert json.loads(first.stdout)["tokens"] == json.loads(second.stdout)["tokens"]


def test_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.gguf"
    proc = run_cli("generate", "--model", str(missing), "--max-tokens", "8", PROMPT)
    assert_one_line_error(proc, "no-such-model.gguf")


def test_junk_model_is_a_one_line_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file\n" * 100)
    proc = run_cli("info", "--model", str(junk))
    assert_one_line_error(proc)


@pytest.mark.real_model
def test_prompt_that_does_not_fit_is_a_one_line_error(model_path: Path) -> None:
    proc = run_cli(
        "generate", "--model", str(model_path), "--n-ctx", "16", "--max-tokens", "64", PROMPT
    )
    assert_one_line_error(proc, "does not fit")


def test_fetch_model_prints_an_existing_path(model_path: Path) -> None:
    env = {**os.environ, "ERLLAMA_MODEL_CACHE": str(model_path.parent)}
    proc = run_cli("fetch-model", env=env)
    assert proc.returncode == 0, proc.stderr
    printed = Path(proc.stdout.strip())
    assert printed.is_file()
    assert printed == model_path


def test_fetch_model_cache_dir_in_process(
    model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fetch-model", "--cache-dir", str(model_path.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(model_path)


@pytest.mark.real_model
def test_info(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(model_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(model_path)
    assert result["model"]["n_vocab"] > 0
    assert result["model"]["architecture"]
    assert isinstance(result["system_info"], str)
    assert result["system_info"]


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--max-tokens", "-1", PROMPT],
        ["generate", "--n-ctx", "0", PROMPT],
        ["generate", "--threads", "many", PROMPT],
        ["generate"],
        ["no-such-command"],
    ],
)
def test_bad_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "erllama" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["cache", "ls"], "cache needs a directory"),
        (["cache", "ls", ".", "--remote", "redis://127.0.0.1:1"], "not both"),
        (["cache", "gc", "--remote", "redis://127.0.0.1:1"], "cache gc is for a directory"),
        (["cache", "verify", "--remote", "redis://127.0.0.1:1"], "cache verify is for a"),
        (["serve", "--model-id", "a", "--model-id", "b"], "more --model-id than --model"),
    ],
)
def test_argument_combinations_argparse_cannot_check_are_one_line_errors(
    args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before anything connects, loads or binds.
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("erllama: error: ")
    assert fragment in lines[0]


LONG = "The lighthouse keeper climbed the stairs and wrote in the log. " * 60


def test_complete_json_and_a_cache_dir_that_persists(model_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ["complete", "--model", str(model_path), "--cache-dir", str(cache), "--threads", "2"]
    first = run_cli(*args, "--max-tokens", "6", "--json", LONG)
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout)
    assert one["stats"]["cache_hit_kind"] == "cold"
    assert one["finish_key"]
    assert len(one["tokens"]) == 6
    # A second process over the same directory: served from disk.
    second = run_cli(*args, "--max-tokens", "6", "--json", LONG)
    two = json.loads(second.stdout)
    assert two["stats"]["cache_hit_kind"] == "exact"
    assert two["stats"]["cache_tier"] == "disk"
    assert two["tokens"] == one["tokens"]
    streamed = run_cli(*args, "--max-tokens", "6", LONG)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == one["text"]
    assert "exact" in streamed.stderr


def test_cache_ls_stats_verify_gc(model_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    made = run_cli(
        "complete", "--model", str(model_path), "--cache-dir", str(cache), "--max-tokens", "2", LONG
    )
    assert made.returncode == 0, made.stderr
    files = sorted(p.name for p in cache.glob("*.kvc"))
    assert files
    ls = run_cli("cache", "ls", str(cache), "--json")
    rows = json.loads(ls.stdout)
    assert sorted(r["file"] for r in rows) == files
    assert all(r["name_ok"] and r["error"] is None and r["tokens"] > 0 for r in rows)
    assert {r["save_reason"] for r in rows} >= {"cold", "finish"}
    text = run_cli("cache", "ls", str(cache))
    assert text.returncode == 0
    assert rows[0]["key"][:16] in text.stdout
    stats = json.loads(run_cli("cache", "stats", str(cache), "--json").stdout)
    assert stats["files"] == len(files)
    assert stats["bytes"] == sum(p.stat().st_size for p in cache.glob("*.kvc"))
    ok = run_cli("cache", "verify", str(cache))
    assert ok.returncode == 0, ok.stdout
    # Damage one file's payload: verify names it; gc (header-only) keeps it.
    victim = cache / files[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    (cache / ("ab" * 32 + ".kvc")).write_bytes(b"junk")
    bad = run_cli("cache", "verify", str(cache))
    assert bad.returncode == 1
    assert f"BAD {files[0]}: crc_mismatch" in bad.stdout
    assert "bad KVC header" in bad.stdout
    gc = run_cli("cache", "gc", str(cache))
    assert gc.returncode == 0
    assert "removed 0 temp and 1 invalid" in gc.stdout
    assert not (cache / ("ab" * 32 + ".kvc")).exists()
    assert_one_line_error(run_cli("cache", "ls", str(tmp_path / "nope")), "no such cache directory")


def test_chat_keeps_the_conversation_and_resumes(model_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "erllama",
            "chat",
            "--model",
            str(model_path),
            "--json",
            "--max-tokens",
            "12",
            "--system",
            LONG,
        ],
        input="Hello there.\nAnd what did the keeper write?\n",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    turns = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(turns) == 2
    assert turns[0]["stats"]["cache_hit_kind"] == "cold"
    assert turns[1]["stats"]["cache_hit_kind"] == "partial"
    assert turns[1]["stats"]["cached_tokens"] > turns[0]["stats"]["prompt_tokens"] // 2


def test_demo_runs_all_four_steps(model_path: Path) -> None:
    proc = run_cli("demo", "--model", str(model_path), "--threads", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    kinds = [s["hit_kind"] for s in out["steps"]]
    assert kinds == ["cold", "exact", "partial", "exact"]
    assert [s["tier"] for s in out["steps"][1:]] == ["disk", "disk", "disk"]
    assert out["counters"]["hits_exact"] == 1
    assert out["counters"]["hits_resume"] == 1


@pytest.mark.parametrize(
    ("disk_quota", "remote"), [(1 << 30, False), (1000, False), (1 << 30, True)]
)
def test_serve_answers_then_stops_on_sigterm_and_exits_0(
    model_path: Path, tmp_path: Path, disk_quota: int, remote: bool
) -> None:
    """`erllama serve` on port 0: it prints where it listens, answers, and
    on SIGTERM finishes, flushes its disk tier (within `--disk-quota`) and,
    with `--remote-url`, its remote copies, and exits 0."""
    import re
    import signal
    import urllib.request

    from erllama.redis_server import RedisServer

    server = RedisServer(tmp_path) if remote else None
    extra = ["--remote-url", server.url, "--remote-prefix", "s"] if server else []
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "erllama",
            "serve",
            "--model",
            str(model_path),
            "--model-id",
            "smol",
            "--port",
            "0",
            "--n-ctx",
            "1024",
            "--threads",
            "2",
            "--cache-dir",
            str(tmp_path / "rows"),
            "--disk-quota",
            str(disk_quota),
            *extra,
        ],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"serving smol on (http://[0-9.]+:\d+)/v1", line)
        assert found, line
        base = found.group(1)
        with urllib.request.urlopen(base + "/health", timeout=30) as r:
            assert json.load(r) == {"status": "ok"}
        body = json.dumps(
            {"model": "smol", "prompt": PROMPT * 120, "max_tokens": 4, "temperature": 0}
        ).encode()
        req = urllib.request.Request(
            base + "/v1/completions", data=body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.load(r)
        assert answer["choices"][0]["text"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        # The prompt's row reached the disk tier before the exit, unless
        # the quota cannot hold a row.
        rows = list((tmp_path / "rows").glob("*.kvc"))
        assert bool(rows) == (disk_quota > 1000)
        if server is not None:
            # Its remote copies were written before the exit too.
            listed = server.command(b"KEYS", b"{s}:row:*")
            assert listed.count(b"{s}:row:") == len(rows), listed
    finally:
        if server is not None:
            server.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
