"""A model's summary, as torchinfo prints one: the module tree with parameter counts and output
shapes, the matrix-product FLOPs of forward and backward, and the activation memory each
module keeps for backward, all measured on one real forward pass; with `profile`, the wall
time of each module's forward and backward and the peak memory of its forward in one training
step.

    rows = summarize(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    print(format_summary(rows))

How: while the pass runs, each module's forward is wrapped (an instance attribute, removed
afterwards) to know which module is running, and Function.__call__ is wrapped to note each
op node with the module that made it; the nodes' saved arrays are the activations, their
shapes give the FLOPs.
"""
import contextlib
import time
import tracemalloc
from dataclasses import dataclass, field

from minisft.engine.tensor import Function, Tensor


@dataclass
class ModuleRow:
    """One module: counts include its submodules'."""
    path: str
    kind: str
    depth: int
    parameters: int = 0
    trainable: int = 0
    output_shape: tuple = None
    forward_flops: int = 0
    backward_flops: int = 0
    activation_bytes: int = 0
    forward_seconds: float = None
    backward_seconds: float = None
    forward_peak_bytes: int = None
    nodes: list = field(default_factory=list, repr=False)


def matmul_flops(node, input_shapes):
    """(forward, backward) FLOPs of one op node's matrix products (2 per multiply-add); other
    ops count 0. Backward computes one product per input that needs a gradient (attention:
    four products against forward's two)."""
    name = type(node).__name__.lstrip("_")
    size = 1
    for d in node.output_shape:
        size *= d
    if name in ("Linear", "MatMul"):
        forward = 2 * size * input_shapes[0][-1]
        return forward, forward * sum(node.needs_input_grad[:2])
    if name == "FeedForward":  # x (..., in), w1 (inner, in), w2 (out, inner) -> (..., out)
        rows, (inner, features) = size // node.output_shape[-1], input_shapes[1]
        first, second = 2 * rows * inner * features, 2 * rows * inner * node.output_shape[-1]
        x, w1, b1, w2, _ = node.needs_input_grad
        through = x or w1 or b1  # the gradient at the pre-activation, (g W2) * slope
        return first + second, second * (w2 + through) + first * (x + w1)
    if name == "Attention":  # q (..., L, d), k (..., S, d), v (..., S, dv) -> (..., L, dv)
        query, key = input_shapes[0], input_shapes[1]
        rows = size // node.output_shape[-1]
        forward = 2 * rows * key[-2] * (query[-1] + node.output_shape[-1])
        return forward, 2 * forward
    if name == "PackedAttention":  # qkv (B, L, 3H) -> (B, L, H): q k^T and P v, each 2 B L L H
        forward = 4 * size * node.output_shape[-2]
        return forward, 2 * forward
    return 0, 0


def _output_shape(output):
    if isinstance(output, Tensor):
        return tuple(output.shape)
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return tuple(value.shape)
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return tuple(output[0].shape)
    return None


@contextlib.contextmanager
def _watched(model, rows, timing, memory):
    """Wrap each module's forward and Function.__call__ while the block runs."""
    scope = []
    original_call = Function.__call__
    peaks = []  # memory: [bytes at entry, highest seen] per running module

    def call(node, *inputs, **options):
        out = original_call(node, *inputs, **options)
        if node.recording and scope:
            shapes = [tuple(x.shape) for x in inputs if hasattr(x, "shape")]
            rows[scope[-1]].nodes.append((node, shapes))
        return out

    def wrap(path, module):
        forward = type(module).forward

        def watched(*args, **kwargs):
            scope.append(path)
            if memory:
                current, peak = tracemalloc.get_traced_memory()
                if peaks:
                    peaks[-1][1] = max(peaks[-1][1], peak)
                tracemalloc.reset_peak()
                peaks.append([current, current])
            start = time.perf_counter()
            try:
                output = forward(module, *args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                scope.pop()
            row = rows[path]
            row.output_shape = _output_shape(output)
            if timing:
                row.forward_seconds = (row.forward_seconds or 0.0) + elapsed
            if memory:
                entry, high = peaks.pop()
                high = max(high, tracemalloc.get_traced_memory()[1])
                if peaks:
                    peaks[-1][1] = max(peaks[-1][1], high)
                row.forward_peak_bytes = high - entry
            return output
        return watched

    modules = list(model.named_modules())
    Function.__call__ = call
    for path, module in modules:
        object.__setattr__(module, "forward", wrap(path, module))
    try:
        yield
    finally:
        Function.__call__ = original_call
        for _, module in modules:
            module.__dict__.pop("forward", None)


def _new_rows(model):
    rows = {}
    for path, module in model.named_modules():
        parameters = list(module.parameters())
        rows[path] = ModuleRow(path or type(module).__name__, type(module).__name__,
                               0 if not path else path.count(".") + 1,
                               sum(p.data.size for p in parameters),
                               sum(p.data.size for p in parameters if p.requires_grad))
    return rows


def _run(model, inputs):
    output = model(**inputs)
    loss = getattr(output, "loss", None)
    return output, loss


def summarize(model, inputs, profile=False):
    """[ModuleRow] in tree order for one forward pass of `model(**inputs)` (and, when the
    output has a loss, its backward). profile: also time each module's forward and
    backward, and measure each forward's peak memory (a second pass, under tracemalloc)."""
    rows = _new_rows(model)
    with _watched(model, rows, timing=profile, memory=False):
        output, loss = _run(model, inputs)
    backward_times = {}
    if profile and loss is not None:
        for path, row in rows.items():
            for node, _ in row.nodes:
                node.backward = _timed(node.backward, backward_times, path)
    weights = {_address(p.data) for p in model.parameters()}  # saved for backward, but not activations
    for row in rows.values():
        seen = set(weights)
        for node, shapes in row.nodes:
            forward, backward = matmul_flops(node, shapes)
            row.forward_flops += forward
            row.backward_flops += backward
            for array in node.saved or ():
                if hasattr(array, "nbytes") and _address(array) not in seen:
                    seen.add(_address(array))
                    row.activation_bytes += array.nbytes
    if loss is not None:
        loss.backward()
    for path, row in rows.items():
        row.backward_seconds = backward_times.get(path) if profile else None
        row.nodes = []
    if profile:
        memory = _new_rows(model)
        tracemalloc.start()
        try:
            with _watched(model, memory, timing=False, memory=True):
                _run(model, inputs)
        finally:
            tracemalloc.stop()
        for path, row in rows.items():
            row.forward_peak_bytes = memory[path].forward_peak_bytes
    _add_children(rows)
    return list(rows.values())


def _address(array):
    """Where an array's memory starts (NumPy or CuPy), so that views count once."""
    return array.data.ptr if hasattr(array.data, "ptr") else array.__array_interface__["data"][0]


def _timed(method, totals, path):
    def run(*args):
        start = time.perf_counter()
        try:
            return method(*args)
        finally:
            totals[path] = totals.get(path, 0.0) + time.perf_counter() - start
    return run


def _add_children(rows):
    """Fold each module's FLOPs, activations and backward time into its ancestors'."""
    paths = [p for p in rows if p]
    for path in sorted(paths, key=lambda p: -p.count(".")):
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        child, up = rows[path], rows[parent]
        up.forward_flops += child.forward_flops
        up.backward_flops += child.backward_flops
        up.activation_bytes += child.activation_bytes
        if child.backward_seconds is not None:
            up.backward_seconds = (up.backward_seconds or 0.0) + child.backward_seconds


def _human(value, unit=""):
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def format_summary(rows, max_depth=None):
    """A table, one line per module down to `max_depth`, with totals."""
    profiled = rows[0].forward_seconds is not None
    header = f"{'module':46s} {'output shape':>18s} {'params':>10s} {'fwd FLOPs':>11s} {'bwd FLOPs':>11s} {'activations':>11s}"
    if profiled:
        header += f" {'fwd ms':>8s} {'bwd ms':>8s} {'fwd peak':>10s}"
    lines = [header, "-" * len(header)]
    for row in rows:
        if max_depth is not None and row.depth > max_depth:
            continue
        name = "  " * row.depth + (row.path.rsplit(".", 1)[-1] if row.depth else row.path)
        name = f"{name} ({row.kind})" if row.depth else name
        shape = str(row.output_shape) if row.output_shape is not None else "-"
        line = (f"{name[:46]:46s} {shape:>18s} {row.parameters:>10,d} {_human(row.forward_flops):>11s} "
                f"{_human(row.backward_flops):>11s} {_human(row.activation_bytes, 'B'):>11s}")
        if profiled:
            forward = f"{row.forward_seconds * 1e3:.1f}" if row.forward_seconds is not None else "-"
            backward = f"{row.backward_seconds * 1e3:.1f}" if row.backward_seconds is not None else "-"
            peak = _human(row.forward_peak_bytes, "B") if row.forward_peak_bytes is not None else "-"
            line += f" {forward:>8s} {backward:>8s} {peak:>10s}"
        lines.append(line)
    total = rows[0]
    lines += ["-" * len(header),
              f"parameters: {total.parameters:,d} ({total.trainable:,d} trainable, "
              f"{_human(total.parameters * 4, 'B')} as float32)",
              f"matrix-product FLOPs: forward {_human(total.forward_flops)}, backward {_human(total.backward_flops)} "
              "(2 per multiply-add; elementwise ops not counted)",
              f"activations: {_human(total.activation_bytes, 'B')} (the arrays ops keep for backward; "
              "parameters not counted)"]
    return "\n".join(lines)
