"""`minisft train` as one rank of an mpiexec job, with one rank made different on purpose:

    mpiexec -n 2 python tests/mpi_worker.py [--fail-at-step S] [--sigterm-at-step S] [--version V]
        [--train FILE] --rank R -- TRAIN ARGUMENTS...

On rank R only: --fail-at-step raises in the forward pass of step S, --sigterm-at-step sends
the rank SIGTERM in that forward pass (as a scheduler would), --version pretends
another minisft version, --train reads another training file. tests/test_distributed.py runs it.
"""
import argparse
import os
import sys

import minisft

parser = argparse.ArgumentParser()
parser.add_argument("--rank", type=int, required=True)
parser.add_argument("--fail-at-step", type=int)
parser.add_argument("--sigterm-at-step", type=int)
parser.add_argument("--version")
parser.add_argument("--train")
parser.add_argument("rest", nargs=argparse.REMAINDER)
args = parser.parse_args()
train_args = args.rest[1:] if args.rest[:1] == ["--"] else args.rest

if int(os.environ["PMI_RANK"]) == args.rank:
    from minisft.training import trainer

    if args.version:
        trainer.__version__ = args.version
    if args.train:
        train_args[train_args.index("--train") + 1] = args.train
    if args.fail_at_step is not None or args.sigterm_at_step is not None:
        import signal

        local_loss = trainer.Trainer._local_loss

        def failing(self, indices, scale):
            if self.state.global_step + 1 == args.fail_at_step:
                raise RuntimeError(f"a failure on purpose at step {args.fail_at_step}")
            if self.state.global_step + 1 == args.sigterm_at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            return local_loss(self, indices, scale)
        trainer.Trainer._local_loss = failing

from minisft import cli  # noqa: E402

sys.exit(cli.main(["train", *train_args]))
