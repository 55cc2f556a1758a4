"""Kernel sets: the array code behind every op, in two sets with the same signatures.

- `reference` (minisft/kernels/reference.py): each formula in plain NumPy/CuPy, one
  statement per step; read it to learn what an op computes.
- `fast` (minisft/kernels/fast.py): the same results, threaded, chunked and in place.

minisft.functional checks arguments, keeps what backward needs and calls the active set's
kernel. MINISFT_KERNELS=reference|fast picks the set (read on first use), and so does
`set_kernels`; by default the fast set runs on the CPU and the reference set on the GPU
(the fast set's threads and chunks are for CPUs).
"""
import os

from minisft.backend import is_cupy_array
from minisft.kernels import fast, reference

SETS = {"reference": reference, "fast": fast}
_UNSET = object()
_chosen = _UNSET  # a name from SETS, or None for the default by device


def _from_environment():
    name = os.environ.get("MINISFT_KERNELS", "").strip()
    if name and name not in SETS:
        raise ValueError(f"MINISFT_KERNELS={name!r}: use 'reference' or 'fast' (or unset it for the default)")
    return name or None


def set_kernels(name):
    """Use the kernel set `name` ('reference' or 'fast') on every device from now on; None
    restores the default (fast on the CPU, reference on the GPU)."""
    global _chosen
    if name is not None and name not in SETS:
        raise ValueError(f"set_kernels: unknown kernel set {name!r}: use 'reference', 'fast' or None")
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
    if name is None:
        name = "reference" if is_cupy_array(array) else "fast"
    return SETS[name]
