"""Soak: a long run of `minisft train` on a test-sized model, watched from outside for leaks.
The tiny BERT of tests/fixtures trains 3,000 steps (600 with --quick) on 1,600 made-up
reviews (200 steps an epoch), evaluating on 64 and writing a checkpoint every 100 steps with
--save-total-limit 2. Every 0.2 s the watcher reads the process's resident memory (VmRSS) and
open file descriptors (/proc/PID/fd), and the step it is at (the last line of metrics.jsonl,
written every 50 steps). Figures: resident memory's growth from step 500 to its peak after;
descriptors at step 500 and at the end (the fewest in the last tenth of the readings: a file
open for a checkpoint's write is not a leak, a leak stays); the checkpoints left; and the
steps per second of the first and last 500 steps. tests/test_faults.py holds the bounds.
minisft only: the figures are about this process against itself (Linux, /proc).
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from benchmarks.common import Figure

STEPS, QUICK_STEPS = 3000, 600
AFTER_STEP = 500  # growth is measured from here: allocators and caches have settled
SAMPLE_S = 0.2
WORDS = {"1": ["wonderful", "moving", "brilliant", "funny", "warm"], "0": ["dull", "tedious", "clumsy", "flat", "boring"]}


def write_reviews(path, count, seed):
    """count reviews "the film was W1 and W2" with W1, W2 of the label's words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = ["text,label"]
    for i in range(count):
        label = str(i % 2)
        first, second = rng.choice(WORDS[label], 2)
        lines.append(f"the film was {first} and {second},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _last_step(metrics):
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):  # a line being written
            continue
    return 0


def _reading(pid):
    """(resident MB, open descriptors) of a running process, or None once it has ended."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss_kb / 1024, fds


def soak(root, steps):
    """Run and watch; returns (samples [(seconds, step, MB, fds)], the output directory)."""
    train, dev = write_reviews(root / "train.csv", 1600, 0), write_reviews(root / "dev.csv", 64, 1)
    output = root / "out"
    command = [sys.executable, "-m", "minisft", "train", "--model", str(pathlib.Path(__file__).parents[1] / "tests" /
               "fixtures" / "tiny-bert"), "--train", str(train), "--eval", str(dev), "--output", str(output),
               "--batch-size", "8", "--learning-rate", "1e-3", "--max-steps", str(steps), "--eval-steps", "100",
               "--save-steps", "100", "--save-total-limit", "2", "--logging-steps", "50"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "MINISFT_NUM_THREADS": "1"})
    samples, began = [], time.perf_counter()
    while process.poll() is None:
        reading = _reading(process.pid)
        if reading:
            samples.append((time.perf_counter() - began, _last_step(output / "metrics.jsonl"), *reading))
        time.sleep(SAMPLE_S)
    stderr = process.stderr.read()
    if process.returncode:
        raise RuntimeError(f"the soak run failed ({process.returncode}): {stderr[-2000:]}")
    return samples, output


def _steps_per_second(samples, first, last):
    """Steps per second between the first samples at steps >= first and >= last."""
    a = next(s for s in samples if s[1] >= first)
    b = next(s for s in samples if s[1] >= last)
    return (b[1] - a[1]) / (b[0] - a[0])


def measure(samples, output):
    """The soak's figures from its readings: {name: value}."""
    after = [s for s in samples if s[1] >= AFTER_STEP]
    tail = samples[-max(1, len(samples) // 10):]
    last = samples[-1][1]
    return {"readings": len(samples), "rss_mb": after[0][2], "peak_mb": max(s[2] for s in after),
            "rss_growth": max(s[2] for s in after) / after[0][2] - 1, "fds": after[0][3],
            "fds_at_end": min(s[3] for s in tail), "checkpoints": sorted(p.name for p in output.glob("checkpoint-*")),
            "first_steps_per_s": _steps_per_second(samples, 0, AFTER_STEP),
            "last_steps_per_s": _steps_per_second(samples, last - AFTER_STEP, last)}


def run(env, quick):
    steps = QUICK_STEPS if quick else STEPS
    with tempfile.TemporaryDirectory() as tmp:
        m = measure(*soak(pathlib.Path(tmp), steps))
    note = (f"tiny BERT, {steps} steps of batch 8, eval and checkpoint every 100, --save-total-limit 2, 1 thread; "
            f"{m['readings']} readings every {SAMPLE_S} s")
    return [
        Figure(f"soak: resident memory at step {AFTER_STEP}", "MB", [m["rss_mb"]], note=note),
        Figure(f"soak: resident memory's growth after step {AFTER_STEP} (peak)", "%", [100 * m["rss_growth"]],
               note=f"peak {m['peak_mb']:.1f} MB; bound: under 5%"),
        Figure(f"soak: open descriptors at step {AFTER_STEP}", "fds", [m["fds"]]),
        Figure("soak: open descriptors at the end", "fds", [m["fds_at_end"]], note="bound: no more than at step 500"),
        Figure("soak: checkpoints left at the end", "dirs", [len(m["checkpoints"])],
               note=", ".join(m["checkpoints"]) + "; bound: exactly 2"),
        Figure(f"soak: steps per second, steps 0-{AFTER_STEP}", "steps/s", [m["first_steps_per_s"]],
               lower_is_better=False),
        Figure(f"soak: steps per second, the last {AFTER_STEP} steps", "steps/s", [m["last_steps_per_s"]],
               lower_is_better=False),
    ]
