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
