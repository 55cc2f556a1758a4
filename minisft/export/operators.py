"""Each Function type of minisft's engine, and each helper that computes an array outside the
graph (minisft.engine.trace.outside_graph), written as ONNX operators (opset 17).

An emitter gets the Graph and the Call (the op as traced at both input shapes, its inputs'
names) and returns the name of its output. FUNCTIONS and HELPERS are the whole mapping: an op
missing from them is an ExportError that names it.
"""
import math
from dataclasses import dataclass

import numpy

from minisft.export.graph import ExportError


@dataclass
class Call:
    """One traced op: `fn` with its `options` and output `out` at the first input shape, `other`
    and `other_out` at the second; `names`: its inputs' names in the graph; `inputs`: their
    tensors (first trace)."""
    fn: object
    other: object
    options: dict
    names: list
    inputs: tuple
    out: object
    other_out: object


FUNCTIONS = {}


def emits(*types):
    def register(emit):
        for name in types:
            FUNCTIONS[name] = emit
        return emit
    return register


@emits("Add", "AddInPlace", "Sub", "Mul", "Div")
def _binary(g, call):
    kind = {"AddInPlace": "Add"}.get(type(call.fn).__name__, type(call.fn).__name__)
    return g.op(kind, call.names)


@emits("Neg", "Exp", "Log", "Sqrt", "Tanh")
def _unary(g, call):
    return g.op(type(call.fn).__name__, call.names)


@emits("_ReLU")
def _relu(g, call):
    return g.op("Relu", call.names[:1])


@emits("Pow")
def _pow(g, call):
    return g.op("Pow", call.names)


@emits("MatMul")
def _matmul(g, call):
    return g.op("MatMul", call.names)


@emits("_Linear")
def _linear(g, call):
    """x W^T + b, with W^T stored as the initializer (as MatMul's constant B, which dynamic
    quantisation quantises)."""
    x, weight, *bias = call.names
    weight_t = g.constant(call.inputs[1].data.T, name=f"{weight}.T")
    out = g.op("MatMul", [x, weight_t], hint="linear")
    return g.op("Add", [out, bias[0]], hint="linear") if bias else out


@emits("_Embedding")
def _embedding(g, call):
    weight, ids = call.names[:2]
    return g.op("Gather", [weight, ids], hint="embedding", axis=0)


@emits("_LayerNorm")
def _layer_norm(g, call):
    x, *params = call.names
    features, shape = call.options["features"], call.inputs[0].shape
    axis = next(-k for k in range(1, len(shape) + 1) if math.prod(shape[-k:]) == features)
    dtype = call.inputs[0].dtype
    scale = params[0] if params else g.constant(numpy.ones(shape[axis:], dtype), hint="ones")
    if params and call.inputs[1].ndim != len(shape[axis:]):
        raise ExportError(f"LayerNorm with a weight of shape {call.inputs[1].shape} over {shape[axis:]}")
    return g.op("LayerNormalization", [x, scale] + params[1:], hint="layer_norm", axis=axis,
                epsilon=float(call.options["eps"]))


@emits("_GELU")
def _gelu(g, call):
    """x Phi(x): 0.5 x (1 + erf(x / sqrt 2)), or the tanh form 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x, dtype = call.names[0], call.inputs[0].dtype
    if call.options["approximate"] == "tanh":
        cube = g.op("Mul", [g.op("Mul", [x, x]), x])
        inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [cube, g.scalar(0.044715, dtype)])]),
                             g.scalar(math.sqrt(2 / math.pi), dtype)])
        phi = g.op("Tanh", [inner])
    else:
        phi = g.op("Erf", [g.op("Div", [x, g.scalar(math.sqrt(2.0), dtype)])])
    half_x = g.op("Mul", [x, g.scalar(0.5, dtype)])
    return g.op("Mul", [half_x, g.op("Add", [phi, g.scalar(1.0, dtype)])], hint="gelu")


@emits("_Softmax", "_LogSoftmax")
def _softmax(g, call):
    return g.op(type(call.fn).__name__[1:], call.names, axis=call.options["dim"])


@emits("_Attention")
def _attention(g, call):
    """softmax(q k^T scale + bias) v (no dropout: an eval pass)."""
    q, k, v, *bias = call.names
    rank = call.inputs[0].ndim
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=perm)], hint="scores")
    scores = g.op("Mul", [scores, g.scalar(call.options["scale"], call.inputs[0].dtype)], hint="scores")
    if bias:
        scores = g.op("Add", [scores, bias[0]], hint="scores")
    return g.op("MatMul", [g.op("Softmax", [scores], axis=-1, hint="probs"), v], hint="context")


@emits("Reshape")
def _reshape(g, call):
    return g.op("Reshape", [call.names[0], g.shape(call.out.shape, call.other_out.shape)])


@emits("Permute")
def _permute(g, call):
    rank = call.inputs[0].ndim
    return g.op("Transpose", call.names, perm=[d % rank for d in call.options["dims"]])


@emits("Cat")
def _cat(g, call):
    return g.op("Concat", call.names, axis=call.options["dim"])


@emits("Sum", "Mean", "Max")
def _reduce(g, call):
    """ReduceSum takes its axes as an input from opset 13; ReduceMean and ReduceMax as an attribute until 18."""
    rank, dim = call.inputs[0].ndim, call.options["dim"]
    axes = list(range(rank)) if dim is None else [d % rank for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
    keep = int(bool(call.options["keepdim"]))
    kind = {"Sum": "ReduceSum", "Mean": "ReduceMean", "Max": "ReduceMax"}[type(call.fn).__name__]
    if kind == "ReduceSum":
        return g.op(kind, [call.names[0], g.ints(axes)], keepdims=keep)
    return g.op(kind, call.names[:1], axes=axes, keepdims=keep)


@emits("Where")
def _where(g, call):
    return g.op("Where", call.names)


@emits("GetItem")
def _get_item(g, call):
    """Basic indexing: ints (Gather), slices of constant bounds (Slice; an open end stays open,
    so it follows the input's size), None (Unsqueeze) and one Ellipsis."""
    parts, other = (i if isinstance(i, tuple) else (i,) for i in (call.fn.index, call.other.index))
    if any(hasattr(p, "shape") for p in parts) or repr(parts) != repr(other) or any(
            isinstance(p, slice) and (p.step or 1) < 0 for p in parts):
        raise ExportError(f"unmapped op: GetItem with index {parts!r} (an index array, a negative step, or bounds "
                          "that change with the input's shape)")
    if Ellipsis in parts:
        at = parts.index(Ellipsis)
        used = sum(p is not None for p in parts) - 1
        parts = parts[:at] + (slice(None),) * (call.inputs[0].ndim - used) + parts[at + 1:]
    out, axis = call.names[0], 0  # axis: of the output so far
    for part in parts:
        if part is None:
            out = g.op("Unsqueeze", [out, g.ints([axis])])
            axis += 1
        elif isinstance(part, slice):
            if part != slice(None):
                stop = numpy.iinfo(numpy.int64).max if part.stop is None else part.stop
                out = g.op("Slice", [out, g.ints([part.start or 0]), g.ints([stop]), g.ints([axis]),
                                     g.ints([part.step or 1])])
            axis += 1
        else:
            out = g.op("Gather", [out, g.constant(numpy.asarray(int(part), numpy.int64), hint="index")], axis=axis)
    return out


@emits("To")
def _to(g, call):
    from onnx import helper

    return g.op("Cast", call.names, to=helper.np_dtype_to_tensor_dtype(numpy.dtype(call.options["dtype"])))


# --- arrays made outside the graph from the inputs (minisft.engine.trace.outside_graph) ---
# An emitter gets the names of the helper's array arguments (None for any other), the
# arguments, and its result at both input shapes; it returns the name of each array of the
# result, in order (a list, or one name).
HELPERS = {}


def makes(name):
    def register(emit):
        HELPERS[name] = emit
        return emit
    return register


def _cast(g, value, dtype):
    from onnx import helper

    return g.op("Cast", [value], to=helper.np_dtype_to_tensor_dtype(numpy.dtype(dtype)))


@makes("attention_bias")
def _attention_bias(g, names, args, result, other):
    """(1 - mask[:, None, None, :]) x the dtype's minimum: (B, 1, 1, L)."""
    dtype = result.dtype
    keep = g.op("Sub", [g.scalar(1.0, dtype), _cast(g, names[0], dtype)])
    keep = g.op("Unsqueeze", [keep, g.ints([1, 2])])
    return g.op("Mul", [keep, g.scalar(numpy.finfo(dtype).min, dtype)], hint="attention_bias")


@makes("absolute_positions")
def _absolute_positions(g, names, args, result, other):
    """0 ... L - 1: (1, L)."""
    positions = g.op("Range", [g.constant(numpy.asarray(0, numpy.int64)), g.scalar_dim("sequence"),
                               g.constant(numpy.asarray(1, numpy.int64))])
    return g.op("Unsqueeze", [positions, g.ints([0])], hint="position_ids")


@makes("positions_after_padding")
def _positions_after_padding(g, names, args, result, other):
    """cumsum(ids != pad) x (ids != pad) + pad: (B, L)."""
    padding_idx = g.constant(numpy.asarray(args[1], numpy.int64))
    real = _cast(g, g.op("Not", [g.op("Equal", [names[0], padding_idx])]), numpy.int64)
    counted = g.op("CumSum", [real, g.constant(numpy.asarray(1, numpy.int64))])
    return g.op("Add", [g.op("Mul", [counted, real]), padding_idx], hint="position_ids")


@makes("mean_weights")
def _mean_weights(g, names, args, result, other):
    """The mask (B, L, 1) and the counts (B, 1), as mean pooling weighs tokens."""
    dtype = result[0].dtype
    mask = _cast(g, names[0], dtype)
    counts = g.op("ReduceSum", [mask, g.ints([1])], keepdims=1)
    counts = g.op("Max", [counts, g.scalar(1e-9, dtype)])
    return g.op("Unsqueeze", [mask, g.ints([2])], hint="pooling_mask"), counts


@makes("choices_as_rows")
def _choices_as_rows(g, names, args, result, other):
    """Multiple choice's (B, C, L) arrays as (B * C, L) rows, and the (B, C) sizes (not in the graph)."""
    return [g.op("Reshape", [name, g.shape(row.shape, other_row.shape)], hint="rows")
            for name, row, other_row in zip(names, result[0], other[0]) if row is not None]
