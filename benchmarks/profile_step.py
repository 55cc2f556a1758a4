"""Where a training step's time goes: wall time per op, forward and backward, and the rest
(optimizer, clipping, graph bookkeeping), for minisft on all-MiniLM-L6-v2.

    python -m benchmarks.profile_step [BATCH LENGTH]      (default 32 128)

Each op's forward and backward is timed on the calling thread, which waits for the thread
pool's blocks, so the figures are wall time and add up to the step.
"""
import collections
import sys
import time

from benchmarks.run import ROOT  # sets the thread and BLAS environment, imports minisft first


def _op_classes(root):
    """Every subclass of `root`, however deep."""
    found, stack = [], [root]
    while stack:
        for sub in stack.pop().__subclasses__():
            found.append(sub)
            stack.append(sub)
    return found


def _time_ops(totals):
    """Wrap every op's forward and backward to add its wall time to totals[name]."""
    from minisft.engine.tensor import Function

    def timed(method, name):
        def run(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start
        return run

    for cls in _op_classes(Function):
        for kind in ("forward", "backward"):
            if kind in vars(cls):  # only where the class defines it: no time counted twice
                setattr(cls, kind, timed(vars(cls)[kind], f"{cls.__name__}.{kind}"))


def main(argv=None):
    from benchmarks.workloads import Minisft
    from minisft.cli.fetch import fetch

    batch, length = (int(a) for a in (argv or sys.argv[1:] or ["32", "128"]))
    step = Minisft(fetch("all-MiniLM-L6-v2", root=ROOT / "weights")).train_step(batch, length)
    for _ in range(2):  # warm-up
        step()
    totals, repeats = collections.defaultdict(float), 5
    _time_ops(totals)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    per_step = (time.perf_counter() - start) / repeats
    print(f"training step {batch}x{length}: {per_step * 1e3:.0f} ms (mean of {repeats})")
    for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        if seconds / repeats >= 5e-4:
            print(f"  {name:32s} {seconds / repeats * 1e3:7.1f} ms")
    print(f"  {'rest (optimizer, clipping, graph)':32s} {(per_step - sum(totals.values()) / repeats) * 1e3:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
