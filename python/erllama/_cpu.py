"""Picks the fastest build of the native module this CPU can run, at import.

The portable wheel's ``erllama/_erllama.abi3.so`` targets x86-64-v3 (AVX2,
FMA, F16C, BMI2) and runs on any x86-64 CPU of the last decade. The wheel
also carries builds for newer instruction sets under
``erllama/_variants/<name>/``; on a CPU that has every feature a variant
needs (as the kernel reports them in ``/proc/cpuinfo``, which leaves out
features the OS does not enable), that build is loaded as
``erllama._erllama`` instead. A development build has no variants and always
uses the portable module.

Each build records the CPU features it was compiled for (crates/erllama-py/
build.rs); before a build is loaded, those are checked against the CPU's, so
on an older CPU (the portable build needs x86-64-v3: AVX2, for example)
``import erllama`` raises ImportError naming the missing features instead of
dying of SIGILL. A build from source for this CPU (``-C target-cpu=native``)
records what it needs and so loads.

``ERLLAMA_CPU_VARIANT`` overrides the choice: ``portable`` (or ``baseline``)
forces the portable module (without that check, for a ``/proc/cpuinfo`` that
hides features), a variant's name forces that variant (an error if the CPU
lacks a feature it needs, or if this install has no such build).
:func:`selected` says which build was loaded; ``erllama info`` prints it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import mmap
import os
import sys
from pathlib import Path
from typing import Final

PORTABLE: Final = "x86-64-v3"
"""The name of the portable build."""

#: What ``ERLLAMA_CPU_VARIANT`` may say to force the portable build.
_PORTABLE_NAMES: Final = (PORTABLE, "portable", "baseline")

#: Rust's names of the x86 target features a build can be compiled for, and
#: the kernel's names of them in /proc/cpuinfo. Features not listed here are
#: part of every x86-64 CPU (sse, sse2, fxsr) or not checked.
CPUINFO_NAMES: Final[dict[str, str]] = {
    "sse3": "pni",
    "ssse3": "ssse3",
    "sse4.1": "sse4_1",
    "sse4.2": "sse4_2",
    "popcnt": "popcnt",
    "cmpxchg16b": "cx16",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "bmi1": "bmi1",
    "bmi2": "bmi2",
    "lzcnt": "abm",
    "movbe": "movbe",
    "xsave": "xsave",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512cd": "avx512cd",
    "avx512dq": "avx512dq",
    "avx512vl": "avx512vl",
    "avx512vbmi": "avx512vbmi",
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avxvnni": "avx_vnni",
}

#: What the native module's build embeds before ``<arch>:<features>``
#: (crates/erllama-py/build.rs).
_MARKER: Final = b"\0erllama-target-features="

#: Variants, best first: (name, directory, the /proc/cpuinfo flags it needs).
#: Keep in step with the variant builds in ``./dev wheel``.
VARIANTS: Final[tuple[tuple[str, str, frozenset[str]], ...]] = (
    # AVX-512 (F, BW, CD, DQ, VL): decode 22 % faster than x86-64-v3 on an AMD
    # EPYC (Zen 4), SmolLM2 Q4_1, 2 threads; adding VNNI/BF16/VBMI gave 2 %
    # more, within noise (README, "The wheel").
    (
        "x86-64-v4",
        "x86_64_v4",
        frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ),
)

_MODULE: Final = "erllama._erllama"
_selected: str = PORTABLE


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU, as the kernel reports them."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def choose(flags: frozenset[str], available: set[str], forced: str | None) -> str:
    """The build to load: a variant's name, or :data:`PORTABLE`.

    Raises:
        ImportError: ``forced`` names a build that is not installed or that
            this CPU cannot run.
    """
    if forced in _PORTABLE_NAMES:
        return PORTABLE
    for name, directory, needs in VARIANTS:
        if forced not in (None, "", name):
            continue
        if directory not in available:
            if forced:
                raise ImportError(f"ERLLAMA_CPU_VARIANT={forced}: this install has no such build")
            continue
        missing = needs - flags
        if not missing:
            return name
        if forced:
            raise ImportError(
                f"ERLLAMA_CPU_VARIANT={forced}: this CPU lacks {', '.join(sorted(missing))}"
            )
    if forced:
        known = ", ".join([PORTABLE, *(v[0] for v in VARIANTS)])
        raise ImportError(f"ERLLAMA_CPU_VARIANT={forced}: unknown build (known: {known})")
    return PORTABLE


def build_needs(module: Path) -> frozenset[str] | None:
    """The /proc/cpuinfo flags a native module file was compiled to need, as
    its build recorded them; None for a file that records none (or not for
    x86-64), or that cannot be read. The file is searched, not loaded."""
    try:
        with open(module, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            at = m.find(_MARKER)
            if at < 0:
                return None
            start = at + len(_MARKER)
            end = m.find(b"\0", start, start + 4096)
            if end < 0:
                return None
            recorded = m[start:end].decode("ascii")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    arch, _, features = recorded.partition(":")
    if arch != "x86_64":
        return None
    return frozenset(CPUINFO_NAMES[f] for f in features.split(",") if f in CPUINFO_NAMES)


def check(module: Path, flags: frozenset[str]) -> None:
    """Raises ImportError if this CPU lacks a feature ``module`` was compiled
    for (it would die of SIGILL). Nothing is checked without ``flags`` (no
    /proc/cpuinfo, or not x86) or without a record in the file."""
    needs = build_needs(module)
    missing = needs - flags if needs and flags else frozenset()
    if missing:
        raise ImportError(
            f"{module} is compiled for CPU features this CPU lacks "
            f"({', '.join(sorted(missing))}), so it would crash with an illegal "
            "instruction. Build erllama for this CPU instead: pip install the sdist "
            "(erllama-*.tar.gz) with RUSTFLAGS='-C target-cpu=native' set "
            "(README, 'Configuration'); ERLLAMA_CPU_VARIANT=portable skips this check"
        )


def load() -> str:
    """Loads the chosen build as ``erllama._erllama`` (once); returns its name."""
    global _selected
    if _MODULE in sys.modules:
        return _selected
    root = Path(__file__).parent / "_variants"
    available = {p.name for p in root.iterdir()} if root.is_dir() else set()
    flags = cpu_flags()
    forced = os.environ.get("ERLLAMA_CPU_VARIANT")
    name = choose(flags, available, forced)
    if name == PORTABLE:
        modules = list(Path(__file__).parent.glob("_erllama*.so"))
        # A missing module fails at its import, with Python's own message.
        if len(modules) == 1 and forced not in _PORTABLE_NAMES:
            check(modules[0], flags)
    else:
        directory = next(d for n, d, _ in VARIANTS if n == name)
        (path,) = (root / directory).glob("_erllama*.so")
        check(path, flags)
        loader = importlib.machinery.ExtensionFileLoader(_MODULE, str(path))
        spec = importlib.util.spec_from_file_location(_MODULE, path, loader=loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MODULE] = module
        try:
            loader.exec_module(module)
        except BaseException:
            del sys.modules[_MODULE]
            raise
    _selected = name
    return name


def selected() -> str:
    """The name of the native build in use (:data:`PORTABLE` or a variant)."""
    return _selected
