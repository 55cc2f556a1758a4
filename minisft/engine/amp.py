"""Mixed precision: matrix products in float16 over float32 weights, and dynamic loss scaling.

As torch.amp does it:
- `autocast()`: inside it, every Linear casts its input and weight to float16, multiplies
  (tensor cores on a GPU), and gives its output back in float32; its backward multiplies in
  float16 too and returns float32 gradients. The parameters stay float32: they are the
  master weights the optimiser updates, so an update smaller than float16's resolution is
  not lost. LayerNorm, softmax, GELU and the losses stay float32.
- `GradScaler`: float16 gradients smaller than 6e-8 round to zero, so the loss is multiplied
  by a large scale before backward and the gradients divided by it before the step; a step
  whose gradients overflowed (inf or nan) is skipped and the scale halved, and after
  `growth_interval` good steps in a row the scale doubles.

NumPy has no fast float16 matrix product: on the CPU autocast is slow, for tests only.
"""
import contextlib
import threading

import numpy

from minisft.engine.backend import get_array_module

_state = threading.local()


def compute_dtype():
    """float16 inside autocast(), else None (every op in its inputs' dtype)."""
    return getattr(_state, "dtype", None)


@contextlib.contextmanager
def autocast(dtype=numpy.float16, enabled=True):
    """Run the Linear layers' products in `dtype` inside this block (forward; backward follows
    what forward recorded)."""
    previous = compute_dtype()
    _state.dtype = numpy.dtype(dtype) if enabled else None
    try:
        yield
    finally:
        _state.dtype = previous


class GradScaler:
    """Dynamic loss scaling (torch.amp.GradScaler's rules and defaults)."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.scale_value, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval, self.good_steps = growth_interval, 0

    def scale(self, loss):
        """loss x the scale, for backward."""
        return loss * self.scale_value

    def unscale_(self, parameters):
        """Divide the gradients by the scale, in place; True when any is inf or nan (the step
        must be skipped). One read from the device for all of them."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return False
        xp = get_array_module(grads[0])
        inverse = 1.0 / self.scale_value
        for g in grads:
            g *= g.dtype.type(inverse)
        return not bool(xp.stack([xp.isfinite(g).all() for g in grads]).all())

    def update(self, found_inf):
        """After a step (or a skipped one): halve the scale on overflow, double it after
        growth_interval steps without."""
        if found_inf:
            self.scale_value *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale_value *= self.growth_factor
            self.good_steps = 0

    def state_dict(self):
        return {"scale": self.scale_value, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "good_steps": self.good_steps}

    def load_state_dict(self, state):
        self.scale_value, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval = state["growth_interval"]

    def __repr__(self):
        return f"GradScaler(scale={self.scale_value:g}, good_steps={self.good_steps})"
