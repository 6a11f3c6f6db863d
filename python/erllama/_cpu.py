"""Picks the fastest build of the native module this CPU can run, at import.

The portable wheel's ``erllama/_erllama.abi3.so`` targets x86-64-v3 (AVX2,
FMA, F16C, BMI2) and runs on any x86-64 CPU of the last decade. The wheel
also carries builds for newer instruction sets under
``erllama/_variants/<name>/``; on a CPU that has every feature a variant
needs (as the kernel reports them in ``/proc/cpuinfo``, which leaves out
features the OS does not enable), that build is loaded as
``erllama._erllama`` instead. A development build has no variants and always
uses the portable module.

``ERLLAMA_CPU_VARIANT`` overrides the choice: ``portable`` (or ``baseline``)
forces the portable module, a variant's name forces that variant (an error
if the CPU lacks a feature it needs, or if this install has no such build).
:func:`selected` says which build was loaded; ``erllama info`` prints it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from typing import Final

PORTABLE: Final = "x86-64-v3"
"""The name of the portable build."""

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
    if forced in (PORTABLE, "portable", "baseline"):
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


def load() -> str:
    """Loads the chosen build as ``erllama._erllama`` (once); returns its name."""
    global _selected
    if _MODULE in sys.modules:
        return _selected
    root = Path(__file__).parent / "_variants"
    available = {p.name for p in root.iterdir()} if root.is_dir() else set()
    name = choose(cpu_flags(), available, os.environ.get("ERLLAMA_CPU_VARIANT"))
    if name != PORTABLE:
        directory = next(d for n, d, _ in VARIANTS if n == name)
        (path,) = (root / directory).glob("_erllama*.so")
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
