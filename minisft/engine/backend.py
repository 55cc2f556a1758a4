"""Where arrays live: NumPy on the CPU, CuPy on an NVIDIA GPU.

This is the only module that knows which array library holds the data. Every op asks
`get_array_module(array)` (or `Device.xp`) for its array module, so the same code runs on
both. CuPy is imported lazily, only when a "cuda" device is requested.
"""
import contextlib
import functools

import numpy

from minisft.engine.errors import MissingExtra, UsageError

_cupy = None
_NO_DEVICE = contextlib.nullcontext()


def _import_cupy():
    """Import CuPy on first use; raise a clear error if it or a GPU is missing."""
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError as exc:
            raise MissingExtra(
                "device 'cuda' needs CuPy, which is not installed: "
                "pip install 'minisft[gpu]' (or the cupy-cudaXXx wheel matching your CUDA)"
            ) from exc
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDA driver missing or unusable
            raise UsageError(f"device 'cuda' needs an NVIDIA GPU and driver: {exc}") from exc
        if count == 0:
            raise UsageError("device 'cuda' needs an NVIDIA GPU, but CuPy sees none")
        _cupy = cupy
    return _cupy


@functools.cache  # whether this process can use a GPU does not change while it runs
def cuda_available():
    """True when CuPy imports, sees a GPU and runs a kernel on it: a driver without the CUDA
    runtime libraries (or a GPU too old for this CuPy) gives False, not failing tests."""
    try:
        cupy = _import_cupy()
        return int((cupy.arange(3, dtype=cupy.float32) * 2).sum()) == 6
    except Exception:  # CuPy's CUDARuntimeError, CompileException, ImportError of libraries, ...
        return False


def is_cupy_array(array):
    return type(array).__module__.split(".")[0] == "cupy"


def get_array_module(array):
    """The array module (numpy or cupy) that owns `array`."""
    return _cupy if is_cupy_array(array) else numpy


class Device:
    """A place for arrays: Device("cpu"), Device("cuda") or Device("cuda:1")."""

    def __init__(self, spec="cpu"):
        if isinstance(spec, Device):
            self.type, self.index = spec.type, spec.index
            return
        kind, _, index = str(spec).partition(":")
        if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
            raise ValueError(f"unknown device {spec!r}: use 'cpu', 'cuda' or 'cuda:N'")
        self.type = kind
        self.index = int(index) if index else (0 if kind == "cuda" else None)

    @property
    def xp(self):
        """The array module for this device."""
        return _import_cupy() if self.type == "cuda" else numpy

    def put(self, array):
        """Return `array` on this device (no copy if it is already there)."""
        if self.type == "cpu":
            return array.get() if is_cupy_array(array) else numpy.asarray(array)
        cupy = _import_cupy()
        with cupy.cuda.Device(self.index):
            return cupy.asarray(array)

    def activate(self):
        """Make this GPU the thread's current device (as torch.cuda.set_device), so that
        arrays made from scratch (random draws, zeros) land on it; a no-op on the CPU."""
        if self.type == "cuda":
            _import_cupy().cuda.Device(self.index).use()
        return self

    def __eq__(self, other):
        other = other if isinstance(other, Device) else Device(other)
        return (self.type, self.index) == (other.type, other.index)

    def __hash__(self):
        return hash((self.type, self.index))

    def __str__(self):
        return self.type if self.type == "cpu" else f"cuda:{self.index}"

    def __repr__(self):
        return f"Device({str(self)!r})"


def read_back(*values):
    """Scalars computed on one device (0-d arrays) as a host NumPy array, in one transfer:
    one synchronisation with a GPU however many values a check needs."""
    return Device("cpu").put(get_array_module(values[0]).stack(values))


def on_device(array):
    """A context in which CuPy's kernels and allocations run on the GPU that holds `array`
    (CuPy launches on the thread's current device, which is not necessarily the array's);
    a no-op on the CPU. Ops and backward run inside it, so cuda:1 works like cuda:0."""
    return array.device if is_cupy_array(array) else _NO_DEVICE


def device_of(array):
    """The Device that holds `array`."""
    if is_cupy_array(array):
        return Device(f"cuda:{array.device.id}")
    return Device("cpu")


def index_add(target, index, values):
    """target[index[i]] += values[i] for a 1-D integer `index`, duplicates summed.

    Used by gradient scatters (embedding, advanced indexing). On NumPy it sorts the indices:
    an index that occurs once adds its row directly, and the runs of repeated ones are summed
    by `add.reduceat` (which costs a few microseconds per run, so it gets only those), much
    faster than `numpy.add.at`; each run is summed in the order of `index`. On CuPy it uses
    the GPU's atomic `scatter_add`.
    """
    if is_cupy_array(target):
        import cupyx

        cupyx.scatter_add(target, index, values)
        return target
    if index.size == 0:
        return target
    order = numpy.argsort(index, kind="stable")
    sorted_index = index[order]
    starts = numpy.flatnonzero(numpy.r_[True, sorted_index[1:] != sorted_index[:-1]])
    lengths = numpy.diff(numpy.r_[starts, index.size])
    once = lengths == 1
    target[sorted_index[starts[once]]] += values[order[starts[once]]]
    if not once.all():
        runs = numpy.repeat(~once, lengths)  # the sorted positions inside a run of repeats
        run_starts = numpy.r_[0, numpy.cumsum(lengths[~once])[:-1]]
        target[sorted_index[starts[~once]]] += numpy.add.reduceat(values[order[runs]], run_starts, axis=0)
    return target
