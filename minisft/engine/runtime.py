"""Process-wide settings, by explicit call only: minisft's thread pool, the BLAS's threads,
the allocator. Importing minisft changes none of them.

Intra-op parallelism on the CPU:

BLAS runs matrix products on every core, but NumPy's elementwise loops (GELU, softmax,
LayerNorm, dropout) run on one. They release the GIL, though, so a large row-wise kernel
can be cut into contiguous blocks of rows that a small thread pool runs side by side, the
way PyTorch uses OpenMP. Each block computes exactly what the whole would for its rows, so
results do not depend on the thread count.

Matrix products run on the same threads: the fast kernels cut them into tiles of rows and
ask the BLAS for one thread while they run (`one_blas_thread`), so that BLAS's own worker
threads, which spin for a while after each product, never compete with the pool. That works
whatever was imported first: nothing depends on environment variables read when NumPy
loads its BLAS.

The thread count defaults to MINISFT_NUM_THREADS, else OMP_NUM_THREADS, else the cores this
process may run on; `set_num_threads` changes it.
"""
import contextlib
import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy

from minisft.engine.backend import get_array_module

MIN_BLOCK_ELEMENTS = 1 << 17  # smaller blocks cost more to hand over than they save
MULTIPLY_ADDS_PER_ELEMENT = 16  # a product's multiply-add costs about 1/16 of an element's elementwise work
CACHE_ELEMENTS = 1 << 18  # a piece of a few arrays of this many floats stays in the CPU's cache

_lock = threading.Lock()
_threads = None
_pool = None
_local = threading.local()  # .inside: this thread is running a block (no nesting)


def _default_threads():
    for name in ("MINISFT_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a whole number of threads") from None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def get_num_threads():
    """How many threads the fast kernels use (their row blocks and matrix-product tiles)."""
    global _threads
    if _threads is None:
        _threads = _default_threads()
    return _threads


def set_num_threads(count):
    """Use `count` threads for the fast kernels from now on (1: run them inline)."""
    global _threads, _pool
    if int(count) < 1:
        raise ValueError(f"set_num_threads: need at least 1 thread, not {count}")
    with _lock:
        _threads = int(count)
        if _pool is not None:
            _pool.shutdown()
            _pool = None


def _executor():
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(get_num_threads() - 1, thread_name_prefix="minisft")
        return _pool


def _forget_pool():
    """In a forked child the pool's threads do not exist: start a new pool on next use."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _run_block(kernel, start, stop):
    _local.inside = True
    try:
        return kernel(start, stop)
    finally:
        _local.inside = False


def for_blocks(kernel, rows, row_elements=1, tile=1):
    """Call kernel(start, stop) over contiguous blocks that cover range(rows), on up to
    get_num_threads() threads, and return the results in block order.

    `row_elements` (elements per row) sizes the blocks: work under MIN_BLOCK_ELEMENTS per
    thread, or a call made from inside another block, runs inline as one block. Block
    bounds are multiples of `tile` rows.
    """
    tiles = -(-rows // tile)
    threads = min(get_num_threads(), tiles, max(1, rows * row_elements // MIN_BLOCK_ELEMENTS))
    if threads <= 1 or getattr(_local, "inside", False):
        return [kernel(0, rows)]
    bounds = [min(rows, tiles * i // threads * tile) for i in range(threads + 1)]
    futures = [_executor().submit(_run_block, kernel, start, stop)
               for start, stop in zip(bounds[1:-1], bounds[2:])]
    try:
        results = [_run_block(kernel, bounds[0], bounds[1])]
    finally:
        wait(futures)  # every block has finished before anything is returned or raised
    return results + [future.result() for future in futures]


def by_rows(kernel, *arrays, cache_sized=False, tile=None, row_elements=None):
    """kernel(*blocks) over blocks of rows (the leading axis) of `arrays`, None passed
    through, run side by side by for_blocks; on the GPU once, over the whole arrays.
    Returns the kernel's results in block (and piece) order.

    - cache_sized: each thread walks its block in pieces of about CACHE_ELEMENTS elements (at
      least a row), so that a kernel of many passes finds its operands in the CPU's cache.
    - tile: blocks and pieces are tiles of that many rows, the same tiles for any thread
      count (for BLAS calls, whose rounding depends on the rows they are given).
    - row_elements: the work per row that decides how many threads are worth starting
      (default: the first array's elements per row).

    The kernel must treat rows independently, so that the result does not depend on the
    blocks: elementwise work, reductions along a row by einsum, batched products one matrix
    per row, and BLAS calls over fixed tiles are fine; a BLAS call across a block's rows is
    not, as BLAS rounds a row differently by its place in the block."""
    lead = arrays[0]
    if get_array_module(lead) is not numpy or lead.ndim == 0:
        return [kernel(*arrays)]

    row_elements = row_elements or lead.size // max(lead.shape[0], 1)
    step = tile or (max(1, CACHE_ELEMENTS // max(row_elements, 1)) if cache_sized else None)

    def run(start, stop):
        size = step or max(stop - start, 1)
        return [kernel(*(None if a is None else a[piece:min(piece + size, stop)] for a in arrays))
                for piece in range(start, max(stop, start + 1), size)]
    return [result for block in for_blocks(run, lead.shape[0], row_elements, tile or 1) for result in block]


# --- the BLAS's own threads ---------------------------------------------------------------
_BLAS_SETTERS = (  # (set, get) symbol pairs: OpenBLAS as NumPy's wheels ship it, OpenBLAS, MKL
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
)


@functools.cache
def blas_threads_control():
    """(set, get) of the thread count of the BLAS that NumPy loaded, found among this
    process's shared libraries (Linux), or None where it cannot be found."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "blas" in line.lower() or "mkl" in line.lower()}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _BLAS_SETTERS:
            if hasattr(library, set_name) and hasattr(library, get_name):
                return getattr(library, set_name), getattr(library, get_name)
    return None


@contextlib.contextmanager
def one_blas_thread():
    """Run the block with the BLAS on one thread (restored after), or, where its thread count
    cannot be set, leave it as it is. Yields whether it took effect."""
    control = blas_threads_control()
    if control is None:
        yield False
        return
    set_threads, get_threads = control
    previous = get_threads()
    set_threads(1)
    try:
        yield True
    finally:
        set_threads(previous)


def by_tiles_on_one_blas_thread(kernel, *arrays, tile, multiply_adds, elementwise=0):
    """by_rows(kernel, *arrays, tile=tile) with the BLAS on one thread, for kernels made of
    matrix products (`multiply_adds` per row of the first array, and `elementwise` elements of
    elementwise work beside them): the products run side by side on minisft's threads. Where
    the BLAS's thread count cannot be set, kernel runs once over the whole arrays (BLAS
    threads it)."""
    if get_array_module(arrays[0]) is not numpy:
        return [kernel(*arrays)]
    row_elements = max(1, multiply_adds // MULTIPLY_ADDS_PER_ELEMENT + elementwise)
    with one_blas_thread() as pinned:
        if pinned:
            return by_rows(kernel, *arrays, tile=tile, row_elements=row_elements)
    return [kernel(*arrays)]


# --- how a Linear layer's matrix products use the CPU -------------------------------------
_PRODUCTS = {"strategy": "tiles"}


def set_products(strategy):
    """How the fast kernels run a Linear layer's matrix products on the CPU (process-wide):
    - "tiles" (the default): fixed tiles of rows on minisft's threads, the BLAS on one thread,
      so that results do not depend on the thread count;
    - "blas": one call over all the rows on the BLAS's own threads (results then depend on the
      BLAS's thread count).
    Measured on a 2-core Intel Xeon (AVX-512, OpenBLAS): alone, a MiniLM step's products run
    9-80% faster on the BLAS's threads, yet the whole training step at 32x128 runs 16% slower
    (2.12 s against 1.83 s in `python -m benchmarks --only model_bench`, which measures both),
    as the BLAS's threads, idle between its calls, spin on the cores that minisft's
    elementwise kernels use."""
    if strategy not in ("tiles", "blas"):
        raise ValueError(f"set_products: unknown strategy {strategy!r}: use 'tiles' or 'blas'")
    _PRODUCTS["strategy"] = strategy


def get_products():
    return _PRODUCTS["strategy"]


# --- the allocator ---------------------------------------------------------------------
def keep_freed_memory():
    """Ask glibc to keep freed large blocks for reuse instead of returning them to the OS.

    A training step allocates and frees many activation-sized arrays; by default glibc
    maps each large one fresh (page faults, zero-filling) and unmaps it on free, which
    costs about a tenth of a CPU training step. A process-wide setting, so only on request:
    the trainer calls it when TrainingArguments.keep_freed_memory is set (the CLI sets it),
    the benchmarks call it for minisft's runs; the process's resident size then stays at
    its peak. A no-op where it does not apply (not Linux/glibc). Returns whether it took
    effect.
    """
    libc = _libc()
    if libc is None:
        return False
    try:
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        largest = 2 ** 31 - 1  # mallopt takes a C int: anything larger wraps (to 0: trim always)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, largest))
    except AttributeError:
        return False


def release_free_memory():
    """Hand the pages of every free block back to the OS now (glibc's malloc_trim), however
    the allocator is set: the process's resident size drops to what its live arrays use.
    Gradient checkpointing calls it as each recomputed block ends, whose activations were
    the process's largest arrays; with keep_freed_memory, freed blocks would otherwise stay
    resident, and the next block's arrays, of other sizes, would not always fit in them. The
    released pages cost a page fault each when used again. A no-op where it does not apply
    (not Linux/glibc). Returns whether it could ask (not whether any page was free)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


@functools.cache
def _libc():
    """The C library (ctypes.CDLL), or None where it cannot be found."""
    import ctypes.util  # its own imports (subprocess, ...) cost an import of minisft 15 ms

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None
