#!/usr/bin/env python3
"""Install a built wheel where nothing else can help it, and use it.

``./dev test`` runs this on ``./dev wheel``'s output: a new virtual
environment gets the wheel (no index, no dependencies), and every check runs
from an empty temporary directory with an environment scrubbed down to the
venv's ``bin`` on ``PATH`` -- no Rust, cmake, compiler or source tree is
reachable -- so what passes here is what a user's ``pip install`` gets:

* ``erllama generate`` answers on the test model;
* the asyncio API completes a request (and the module came from the venv).

    python3 tools/wheel_smoke.py dist/erllama-*.whl --model PATH
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ASYNC_CHECK = r"""
import asyncio, pathlib, sys, erllama, erllama._erllama as native
from erllama import _cpu
assert native.__file__.startswith(sys.prefix), native.__file__
print("native build:", _cpu.selected(), native.__file__.split("site-packages/")[1])
# The build records its CPU features in its file, where the import check
# reads them: the record is there and is what the module reports.
arch, _, features = native._target_features.partition(":")
needs = _cpu.build_needs(pathlib.Path(native.__file__))
assert arch == "x86_64" and "avx2" in features.split(","), native._target_features
assert needs == {_cpu.CPUINFO_NAMES[f] for f in features.split(",") if f in _cpu.CPUINFO_NAMES}
print("records:", native._target_features)
async def main() -> None:
    async with erllama.Engine() as engine:
        model = await engine.load_model(sys.argv[1], n_ctx=256, n_threads=2)
        result = await model.complete("The capital of France is", max_tokens=8)
        assert result.tokens and result.text.strip(), result
        print("asyncio ok:", repr(result.text), result.stats.finish_reason)
asyncio.run(main())
"""


def _cpu_flags() -> frozenset[str]:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _variants(venv: Path) -> list[tuple[str, frozenset[str]]]:
    """(name, needed flags) of each variant build the installed wheel carries."""
    out = subprocess.run(
        [
            venv / "bin/python",
            "-c",
            "import erllama._cpu as c, pathlib as p; "
            "root = p.Path(c.__file__).parent / '_variants'; "
            "print('\\n'.join(n + ' ' + ','.join(sorted(f)) for n, d, f in c.VARIANTS "
            "if (root / d).is_dir()))",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"ERLLAMA_CPU_VARIANT": "portable"},
    ).stdout.split("\n")
    return [(n, frozenset(f.split(","))) for n, f in (line.split(" ") for line in out if line)]


def _passes(cmd: list[str], env: dict[str, str], cwd: Path, needs_output: bool = False) -> bool:
    """Runs `cmd` in the bare environment, prints its output; whether it
    succeeded (and printed something, when `needs_output`)."""
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    print(done.stdout.strip())
    if done.returncode != 0 or (needs_output and not done.stdout.strip()):
        print(done.stderr, file=sys.stderr)
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--model", type=Path, required=True)
    args = parser.parse_args()
    wheel, model = args.wheel.resolve(), args.model.resolve()
    print(f"wheel: {wheel.name}, {wheel.stat().st_size / 1e6:.1f} MB")
    with tempfile.TemporaryDirectory(prefix="erllama-wheel-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                venv / "bin/python",
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--disable-pip-version-check",
                str(wheel),
            ],
            check=True,
        )
        work = Path(tmp) / "empty"
        work.mkdir()
        env = {"PATH": str(venv / "bin"), "HOME": tmp, "LANG": "C.UTF-8"}
        for tool in ("cargo", "rustc", "cmake", "cc", "gcc", "c++"):
            found = subprocess.run(
                [venv / "bin/python", "-c", f"import shutil; print(shutil.which({tool!r}) or '')"],
                env=env,
                cwd=work,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            assert not found, f"{tool} is reachable at {found}"
        # Every build in the wheel that this CPU can run, and the default choice.
        flags = _cpu_flags()
        builds = [""] + ["portable"] + [name for name, needs in _variants(venv) if needs <= flags]
        for build in builds:
            run_env = {**env, "ERLLAMA_CPU_VARIANT": build} if build else env
            print(f"-- build: {build or 'default choice'}")
            ok = _passes(
                [
                    "erllama",
                    "generate",
                    "--model",
                    str(model),
                    "--max-tokens",
                    "8",
                    "--threads",
                    "2",
                    "The capital of France is",
                ],
                run_env,
                work,
                needs_output=True,
            ) and _passes([str(venv / "bin/python"), "-c", ASYNC_CHECK, str(model)], run_env, work)
            if not ok:
                return 1
    print("wheel smoke test passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
