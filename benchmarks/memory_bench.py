"""Peak resident memory of 5 training steps at 32x128, each library in its own process
(the process's high-water RSS, VmHWM, which includes the library and the model; not
ru_maxrss, which a child inherits from the parent it was forked from). For minisft, also
the peak of allocated memory (tracemalloc's high-water: NumPy's arrays and Python's
objects from the start), the CPU's counterpart of torch.cuda.max_memory_allocated: RSS adds
the interpreter, the BLAS's buffers and the allocator's free blocks."""
import json
import subprocess
import sys

from benchmarks.common import Figure

WORKER = """
import json, resource, sys, tracemalloc
if {allocated!r}:
    tracemalloc.start()
if {name!r} == "minisft":
    import minisft  # before NumPy, as in run.py
sys.path.insert(0, {root!r})
from benchmarks.workloads import Minisft, Reference
library = (Minisft if {name!r} == "minisft" else Reference)({model!r})
if {name!r} == "torch":
    library.torch.set_num_threads({threads})
step = library.train_step({batch}, {length}, {mode!r})
for _ in range(5):
    step()
if {allocated!r}:
    print(json.dumps(tracemalloc.get_traced_memory()[1] / 2 ** 20))
    sys.exit()
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(json.dumps(int(line.split()[1]) / 1024))
        break
else:
    print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""


def peak_mb(env, name, batch, length, mode="full", allocated=False, model_dir=None):
    """The high-water RSS (MB) of a process of its own that runs 5 steps of `mode` fine-tuning
    (of env's model, or of the checkpoint in model_dir); allocated: its high-water of allocated
    memory instead (minisft only)."""
    import os

    model = str(model_dir or env.model_dir)
    code = WORKER.format(root=str(env.root), name=name, model=model, batch=batch, length=length,
                         threads=os.cpu_count(), mode=mode, allocated=allocated)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(env, quick):
    batch, length = (4, 32) if quick else (32, 128)
    ours = [peak_mb(env, "minisft", batch, length)]
    reference = [peak_mb(env, "torch", batch, length)] if env.reference else None
    return [Figure(f"peak RSS, 5 training steps {batch}x{length}", "MB", ours, reference,
                   note="each library in its own process")]
