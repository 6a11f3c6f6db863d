"""``tools/prereqs.py``: ``./dev``'s prerequisite checks, against fake system layouts.

The libclang check must find what bindgen (clang-sys) finds and nothing else:
a machine with only ``libclang-cpp.so.14`` (the C++ library) must get
``libclang-dev`` installed, which the old glob (``/usr/lib/*/libclang*.so*``)
got wrong.
"""

from __future__ import annotations

import glob
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "prereqs.py"
# A minimal 64-bit ELF header: what clang-sys reads to validate a library.
ELF64 = b"\x7fELF\x02\x01\x01" + bytes(57)
ELF32 = b"\x7fELF\x01\x01\x01" + bytes(57)


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prereqs", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["prereqs"] = module
    spec.loader.exec_module(module)
    return module


prereqs = _load()


def _layout(root: Path, files: dict[str, bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def _missing(root: Path, env: dict[str, str] | None = None) -> list[str]:
    """Run the script as ./dev does, on a fake root; the packages it asks for."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root)],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )
    return out.stdout.split()


def _old_glob_says_present(root: Path) -> bool:
    """The check ./dev used before: any libclang*.so* file counts."""
    return bool(
        glob.glob(str(root / "usr/lib/llvm-*/lib/libclang.so*"))
        or glob.glob(str(root / "usr/lib/*/libclang*.so*"))
    )


def test_only_libclang_cpp_means_install(tmp_path: Path) -> None:
    root = _layout(
        tmp_path,
        {
            "usr/lib/x86_64-linux-gnu/libclang-cpp.so.14": ELF64,
            "usr/lib/llvm-14/lib/libclang-cpp.so.14": ELF64,
            "usr/lib/x86_64-linux-gnu/libLLVM-14.so.1": ELF64,
        },
    )
    # The bug this test exists for: the old glob took libclang-cpp for libclang.
    assert _old_glob_says_present(root)
    assert _missing(root) == ["libclang-dev"]


@pytest.mark.parametrize(
    "rel",
    [
        "usr/lib/x86_64-linux-gnu/libclang-14.so.1",
        "usr/lib/llvm-14/lib/libclang.so.1",
        "usr/lib/llvm-14/lib/libclang.so",
        "usr/lib/llvm-16/lib/libclang-16.so",
        "usr/local/lib/libclang.so.17",
    ],
)
def test_a_real_libclang_is_enough(tmp_path: Path, rel: str) -> None:
    root = _layout(tmp_path, {rel: ELF64, "usr/lib/x86_64-linux-gnu/libclang-cpp.so.14": ELF64})
    assert _missing(root) == []


def test_libclang_path_is_honoured(tmp_path: Path) -> None:
    root = _layout(tmp_path / "root", {"usr/lib/x86_64-linux-gnu/libclang-cpp.so.14": ELF64})
    custom = _layout(tmp_path / "opt", {"llvm/lib/libclang.so.18": ELF64})
    assert _missing(root, {"LIBCLANG_PATH": str(custom / "llvm/lib")}) == []
    # A file path works too.
    assert _missing(root, {"LIBCLANG_PATH": str(custom / "llvm/lib/libclang.so.18")}) == []
    # clang-sys searches only LIBCLANG_PATH when it is set: a library elsewhere
    # does not help then.
    _layout(root, {"usr/lib/llvm-14/lib/libclang.so.1": ELF64})
    assert _missing(root, {"LIBCLANG_PATH": str(tmp_path / "empty")}) == ["libclang-dev"]


def test_wrong_elf_class_and_non_elf_files_do_not_count(tmp_path: Path) -> None:
    root = _layout(
        tmp_path,
        {
            "usr/lib/i386-linux-gnu/libclang-14.so.1": ELF32,
            "usr/lib/llvm-14/lib/libclang.so": b"INPUT(libclang.so.1)\n",
        },
    )
    assert _missing(root) == ["libclang-dev"]


def test_library_path_variables_are_searched(tmp_path: Path) -> None:
    root = _layout(tmp_path / "root", {})
    extra = _layout(tmp_path / "extra", {"libclang.so.15": ELF64})
    assert _missing(root) == ["libclang-dev"]
    assert _missing(root, {"LD_LIBRARY_PATH": str(extra)}) == []
    assert _missing(root, {"LIBRARY_PATH": str(extra)}) == []


def test_the_real_machine_has_a_working_libclang() -> None:
    """After ./dev setup, the real search finds a libclang that parses headers."""
    check = prereqs.check_libclang(Path("/"), {"PATH": "/usr/bin:/bin"})
    assert check.ok, check.detail
    assert prereqs.libclang_parses(Path(check.detail)) is None


def test_tool_checks_ask_the_tool(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    old = fake / "cmake"
    old.write_text("#!/bin/sh\necho 'cmake version 3.10.2'\n")
    old.chmod(0o755)
    env = {"PATH": str(fake)}
    check = prereqs.check_tool("cmake", "cmake", "cmake", env, prereqs.CMAKE_MIN)
    assert not check.ok
    assert "need >= 3.14" in check.detail
    old.write_text("#!/bin/sh\necho 'cmake version 3.25.1'\n")
    assert prereqs.check_tool("cmake", "cmake", "cmake", env, prereqs.CMAKE_MIN).ok
    broken = fake / "c++"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    assert not prereqs.check_tool("C++ compiler", "c++", "g++", env).ok
    assert not prereqs.check_tool("make", "make", "make", env).ok


def test_redis_server_is_asked_for_its_version(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    env = {"PATH": str(fake)}
    assert not prereqs.check_tool(
        "redis-server", "redis-server", "redis-server", env, prereqs.REDIS_MIN
    ).ok
    server = fake / "redis-server"
    server.write_text("#!/bin/sh\necho 'Redis server v=5.0.14 sha=00000000:0 malloc=jemalloc'\n")
    server.chmod(0o755)
    old = prereqs.check_tool("redis-server", "redis-server", "redis-server", env, prereqs.REDIS_MIN)
    assert not old.ok
    assert "need >= 6.0" in old.detail
    server.write_text("#!/bin/sh\necho 'Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc'\n")
    assert prereqs.check_tool(
        "redis-server", "redis-server", "redis-server", env, prereqs.REDIS_MIN
    ).ok
    valkey = fake / "valkey-server"
    valkey.write_text("#!/bin/sh\necho 'Valkey server v=8.0.2 sha=00000000:0'\n")
    valkey.chmod(0o755)
    assert prereqs.check_tool(
        "redis-server", "valkey-server", "redis-server", env, prereqs.REDIS_MIN
    ).ok
