"""Model names as transformers resolves them: `ORG/NAME` (or `NAME`) found in the Hugging Face
cache, or downloaded into it with huggingface_hub's `snapshot_download` (the `hub` extra).

The cache is huggingface_hub's: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
`~/.cache/huggingface/hub` (`XDG_CACHE_HOME` moves `~/.cache`). A repository lives in
`models--ORG--NAME/`; `refs/REVISION` holds the commit a branch or tag points at, and
`snapshots/COMMIT/` the files of that commit.
"""
import importlib.util
import os
import pathlib

from minisft.engine.errors import UserError

# What minisft reads of a checkpoint: config, weights, tokenizer, sentence-transformers' modules.
CONFIG_AND_TOKENIZER = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spm.model",
                        "sentencepiece.bpe.model", "modules.json", "sentence_bert_config.json",
                        "config_sentence_transformers.json", "*/config.json"]
SAFETENSORS = ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"]
TORCH_BIN = ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"]
_HUB_ERROR_MODULES = {"huggingface_hub", "httpx", "httpcore", "requests", "urllib3"}  # no repository, revision, network
_TRUE = {"1", "on", "yes", "true"}  # huggingface_hub's truthy environment values


class HubError(UserError, RuntimeError):
    """A name that is neither in the Hugging Face cache nor downloadable here."""


def cache_dir():
    """The Hugging Face hub cache, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):  # the older name
        return pathlib.Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return pathlib.Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "huggingface" / "hub"


def offline():
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def repo_folder(repo_id):
    """models--ORG--NAME under the cache."""
    return cache_dir() / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id, revision="main"):
    """The snapshot directory of `revision` (a branch, tag or commit) if it holds a config.json, else None."""
    folder = repo_folder(repo_id)
    ref = folder / "refs" / revision
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit
    return snapshot if (snapshot / "config.json").is_file() else None


def _download(repo_id, revision):
    """snapshot_download of the files minisft reads (safetensors weights, else torch's .bin)."""
    from huggingface_hub import snapshot_download

    def download(patterns):
        # the cache and the endpoint as the environment says now (huggingface_hub reads them once, at import)
        return pathlib.Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir(),
                                              endpoint=os.environ.get("HF_ENDPOINT") or None))

    try:
        path = download(CONFIG_AND_TOKENIZER + SAFETENSORS)
        if not any(path.glob("*.safetensors")):
            path = download(CONFIG_AND_TOKENIZER + TORCH_BIN)
    except Exception as exc:
        if not isinstance(exc, OSError) and type(exc).__module__.split(".")[0] not in _HUB_ERROR_MODULES:
            raise
        raise HubError(f"{repo_id} (revision {revision}): huggingface_hub could not download it "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
                       "check the name and the network, or set HF_HUB_OFFLINE=1 to use the cache only") from None
    if not (path / "config.json").is_file():
        raise HubError(f"{repo_id} (revision {revision}) has no config.json: not a transformers checkpoint")
    return path


def resolve(repo_id, revision=None):
    """The local directory of hub model `repo_id` at `revision` (default main): from the cache, else
    downloaded when online and huggingface_hub is installed; else a HubError saying where minisft
    looked and what to do."""
    revision = revision or "main"
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is not None:
        return snapshot
    looked = repo_folder(repo_id) / "snapshots"
    if offline():
        raise HubError(f"{repo_id} (revision {revision}) is not in the Hugging Face cache (looked in {looked}) "
                       "and HF_HUB_OFFLINE is set: download it on a machine with network, or unset HF_HUB_OFFLINE")
    if importlib.util.find_spec("huggingface_hub") is None:  # the hub extra
        raise HubError(f"{repo_id} (revision {revision}) is not in the Hugging Face cache (looked in {looked}); "
                       "to download it, install the hub extra: pip install -e '.[hub]' "
                       "(or pip install huggingface_hub)")
    return _download(repo_id, revision)
