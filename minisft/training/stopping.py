"""A graceful stop on SIGTERM (what SLURM, Kubernetes and spot instances send before they
kill a job) or SIGINT (Ctrl-C): the training loop finishes the step it is in, writes a
checkpoint and ends with Stopped (exit 143 or 130). A second signal stops at once, as the
signal's default does; the last complete checkpoint stays valid, since every checkpoint is
written beside it and renamed into place.

    with SignalStop(log) as stop:
        trainer.train(stop=stop)
"""
import os
import signal
import threading

from minisft.engine.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(UserError):
    """Training stopped on a signal after `step`, its checkpoint written; the same on every rank."""
    alike_on_every_rank = True

    def __init__(self, signal_number, step, checkpoint):
        name = signal.Signals(signal_number).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint} is complete")
        self.exit_code = 128 + signal_number
        self.step, self.checkpoint = step, checkpoint


class SignalStop:
    """While entered, SIGTERM and SIGINT set `signal` instead of ending the process (the first
    one: the second ends it); the handlers before are put back on exit. A no-op off the
    main thread, where Python cannot take signals."""

    def __init__(self, log):
        self.log, self.signal, self._previous = log, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in SIGNALS}
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame):
        if self.signal is not None:  # the second signal: its default action, now
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self.signal = number
        name = signal.Signals(number).name
        self.log(f"{name}: stopping after this step, once its checkpoint is written (another {name} stops at once)")
