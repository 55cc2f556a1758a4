"""Data-parallel training on this machine, and what it would give on several: training steps
of all-MiniLM-L6-v2 at a global batch of 32x128 for 1 process x 2 threads against 2 processes
(mpiexec) x 1 thread; per step, the communication backward did not hide (the wait for the
gradient buckets) against the time a blocking all-reduce of every gradient takes alone; and a
paper estimate of the speedup on 4 and 16 hosts at 10 and 100 Gbit/s from the gradient bytes
each step sends. Each configuration runs in processes of its own."""
import json
import os
import shutil
import statistics
import subprocess
import sys

from benchmarks.common import Figure

WORKER = """
import json, statistics, sys, time
import minisft
sys.path.insert(0, {root!r})
from minisft import lean
from minisft.engine.runtime import keep_freed_memory
from minisft.models.bert import BertForSequenceClassification
from minisft.optim import AdamW, clip_grad_norm_, parameter_groups
from minisft.training import distributed
from benchmarks.workloads import inputs

keep_freed_memory()
comm = distributed.world()
model = lean.apply(BertForSequenceClassification.from_pretrained({model!r}, num_labels=2).train())
optimizer = AdamW(parameter_groups(model, 0.01), lr=2e-5)
ids, mask, labels = inputs({batch}, {length})
mine = distributed.shard(list(range({batch})), comm.rank, comm.size)
reducer = distributed.GradientReducer(comm, model.parameters()) if comm.size > 1 else None


def step():
    if reducer is not None:
        reducer.start()
    loss = model(ids[mine], attention_mask=mask[mine], labels=labels[mine]).loss
    (loss * (len(mine) / {batch})).backward()
    if reducer is not None:
        reducer.wait()
    clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()


step()
steps, waits = [], []
for _ in range({steps}):
    waited = reducer.wait_seconds if reducer is not None else 0.0
    start = time.perf_counter()
    step()
    steps.append(time.perf_counter() - start)
    waits.append((reducer.wait_seconds if reducer is not None else 0.0) - waited)
gradients = sum(p.data.nbytes for p in model.parameters() if p.requires_grad)
alone = []
if comm.size > 1:
    import numpy
    flat = numpy.ones(gradients // 4, numpy.float32)
    for _ in range(3):
        start = time.perf_counter()
        comm.allreduce_sum(flat)
        alone.append(time.perf_counter() - start)
if comm.rank == 0:
    print(json.dumps({{"step": steps, "wait": waits, "allreduce": alone, "gradient_bytes": gradients}}))
"""

HOSTS, GBITS = (4, 16), (10, 100)


def mpiexec():
    """The mpiexec beside this Python (the mpi extra's) or on PATH; None without mpi4py."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


def _measure(env, processes, threads, batch, length, steps):
    code = WORKER.format(root=str(env.root), model=str(env.model_dir), batch=batch, length=length, steps=steps)
    launcher = [mpiexec(), "-n", str(processes)] if processes > 1 else []
    result = subprocess.run([*launcher, sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "MINISFT_NUM_THREADS": str(threads)})
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(env, quick):
    if not mpiexec():
        print("distributed_bench: skipped, the mpi extra is not installed (pip install -e '.[mpi]')", file=sys.stderr)
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    batch, length, steps = (4, 32, 2) if quick else (32, 128, 5)
    threads = max(1, cores // 2)
    one = _measure(env, 1, cores, batch, length, steps)
    two = _measure(env, 2, threads, batch, length, steps)
    size = f"{batch}x{length}"
    per_second = lambda times: [1 / t for t in times]  # noqa: E731
    wait, alone = statistics.median(two["wait"]), statistics.median(two["allreduce"])
    figures = [
        Figure(f"training steps per second, global batch {size}: 2 processes x {threads} thread{'s' * (threads > 1)} "
               f"(mpiexec) / 1 process x {cores} threads", "steps/s", per_second(two["step"]),
               per_second(one["step"]), lower_is_better=False, note="reference column: one process"),
        Figure(f"communication backward did not hide, per step {size}, 2 processes", "s", two["wait"],
               note=f"rank 0's wait for the gradient buckets after its backward (with any lag of the other "
                    f"rank's), of a {statistics.median(two['step']):.3g} s step"),
        Figure(f"all-reduce of every gradient alone ({two['gradient_bytes'] / 1e6:.0f} MB), 2 processes", "s",
               two["allreduce"], note=f"blocking, on this host's shared memory; the wait above is "
                                      f"{wait / alone:.2f}x it"),
    ]
    step_seconds = statistics.median(one["step"])
    for hosts in HOSTS:
        for gbits in GBITS:
            figures.append(_estimate(step_seconds, two["gradient_bytes"], hosts, gbits, size))
    return figures


def _estimate(step_seconds, gradient_bytes, hosts, gbits, size):
    """Weak scaling (each host keeps a batch of `size` per step): a ring all-reduce sends and
    receives 2 (N - 1) / N x the gradient bytes per host, at the link's bandwidth, latency
    ignored; not hidden at all, throughput is N T / (T + t); wholly hidden behind backward
    (two thirds of a step), N T / max(T, T/3 + t)."""
    seconds = 2 * (hosts - 1) / hosts * gradient_bytes * 8 / (gbits * 1e9)
    exposed = hosts * step_seconds / (step_seconds + seconds)
    hidden = hosts * step_seconds / max(step_seconds, step_seconds / 3 + seconds)
    return Figure(f"estimated speedup on {hosts} hosts at {gbits} Gbit/s, {size} per host", "x", [exposed],
                  lower_is_better=False, note=f"a paper estimate, not measured: all-reduce {seconds:.3f} s per step against this host's "
                       f"{step_seconds:.2f} s step; {hidden:.2f}x if backward hid it wholly")
