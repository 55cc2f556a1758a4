"""The training loop's console output: a progress line with the loss, rate and ETA."""
import math
import sys
import time


class Progress:
    """step, loss, lr, it/s and ETA: one updating line on a terminal, else plain log lines
    every `every` steps and at the last step. Returns a metrics record whenever a log line is
    due. The loss shown is the one metrics.jsonl records: the mean over the steps since the last
    log line (a skipped step, loss None, left out)."""

    def __init__(self, total, start, log, every):
        self.total, self.start_step, self.log, self.every = total, start, log, max(1, every)
        self.tty = sys.stderr.isatty()
        self.started = time.perf_counter()
        self.losses, self.unlogged = [], None

    def update(self, step, loss, lr, epoch, last=False):
        """last: the run ends at this step though `total` is not reached (early stopping)."""
        if loss is not None:
            self.losses.append(loss)
        mean = sum(self.losses) / len(self.losses) if self.losses else None
        done = step - self.start_step
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        eta = (self.total - step) / rate if rate else float("inf")
        shown = "-" if mean is None else f"{mean:.4f}"
        line = f"step {step}/{self.total} epoch {epoch:g} loss {shown} lr {lr:.3g} {rate:.2f} it/s ETA {_duration(eta)}"
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        if step % self.every == 0 or step == self.total or last:
            record = {"step": step, "epoch": epoch, "loss": mean, "learning_rate": lr, "it_per_s": rate}
            self.losses = []
            if not self.tty:
                self.log(line)
            self.unlogged = None
            return record
        self.unlogged = (step, lr, epoch)
        return None

    def finish(self):
        """The record of the steps since the last log line, for a run that ends before `total`
        (an early stop): none if the last step was logged."""
        if self.unlogged is None:
            return None
        step, lr, epoch = self.unlogged
        return self.update(step, None, lr, epoch, last=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


def _duration(seconds):
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def fmt(value):
    """A metric for the console: floats to 4 decimals."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)
