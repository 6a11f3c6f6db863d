"""Which native build ``import erllama`` loads, and what an older CPU gets."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import erllama
from erllama import _cpu

# Rust's x86-64-v3 features (`rustc --print cfg -C target-cpu=x86-64-v3`).
V3_RUST = (
    "avx,avx2,bmi1,bmi2,cmpxchg16b,f16c,fma,fxsr,lzcnt,movbe,popcnt,sse,sse2,sse3,"
    "sse4.1,sse4.2,ssse3,xsave"
)
V3 = frozenset(
    [
        "avx",
        "avx2",
        "bmi1",
        "bmi2",
        "cx16",
        "f16c",
        "fma",
        "fxsr",
        "abm",
        "movbe",
        "popcnt",
        "sse",
        "sse2",
        "pni",
        "sse4_1",
        "sse4_2",
        "ssse3",
        "xsave",
    ]
)
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# A Sandy Bridge: x86-64-v2 plus AVX, no AVX2, FMA, BMI, MOVBE or LZCNT.
SANDY_BRIDGE = frozenset(
    ["sse", "sse2", "pni", "ssse3", "sse4_1", "sse4_2", "popcnt", "cx16", "xsave", "avx"]
)


def fake_module(tmp_path: Path, recorded: bytes, name: str = "_erllama.abi3.so") -> Path:
    """A file laid out like a native module: code, the marker, more code."""
    module = tmp_path / name
    module.write_bytes(b"\x7fELF" + bytes(5000) + b"\0erllama-target-features=" + recorded + b"\0x")
    return module


def test_the_best_build_the_cpu_runs_is_chosen() -> None:
    assert _cpu.choose(V3, {"x86_64_v4"}, None) == _cpu.PORTABLE
    assert _cpu.choose(V4, {"x86_64_v4"}, None) == "x86-64-v4"
    # A development build has no variants.
    assert _cpu.choose(V4, set(), None) == _cpu.PORTABLE


def test_a_build_records_what_it_needs(tmp_path: Path) -> None:
    # sse, sse2 and fxsr are in every x86-64 CPU: not checked.
    needs = _cpu.build_needs(fake_module(tmp_path, b"x86_64:" + V3_RUST.encode()))
    assert needs == V3 - {"sse", "sse2", "fxsr"}
    # Another architecture, no record, an unterminated or empty file: no claim.
    assert _cpu.build_needs(fake_module(tmp_path, b"aarch64:neon,aes")) is None
    (tmp_path / "plain.so").write_bytes(b"\x7fELF" + bytes(100))
    assert _cpu.build_needs(tmp_path / "plain.so") is None
    (tmp_path / "cut.so").write_bytes(b"\0erllama-target-features=x86_64:avx" + b"a" * 5000)
    assert _cpu.build_needs(tmp_path / "cut.so") is None
    (tmp_path / "empty.so").write_bytes(b"")
    assert _cpu.build_needs(tmp_path / "empty.so") is None
    assert _cpu.build_needs(tmp_path / "missing.so") is None


def test_a_cpu_older_than_the_build_is_refused_by_name(tmp_path: Path) -> None:
    module = fake_module(tmp_path, b"x86_64:" + V3_RUST.encode())
    with pytest.raises(ImportError) as e:
        _cpu.check(module, SANDY_BRIDGE)
    message = str(e.value)
    assert "lacks (abm, avx2, bmi1, bmi2, f16c, fma, movbe)" in message
    assert "target-cpu=native" in message
    # One missing feature is enough.
    with pytest.raises(ImportError, match=r"lacks \(movbe\)"):
        _cpu.check(module, V3 - {"movbe"})
    _cpu.check(module, V3)
    _cpu.check(module, V4)
    # No flags line (aarch64 writes "Features"; no /proc/cpuinfo): unchecked.
    _cpu.check(module, frozenset())


def test_a_build_for_the_older_cpu_loads_there(tmp_path: Path) -> None:
    # What `RUSTFLAGS='-C target-cpu=native'` records on that machine.
    native = fake_module(tmp_path, b"x86_64:avx,cmpxchg16b,fxsr,popcnt,sse,sse2,sse3,ssse3")
    _cpu.check(native, SANDY_BRIDGE)


def test_forcing_a_build_the_cpu_or_install_lacks_fails() -> None:
    with pytest.raises(ImportError, match="lacks avx512bw"):
        _cpu.choose(V4 - {"avx512bw"}, {"x86_64_v4"}, "x86-64-v4")
    with pytest.raises(ImportError, match="no such build"):
        _cpu.choose(V4, set(), "x86-64-v4")
    with pytest.raises(ImportError, match="unknown build"):
        _cpu.choose(V4, {"x86_64_v4"}, "x86-64-v9")
    assert _cpu.choose(SANDY_BRIDGE, {"x86_64_v4"}, "portable") == _cpu.PORTABLE


def test_cpu_flags_reads_the_first_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert _cpu.cpu_flags(str(info)) == {"fpu", "avx2", "fma"}
    aarch64 = tmp_path / "aarch64"
    aarch64.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert _cpu.cpu_flags(str(aarch64)) == frozenset()
    assert _cpu.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_the_installed_module_records_its_features() -> None:
    # The module in use was found by the check before it was loaded: its file
    # holds the features it reports, and this CPU has them all.
    native = erllama._erllama
    recorded = native._target_features
    arch, _, features = recorded.partition(":")
    assert arch == "x86_64"
    assert "avx2" in features.split(",")  # .cargo/config.toml: x86-64-v3
    assert native.__file__ is not None
    needs = _cpu.build_needs(Path(native.__file__))
    assert needs is not None
    assert needs == {_cpu.CPUINFO_NAMES[f] for f in features.split(",") if f in _cpu.CPUINFO_NAMES}
    assert needs <= _cpu.cpu_flags()


def test_import_on_an_older_cpu_raises_instead_of_crashing(tmp_path: Path) -> None:
    # A copy of the installed package (its module file untouched) that reads
    # a Sandy Bridge's /proc/cpuinfo: `import erllama` raises ImportError
    # naming what the module needs, before loading it.
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {' '.join(sorted(SANDY_BRIDGE))}\n")
    copy = tmp_path / "site" / "erllama"
    shutil.copytree(Path(erllama.__file__).parent, copy)
    source = (copy / "_cpu.py").read_text()
    assert source.count('"/proc/cpuinfo"') == 1
    (copy / "_cpu.py").write_text(source.replace('"/proc/cpuinfo"', repr(str(cpuinfo))))

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "import erllama; print(erllama._cpu.selected())"],
            cwd=tmp_path,
            env={"PYTHONPATH": str(copy.parent), "PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    refused = run()
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("ImportError: ")
    assert "lacks (abm, avx2, bmi1, bmi2, f16c, fma, movbe)" in refused.stderr
    assert "target-cpu=native" in refused.stderr
    # The override loads it anyway (this machine can run it).
    forced = run(ERLLAMA_CPU_VARIANT="portable")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() == _cpu.PORTABLE
