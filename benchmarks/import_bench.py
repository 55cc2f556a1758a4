"""Import time of `minisft` vs `torch, transformers`, in fresh processes (files in the OS
cache after the first run; the median of several)."""
import subprocess
import sys
import time

from benchmarks.common import Figure


def import_seconds(statement):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - start


def run(env, quick):
    repeats = 3 if quick else 7
    baseline = min(import_seconds("pass") for _ in range(3))
    ours, reference = [], []
    for _ in range(repeats):
        ours.append(import_seconds("import minisft") - baseline)
        if env.reference:
            reference.append(import_seconds("import torch, transformers") - baseline)
    return [Figure("import time", "s", ours, reference or None,
                   note="fresh process, minus an empty interpreter's start-up")]
