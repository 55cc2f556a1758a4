"""Timing helpers: warm-up, alternating repeats, medians with min-max, and the results table."""
import statistics
import time
from dataclasses import dataclass


@dataclass
class Figure:
    """One measured quantity for both libraries; `lower_is_better` decides the ratio's sense."""
    name: str
    unit: str
    ours: list
    reference: list = None
    lower_is_better: bool = True
    note: str = ""

    @staticmethod
    def _summary(values):
        if not values:
            return "n/a"
        median = statistics.median(values)
        if len(values) == 1:
            return f"{median:.4g}"
        return f"{median:.4g} ({min(values):.4g}-{max(values):.4g})"

    @property
    def ratio(self):
        """minisft / reference of the medians (for throughput-like figures, reference / minisft
        is not used: the ratio is always minisft over reference, and the table says which
        direction is better)."""
        if not self.ours or not self.reference or not statistics.median(self.reference):
            return None
        return statistics.median(self.ours) / statistics.median(self.reference)

    def row(self):
        ratio = "n/a" if self.ratio is None else f"{self.ratio:.2f}x"
        better = "lower" if self.lower_is_better else "higher"
        return (f"| {self.name} | {self.unit} | {self._summary(self.ours)} | "
                f"{self._summary(self.reference or [])} | {ratio} | {better} | {self.note} |")


TABLE_HEADER = ("| figure | unit | minisft median (min-max) | reference median (min-max) | "
                "minisft / reference | better | note |\n|---|---|---|---|---|---|---|")


def alternate(functions, repeats, warmup=1):
    """Time each callable `repeats` times, interleaved (a, b, a, b, ...) after `warmup`
    untimed calls of each, so that drift in machine load hits both alike. Each timed call
    follows an untimed call of the same callable: threads the other library leaves spinning
    after its work (OpenMP, BLAS) would otherwise slow it (NumPy's 2048^3 product measures
    ~15% slower straight after torch's), and a pause instead leaves the CPU caches and cores
    cold. Returns {name: [seconds, ...]}."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def torch_fine_tune(model, batches, loss_of, learning_rate, epochs, seed):
    """The reference side of a quality benchmark: minisft's recipe in a plain torch loop
    (AdamW without weight decay, linear decay from `learning_rate` without warmup, gradients
    clipped to norm 1), over `batches` (a list, reshuffled each epoch by a seeded torch
    generator); loss_of(model, batch) -> the batch's loss. Returns the seconds it took."""
    import torch
    import transformers

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, 0, len(batches) * epochs)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(batches), generator=generator).tolist():
            loss_of(model, batches[index]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    model.eval()
    return time.perf_counter() - start


def recipe_arguments(recipe):
    """minisft train's options for a quality benchmark's recipe."""
    return ["--learning-rate", recipe["learning_rate"], "--epochs", recipe["epochs"], "--batch-size",
            recipe["batch_size"], "--max-length", recipe["max_length"], "--seed", recipe["seed"]]


def minisft_train(arguments):
    """Run `python -m minisft train ARGUMENTS...`; -> (its final metrics, seconds)."""
    import json
    import subprocess
    import sys

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "minisft", "train", *map(str, arguments)], capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"minisft train failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout), time.perf_counter() - start
