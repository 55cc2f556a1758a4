"""--report-to tensorboard: every scalar of metrics.jsonl, under the same name and step, into
TensorBoard event files in OUTPUT/runs/ (as transformers' report_to="tensorboard" logs to
runs/), written by tensorboardX's SummaryWriter from the `log` extra. View them with
`tensorboard --logdir OUTPUT/runs`."""
import numbers

from minisft.training.options import OptionError

LOG_EXTRA = "pip install -e '.[log]'"
CHOICES = ("none", "tensorboard")


class TensorBoardReport:
    """A SummaryWriter on `directory`; OptionError naming the install when tensorboardX is
    missing (made before the first step, so that a run never trains without its log)."""

    def __init__(self, directory):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise OptionError("--report-to", "tensorboard", "needs tensorboardX, which the log extra installs",
                              f"{LOG_EXTRA}, or leave --report-to out") from None
        self.writer = SummaryWriter(logdir=str(directory))

    def write(self, record):
        """record: a metrics.jsonl line, {"step": N, name: value, ...}; its numbers as scalars
        at step N, on disk when this returns."""
        for name, value in record.items():
            if name != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()

    def close(self):
        self.writer.close()
