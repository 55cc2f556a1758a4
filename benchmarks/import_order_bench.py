"""Does import order matter? Training steps at 32x128 in fresh processes that import NumPy
before minisft (as most scripts do) or minisft first; neither sets any environment
variable. Both columns are minisft: the ratio is NumPy-first over minisft-first."""
import json
import subprocess
import sys

from benchmarks.common import Figure

WORKER = """
import json, sys, time
{first}
sys.path.insert(0, {root!r})
from benchmarks.workloads import Minisft
step = Minisft({model!r}).train_step({batch}, {length})
for _ in range(2):
    step()
times = []
for _ in range({repeats}):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""
ORDERS = {"numpy first": "import numpy\nimport minisft", "minisft first": "import minisft\nimport numpy"}


def step_times(env, first, batch, length, repeats):
    code = WORKER.format(first=first, root=str(env.root), model=str(env.model_dir), batch=batch,
                         length=length, repeats=repeats)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(env, quick):
    batch, length, repeats, rounds = (4, 32, 2, 1) if quick else (32, 128, 3, 2)
    times = {name: [] for name in ORDERS}
    for _ in range(rounds):  # alternating processes, so that drift hits both alike
        for name, first in ORDERS.items():
            times[name] += step_times(env, first, batch, length, repeats)
    return [Figure(f"training step {batch}x{length}, NumPy imported before minisft", "s",
                   times["numpy first"], times["minisft first"],
                   note="reference column: minisft imported first (both minisft, own processes)")]
