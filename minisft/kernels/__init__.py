"""Kernel sets: the array code behind every op, in three sets with the same signatures.

- `reference` (minisft/kernels/reference.py): each formula in plain NumPy/CuPy, one
  statement per step; read it to learn what an op computes.
- `fast` (minisft/kernels/fast.py): the same results on the CPU, threaded, chunked and in place.
- `cuda` (minisft/kernels/cuda.py): the same results on an NVIDIA GPU, fused CUDA kernels
  (GELU, softmax with its mask, scale and dropout, LayerNorm, multi-tensor AdamW).

minisft.functional checks arguments, keeps what backward needs and calls the active set's
kernel. MINISFT_KERNELS=reference|fast|cuda picks the set (read on first use), and so does
`set_kernels`; by default the fast set runs on the CPU and the cuda set on the GPU. The
cuda set runs only on CuPy arrays: chosen, it leaves NumPy arrays to the default.
"""
import os

from minisft.engine.backend import is_cupy_array
from minisft.kernels import cuda, fast, reference

SETS = {"reference": reference, "fast": fast, "cuda": cuda}
_UNSET = object()
_chosen = _UNSET  # a name from SETS, or None for the default by device


def _from_environment():
    name = os.environ.get("MINISFT_KERNELS", "").strip()
    if name and name not in SETS:
        raise ValueError(f"MINISFT_KERNELS={name!r}: use 'reference', 'fast' or 'cuda' (or unset it for the default)")
    return name or None


def set_kernels(name):
    """Use the kernel set `name` ('reference', 'fast' or 'cuda') from now on; None restores
    the default (fast on the CPU, cuda on the GPU)."""
    global _chosen
    if name is not None and name not in SETS:
        raise ValueError(f"set_kernels: unknown kernel set {name!r}: use 'reference', 'fast', 'cuda' or None")
    _chosen = name


def get_kernels():
    """The chosen set's name, or None for the default by device."""
    global _chosen
    if _chosen is _UNSET:
        _chosen = _from_environment()
    return _chosen


def for_array(array):
    """The kernel module to run on `array`."""
    name = get_kernels()
    if name is None or (name == "cuda" and not is_cupy_array(array)):
        name = "cuda" if is_cupy_array(array) else "fast"
    return SETS[name]
