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
    values: object  # the names of arrays made outside the graph: values.array(a)


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
    if parts and all(hasattr(p, "shape") for p in parts):
        return _gather_nd(g, call, parts)
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


@emits("_Gather")
def _gather(g, call):
    """torch.gather's take_along_axis: GatherElements, its index made outside the graph."""
    index = call.values.array(call.options["index"])
    if index is None:
        raise ExportError("unmapped op: _Gather with an index the exporter does not know (mark its helper outside_graph)")
    return g.op("GatherElements", [call.names[0], index], axis=call.options["dim"] % call.inputs[0].ndim)


def _gather_nd(g, call, parts):
    """x[i, j, ...] with index arrays of one shape, each made outside the graph: GatherND."""
    names = [call.values.array(p) for p in parts]
    if None in names or len({p.shape for p in parts}) != 1:
        raise ExportError("unmapped op: GetItem with index arrays the exporter does not know (mark their helper "
                          "outside_graph)")
    at = g.op("Concat", [g.op("Unsqueeze", [n, g.ints([-1])]) for n in names], axis=-1)
    return g.op("GatherND", [call.names[0], at], hint="gather_nd")


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


@makes("token_weights")
def _token_weights(g, names, args, result, other):
    """The mask as (B, L, 1) weights."""
    return g.op("Unsqueeze", [_cast(g, names[0], result.dtype), g.ints([2])], hint="token_weights")


@makes("token_counts")
def _token_counts(g, names, args, result, other):
    """The tokens of each row (B, 1), at least the floor when one is given."""
    counts = g.op("ReduceSum", [_cast(g, names[0], result.dtype), g.ints([1])], keepdims=1, hint="token_counts")
    floor = args[2] if len(args) > 2 else None
    return counts if floor is None else g.op("Max", [counts, g.scalar(floor, result.dtype)], hint="token_counts")


@makes("pair_masks")
def _pair_masks(g, names, args, result, other):
    """DeBERTa's (bias (1 - pairs) x the dtype's minimum, queries mask[:, None, :, None], pairs
    queries x mask[:, None, None, :]), of the dtype."""
    dtype = result[0].dtype
    mask = _cast(g, names[0], dtype)
    queries = g.op("Unsqueeze", [mask, g.ints([1, 3])], hint="query_weights")
    pairs = g.op("Mul", [queries, g.op("Unsqueeze", [mask, g.ints([1, 2])])], hint="pair_weights")
    bias = g.op("Mul", [g.op("Sub", [g.scalar(1.0, dtype), pairs]), g.scalar(numpy.finfo(dtype).min, dtype)],
                hint="pair_mask_bias")
    return [bias, queries, pairs]


@makes("relative_index")
def _relative_index(g, names, args, result, other):
    """clip(sign relative_pos + span, 0, 2 span - 1), expanded to (..., L, L)."""
    _, span, _, sign = args
    at = g.op("Add", [g.op("Mul", [names[0], g.constant(numpy.asarray(sign, numpy.int64))]),
                      g.constant(numpy.asarray(span, numpy.int64))])
    at = g.op("Clip", [at, g.constant(numpy.asarray(0, numpy.int64)), g.constant(numpy.asarray(2 * span - 1, numpy.int64))])
    return g.op("Expand", [at, g.shape(result.shape, other.shape)], hint="relative_index")


@makes("local_attention_biases")
def _local_attention_biases(g, names, args, result, other):
    """ModernBERT's biases: padding keys at the dtype's minimum (B, 1, 1, L), and on the local
    layers also the keys farther than the window from the query (B, 1, L, L)."""
    _, _, window, dtype = args
    if any(result[kind] is None for kind in result):
        raise ExportError("local_attention_biases traced without padding: the exporter's batch must be padded")
    keys = g.op("Unsqueeze", [g.op("Cast", [names[0]], to=9), g.ints([1, 2])])  # 9: BOOL, (B, 1, 1, L)
    positions = g.op("Range", [g.constant(numpy.asarray(0, numpy.int64)), g.scalar_dim("sequence"),
                               g.constant(numpy.asarray(1, numpy.int64))])
    distance = g.op("Abs", [g.op("Sub", [g.op("Unsqueeze", [positions, g.ints([1])]),
                                         g.op("Unsqueeze", [positions, g.ints([0])])])])
    near = g.op("LessOrEqual", [distance, g.constant(numpy.asarray(window, numpy.int64))])
    allowed = {"full_attention": keys, "sliding_attention": g.op("And", [keys, near])}
    zero, lowest = g.scalar(0.0, dtype), g.scalar(numpy.finfo(dtype).min, dtype)
    return [g.op("Where", [allowed[kind], zero, lowest], hint=kind) for kind in result]


@makes("length_table")
def _length_table(g, names, args, result, other):
    """The table at the model's longest length, sliced to L on each axis whose size follows L
    (after checking that the traced table is that prefix)."""
    helper, (length, *rest), kwargs = args
    full = helper(g.max_length, *rest, **kwargs)
    tables, full_tables, other_tables = (list(t) if isinstance(t, tuple) else [t] for t in (result, full, other))
    out = []
    for table, whole, other_table in zip(tables, full_tables, other_tables):
        axes = [axis for axis, (a, b) in enumerate(zip(table.shape, other_table.shape)) if a != b]
        if not numpy.array_equal(whole[tuple(slice(0, length) if a in axes else slice(None) for a in range(whole.ndim))],
                                 table):
            raise ExportError(f"{helper.__name__}'s table at length {length} is not the start of its table at "
                              f"{g.max_length}: it cannot be sliced from one table")
        stop = g.dim("sequence")
        out.append(g.op("Slice", [g.constant(whole, hint=helper.__name__), g.ints([0] * len(axes)),
                                  g.op("Concat", [stop] * len(axes), axis=0), g.ints(axes)], hint=helper.__name__))
    return out


@makes("choices_as_rows")
def _choices_as_rows(g, names, args, result, other):
    """Multiple choice's (B, C, L) arrays as (B * C, L) rows, and the (B, C) sizes (not in the graph)."""
    return [g.op("Reshape", [name, g.shape(row.shape, other_row.shape)], hint="rows")
            for name, row, other_row in zip(names, result[0], other[0]) if row is not None]


@makes("first_tokens")
def _first_tokens(g, names, args, result, other):
    """0 ... N - 1, and each row's first attended position (ArgMax keeps the first of equal maxima, as numpy)."""
    mask = names[0]
    rows = g.op("Squeeze", [g.op("Gather", [g.op("Shape", [mask]), g.ints([0])]), g.ints([0])])
    rows = g.op("Range", [g.constant(numpy.asarray(0, numpy.int64)), rows, g.constant(numpy.asarray(1, numpy.int64))])
    return [rows, g.op("ArgMax", [_cast(g, mask, numpy.int32)], axis=-1, keepdims=0, hint="first_tokens")]

