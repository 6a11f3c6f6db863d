#!/usr/bin/env python3
"""Which system packages does building erllama still need?

``./dev`` asks this script instead of guessing from file names. Each check
asks the question the way the program that needs the thing asks it:

* **libclang** -- bindgen (llama-cpp-sys-2's build script) loads libclang at
  run time through clang-sys 1.9 (bindgen's default ``runtime`` feature). This
  module repeats clang-sys's search: ``LIBCLANG_PATH`` (a file or a directory,
  and then nothing else), ``llvm-config --prefix``'s ``bin``/``lib``/``lib64``,
  ``LD_LIBRARY_PATH``, ``LIBRARY_PATH`` and the standard directory globs, for
  ``libclang.so``, ``libclang-*.so``, ``libclang.so.*`` and ``libclang-*.so.*``,
  skipping ``libclang-cpp`` (the C++ library, which is not libclang) and any
  file that is not a 64-bit ELF object. On the real system root a library that
  is found is also *used*: it must parse a header that includes ``<stdbool.h>``
  and ``<stddef.h>``, as llama.cpp's headers do, which fails when clang's own
  resource headers (Debian's ``libclang-common-N-dev``) are missing.
* **cmake** -- the ``cmake`` crate runs ``$CMAKE`` or ``cmake`` from ``PATH``;
  llama.cpp needs 3.14 or newer.
* **make** -- cmake's default generator on Linux is Unix Makefiles.
* **C and C++ compilers** -- the ``cc`` crate and cmake run ``$CC``/``$CXX`` or
  ``cc``/``c++``.
* **redis-server** -- the remote tier's tests start ``$ERLLAMA_REDIS_SERVER`` or
  ``redis-server`` from ``PATH`` (Redis 6 or newer, or Valkey: its
  ``--version`` says ``v=X.Y.Z``).

``python3 tools/prereqs.py`` prints the Debian packages to install, one per
line (nothing when all is well). ``--explain`` prints what each check found.
``--root DIR`` searches a directory tree instead of ``/`` (for tests; the
load-and-parse probe only runs against the real root).
"""

from __future__ import annotations

import argparse
import ctypes
import fnmatch
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

#: clang-sys 1.9.1 build/dynamic.rs, runtime linking on Linux.
LIBCLANG_PATTERNS = ("libclang.so", "libclang-*.so", "libclang.so.*", "libclang-*.so.*")
#: clang-sys 1.9.1 build/common.rs, DIRECTORIES_LINUX.
LIBCLANG_DIRECTORIES = (
    "/usr/local/llvm*/lib*",
    "/usr/local/lib*/*/*",
    "/usr/local/lib*/*",
    "/usr/local/lib*",
    "/usr/lib*/*/*",
    "/usr/lib*/*",
    "/usr/lib*",
)
CMAKE_MIN = (3, 14)
REDIS_MIN = (6, 0)


@dataclass(frozen=True)
class Check:
    """One prerequisite: whether it is usable, what was found, what installs it."""

    name: str
    ok: bool
    detail: str
    package: str


def _is_elf64(path: Path) -> bool:
    """clang-sys's validate_library: an ELF file of class 2 (64-bit)."""
    try:
        with path.open("rb") as f:
            head = f.read(5)
    except OSError:
        return False
    return head[:4] == b"\x7fELF" and head[4:5] == b"\x02"


def _search_directory(directory: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        # clang-sys: libclang-cpp.so.N is the C++ API library, not libclang.
        if "-cpp." in name:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in LIBCLANG_PATTERNS):
            path = directory / name
            if path.is_file():
                found.append(path)
    return found


def _rooted(root: Path, pattern: str) -> str:
    return str(root / pattern.lstrip("/"))


def libclang_candidates(root: Path, env: Mapping[str, str]) -> Iterator[Path]:
    """Every file clang-sys would consider, in its order of preference."""
    forced = env.get("LIBCLANG_PATH")
    if forced:
        path = Path(forced)
        if path.parent and path.name and path in _search_directory(path.parent):
            yield path
            return
        yield from _search_directory(path)
        return
    llvm_config = env.get("LLVM_CONFIG_PATH", "llvm-config")
    if root == Path("/") and shutil.which(llvm_config, path=env.get("PATH")):
        try:
            prefix = subprocess.run(
                [llvm_config, "--prefix"], capture_output=True, text=True, check=True, timeout=30
            ).stdout.splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            prefix = ""
        if prefix:
            for sub in ("bin", "lib", "lib64"):
                yield from _search_directory(Path(prefix) / sub)
    for var in ("LD_LIBRARY_PATH", "LIBRARY_PATH"):
        for directory in filter(None, env.get(var, "").split(os.pathsep)):
            yield from _search_directory(Path(directory))
    for pattern in LIBCLANG_DIRECTORIES:
        for directory in sorted(glob.glob(_rooted(root, pattern))):
            if os.path.isdir(directory):
                yield from _search_directory(Path(directory))


_PROBE_HEADER = b"#include <stdbool.h>\n#include <stddef.h>\n#include <stdint.h>\nbool f(size_t);\n"


def libclang_parses(library: Path) -> str | None:
    """Load ``library`` and parse a header as bindgen would; None when it works."""
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as e:
        return f"cannot load: {e}"
    lib.clang_createIndex.restype = ctypes.c_void_p
    lib.clang_createIndex.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.clang_parseTranslationUnit.restype = ctypes.c_void_p
    lib.clang_parseTranslationUnit.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_uint,
    ]
    lib.clang_getNumDiagnostics.restype = ctypes.c_uint
    lib.clang_getNumDiagnostics.argtypes = [ctypes.c_void_p]
    lib.clang_disposeTranslationUnit.argtypes = [ctypes.c_void_p]
    lib.clang_disposeIndex.argtypes = [ctypes.c_void_p]
    with tempfile.TemporaryDirectory() as tmp:
        header = Path(tmp) / "probe.h"
        header.write_bytes(_PROBE_HEADER)
        index = lib.clang_createIndex(0, 0)
        args = (ctypes.c_char_p * 2)(b"-x", b"c")
        tu = lib.clang_parseTranslationUnit(index, str(header).encode(), args, 2, None, 0, 0)
        try:
            if not tu:
                return "libclang could not parse a probe header"
            if lib.clang_getNumDiagnostics(tu):
                return "libclang cannot find the C standard headers (clang's resource headers)"
        finally:
            if tu:
                lib.clang_disposeTranslationUnit(tu)
            lib.clang_disposeIndex(index)
    return None


def check_libclang(root: Path, env: Mapping[str, str]) -> Check:
    seen: list[str] = []
    for path in libclang_candidates(root, env):
        if not _is_elf64(path):
            seen.append(f"{path} (not a 64-bit ELF library)")
            continue
        if root == Path("/"):
            problem = libclang_parses(path)
            if problem:
                seen.append(f"{path} ({problem})")
                continue
        return Check("libclang", True, str(path), "libclang-dev")
    detail = "no usable libclang" + (": " + "; ".join(seen) if seen else "")
    return Check("libclang", False, detail, "libclang-dev")


def _version(text: str) -> tuple[int, ...]:
    for word in text.split():
        word = word.removeprefix("v=")
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts[:2]):
            return tuple(int(p) for p in parts[:2])
    return ()


def check_tool(
    name: str, command: str, package: str, env: Mapping[str, str], minimum: tuple[int, ...] = ()
) -> Check:
    exe = shutil.which(command, path=env.get("PATH"))
    if exe is None:
        return Check(name, False, f"{command} not on PATH", package)
    try:
        out = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return Check(name, False, f"{exe} --version failed: {e}", package)
    if minimum and _version(out) < minimum:
        want = ".".join(map(str, minimum))
        return Check(name, False, f"{exe} is {out.splitlines()[0]}; need >= {want}", package)
    return Check(name, True, f"{exe}: {out.splitlines()[0] if out else ''}", package)


def checks(root: Path, env: Mapping[str, str]) -> list[Check]:
    result = [check_libclang(root, env)]
    if root == Path("/"):
        result += [
            check_tool("cmake", env.get("CMAKE", "cmake"), "cmake", env, CMAKE_MIN),
            check_tool("make", "make", "make", env),
            check_tool("C compiler", env.get("CC", "cc"), "gcc", env),
            check_tool("C++ compiler", env.get("CXX", "c++"), "g++", env),
            check_tool(
                "redis-server",
                env.get("ERLLAMA_REDIS_SERVER", "redis-server"),
                "redis-server",
                env,
                REDIS_MIN,
            ),
        ]
    return result


def clang_resource_include(library: Path) -> Path | None:
    """clang's own headers (stddef.h, stdbool.h) for the libclang at ``library``.

    libclang looks for them in ``<its lib dir>/clang/<version>/include``; a
    cross build (zig's glibc 2.28 target) loses that default, so ``./dev
    wheel`` passes the directory to bindgen explicitly.
    """
    for libdir in (library.parent, library.resolve().parent):
        found = sorted(libdir.glob("clang/*/include/stddef.h"))
        if found:
            return found[-1].parent
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/"), help="system root to search")
    parser.add_argument("--explain", action="store_true", help="say what each check found")
    parser.add_argument(
        "--bindgen-includes",
        action="store_true",
        help="print the -I flags bindgen needs for a cross build, and exit",
    )
    args = parser.parse_args(argv)
    if args.bindgen_includes:
        check = check_libclang(args.root, os.environ)
        include = clang_resource_include(Path(check.detail)) if check.ok else None
        if include is None:
            print("prereqs: no libclang with its resource headers", file=sys.stderr)
            return 1
        multiarch = subprocess.run(
            ["gcc", "-print-multiarch"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirs = [include, *([Path("/usr/include") / multiarch] if multiarch else []), "/usr/include"]
        print(" ".join(f"-I{d}" for d in dirs))
        return 0
    missing: list[str] = []
    for check in checks(args.root, os.environ):
        if args.explain:
            print(
                f"{'ok' if check.ok else 'MISSING':8} {check.name}: {check.detail}", file=sys.stderr
            )
        if not check.ok and check.package not in missing:
            missing.append(check.package)
    for package in missing:
        print(package)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
