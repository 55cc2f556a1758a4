"""Two checkouts of minisft on the same workloads, in one run on one machine: step time
(median of the timed steps) and peak RSS (VmHWM) of benchmarks/workloads.py's training
steps and forward pass, each (checkout, workload) in a process of its own, the two checkouts'
processes alternated round after round so that drift in machine load hits both alike.

    git worktree add /tmp/old HEAD~1
    python tools/compare_revisions.py --old /tmp/old [--rounds 2] [--steps 3] [--only lora]

Prints one line per workload: old and new seconds and MB, and new / old.
"""
import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKLOADS = [("train", 32, 128, "full"), ("train", 32, 128, "lora"), ("train", 8, 512, "checkpointing"),
             ("train", 8, 512, "full"), ("train", 8, 512, "whole-attention"), ("forward", 32, 128, None)]
WORKER = """
import json, statistics, sys, time
sys.path.insert(0, {root!r})
import benchmarks.run  # the thread and BLAS environment, minisft imported first
from benchmarks.workloads import Minisft
library = Minisft({model!r})
step = library.forward({batch}, {length}) if {kind!r} == "forward" else library.train_step({batch}, {length}, {mode!r})
step()
times = []
for _ in range({steps}):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
rss = next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps([statistics.median(times), rss]))
"""


def measure(checkout, model, workload, steps):
    kind, batch, length, mode = workload
    code = WORKER.format(root=str(checkout), model=str(model), kind=kind, batch=batch, length=length, mode=mode,
                         steps=steps)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=checkout)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, type=pathlib.Path, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--model", type=pathlib.Path, default=ROOT / "weights" / "all-MiniLM-L6-v2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="", help="the workloads whose label contains this text")
    args = parser.parse_args()
    for workload in WORKLOADS:
        kind, batch, length, mode = workload
        label = f"{kind} {batch}x{length}" + (f" {mode}" if mode else "")
        if args.only not in label:
            continue
        runs = {"old": [], "new": []}
        for _ in range(args.rounds):
            for name, checkout in (("old", args.old.resolve()), ("new", ROOT)):
                runs[name].append(measure(checkout, args.model.resolve(), workload, args.steps))
        (old_s, old_mb), (new_s, new_mb) = ([statistics.median(r[i] for r in runs[n]) for i in (0, 1)]
                                            for n in ("old", "new"))
        print(f"{label:32s} old {old_s:6.3f} s {old_mb:6.0f} MB | new {new_s:6.3f} s {new_mb:6.0f} MB | "
              f"new/old time {new_s / old_s:.3f}, RSS {new_mb / old_mb:.3f}", flush=True)


if __name__ == "__main__":
    main()
