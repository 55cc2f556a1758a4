"""Recording a forward pass as a list of ops, for exporters (minisft.export).

Inside `tracing()`, every Function call is recorded with its input and output tensors and its
options, whether or not a graph for backward is kept. Arrays that a model computes outside the
graph from its inputs (an attention mask's bias, position ids) are recorded too, by the helper
that makes them: `@outside_graph("name")` marks such a helper, whose arguments and result the
trace keeps under that name. Outside `tracing()` both cost one attribute lookup.
"""
import contextlib
import functools
import threading

_state = threading.local()


class Trace:
    """What one traced pass did, in order: `events`, each a Function call ("function", the
    Function, its input tensors, its options, its output tensor) or a helper's ("helper", its
    name, args, kwargs, result). Everything is held until the trace is dropped, so that no
    array's id is reused while the trace is read."""

    def __init__(self):
        self.events = []

    def function(self, fn, inputs, options, output):
        self.events.append(("function", fn, tuple(inputs), dict(options), output))

    def helper(self, name, args, kwargs, result):
        self.events.append(("helper", name, args, kwargs, result))


def active():
    """The trace being recorded on this thread, or None."""
    return getattr(_state, "trace", None)


@contextlib.contextmanager
def tracing():
    """Record every op of the passes run inside the block into the Trace it yields."""
    previous, _state.trace = active(), Trace()
    try:
        yield _state.trace
    finally:
        _state.trace = previous


def _recorded(helper, name, arguments):
    """helper, whose calls inside tracing() are recorded under `name`, with the arguments that
    arguments(args, kwargs) gives."""
    @functools.wraps(helper)
    def recorded(*args, **kwargs):
        result = helper(*args, **kwargs)
        trace = active()
        if trace is not None:
            trace.helper(name, *arguments(args, kwargs), result)
        return result
    return recorded


def length_table(helper):
    """Mark a helper whose first argument is the sequence length L and whose result (an array, or
    a tuple of them) depends on nothing else of the input, each axis of size L being a prefix of
    the table at any longer length (positions, relative-position buckets, rotary tables): traced,
    its call is recorded as "length_table", with the helper itself first in its arguments."""
    return _recorded(helper, "length_table", lambda args, kwargs: ((helper, args, kwargs), {}))


def outside_graph(name):
    """Mark a helper that computes an array from a model's inputs outside the graph (no Function):
    traced, its call is recorded under `name`, so that an exporter can write it as operators."""
    return lambda helper: _recorded(helper, name, lambda args, kwargs: (args, kwargs))
