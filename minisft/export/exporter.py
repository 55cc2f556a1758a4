"""A plain minisft model as an ONNX file, traced from its own graph.

The model's eval forward runs twice under minisft.engine.trace, on padded batches of two
shapes (batch, choices and sequence sizes that differ between the two). Each op recorded is
written through minisft.export.operators; a parameter becomes an initializer under its
checkpoint name; an array a model made outside the graph is written by its helper's emitter;
any other constant must be the same at both shapes, or it would freeze one shape into the file.

    build(model, ("logits",))   # an onnx ModelProto: inputs input_ids, attention_mask[, token_type_ids]
"""
import importlib.util
import pathlib

import numpy

from minisft.engine.errors import MissingExtra
from minisft.engine.tensor import no_grad
from minisft.engine.trace import tracing
from minisft.export.graph import ExportError, Graph
from minisft.export.operators import FUNCTIONS, HELPERS, Call

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# (batch, choices, sequence) of the two traces: no product of a subset is the same in both
SHAPES = ({"batch": 2, "choices": 3, "sequence": 7}, {"batch": 3, "choices": 5, "sequence": 11})


def sample_inputs(config, sizes, multiple_choice):
    """A padded batch: row i has sequence - 2 i real tokens (at least 2), ids from 5 up, not the padding id."""
    batch, length = sizes["batch"], sizes["sequence"]
    shape = (batch, sizes["choices"], length) if multiple_choice else (batch, length)
    rng = numpy.random.default_rng(0)
    pad = getattr(config, "pad_token_id", 0) or 0
    ids = rng.integers(5, min(config.vocab_size, 1000), shape).astype(numpy.int64)
    ids[ids == pad] = 5 if pad != 5 else 6
    lengths = numpy.maximum(length - 2 * numpy.arange(batch), 2)
    mask = numpy.broadcast_to(numpy.arange(length) < lengths.reshape((batch,) + (1,) * (len(shape) - 1)), shape)
    mask = mask.astype(numpy.int64)
    ids = numpy.where(mask == 1, ids, pad)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": numpy.zeros(shape, numpy.int64)}


def require(package):
    """Raise MissingExtra naming the install unless `package` (onnx, onnxruntime) can be imported."""
    if importlib.util.find_spec(package) is None:
        raise MissingExtra(f"exporting to ONNX needs {package}, of the export extra: pip install -e '.[export]'")


def _trace(model, inputs):
    with no_grad(), tracing() as trace:
        out = model(inputs["input_ids"], attention_mask=inputs["attention_mask"], token_type_ids=inputs["token_type_ids"])
    return trace, out


def _arrays(structure):
    """The arrays in a helper's result (nested tuples, lists and dicts' values), in order."""
    if isinstance(structure, dict):
        structure = list(structure.values())
    if isinstance(structure, (tuple, list)):
        return [leaf for part in structure for leaf in _arrays(part)]
    return [structure] if hasattr(structure, "shape") else []


class _Values:
    """Names in the graph of the traced tensors and arrays."""

    def __init__(self, graph, model, inputs):
        self.graph = graph
        self.params = {id(p): name for name, p in model.named_parameters()}
        self.tensors, self.arrays = {}, {id(inputs[k]): k for k in INPUTS}

    def array(self, a):
        return self.arrays.get(id(a)) if hasattr(a, "shape") else None

    def tensor(self, t, other, op, position):
        if id(t) in self.tensors:
            return self.tensors[id(t)]
        if id(t) in self.params:
            return self.graph.constant(t.data, name=self.params[id(t)])
        name = self.array(t.data)
        if name is not None:
            return name
        if t.shape != other.shape or not numpy.array_equal(t.data, other.data):
            raise ExportError(f"unmapped op: input {position} of {op} (shape {t.shape}) is computed outside the graph "
                              "from the inputs by code the exporter does not know; mark its helper with "
                              "minisft.engine.trace.outside_graph and give it an emitter in minisft.export.operators")
        return self.graph.constant(t.data)


def build(model, outputs, multiple_choice=False):
    """The onnx ModelProto of `model`'s eval forward, checked by onnx.checker. outputs: the names of
    the output's parts (one: `.logits` as it is; two: its last axis split, start and end logits);
    multiple_choice: inputs (batch, choices, sequence)."""
    require("onnx")
    import onnx
    from onnx import TensorProto, helper

    model.eval()
    traced = []
    for sizes in SHAPES:
        inputs = sample_inputs(model.config, sizes, multiple_choice)
        traced.append((inputs,) + _trace(model, inputs))
    (inputs, trace, out), (_, other_trace, other_out) = traced
    axes = ("batch", "choices", "sequence") if multiple_choice else ("batch", "sequence")
    graph = Graph({name: (SHAPES[0][name], SHAPES[1][name], "input_ids", axis) for axis, name in enumerate(axes)},
                  max_length=model.config.max_position_embeddings)
    values = _Values(graph, model, inputs)
    if len(trace.events) != len(other_trace.events):
        raise ExportError("the forward pass runs different ops at two input shapes; the exporter needs one graph")
    for event, other in zip(trace.events, other_trace.events):
        if event[0] == "helper":
            _helper(graph, values, event, other)
        else:
            _function(graph, values, event, other)
    names = _outputs(graph, values, outputs, out, other_out)
    dims = {n: graph.dims[n][:2] for n in axes}
    read = graph.prune(names)
    graph_inputs = [helper.make_tensor_value_info(k, TensorProto.INT64, list(axes)) for k in INPUTS if k in read]
    graph_outputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                                   _symbolic(array.shape, other_shape, dims))
                     for name, (array, other_shape) in names.items()]
    proto = helper.make_model(helper.make_graph(graph.nodes, f"minisft {type(model).__name__}", graph_inputs, graph_outputs,
                                                list(graph.initializers.values())),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="minisft")
    onnx.checker.check_model(proto, full_check=False)
    return proto


def _helper(graph, values, event, other):
    _, name, args, _, result = event
    if other[1] != name:
        raise ExportError(f"the forward pass calls {name} at one input shape and {other[1]} at another")
    if name not in HELPERS:
        raise ExportError(f"unmapped op: the helper {name!r} has no emitter in minisft.export.operators")
    names = [values.array(a) for a in args]
    made = HELPERS[name](graph, names, args, result, other[4])
    made = [made] if isinstance(made, str) else list(made)
    arrays = _arrays(result)
    if len(made) != len(arrays):
        raise ExportError(f"the emitter of {name!r} wrote {len(made)} arrays of its {len(arrays)}")
    values.arrays.update((id(array), made_name) for array, made_name in zip(arrays, made))


def _function(graph, values, event, other):
    _, fn, inputs, options, out = event
    op = type(fn).__name__
    if type(other[1]).__name__ != op:
        raise ExportError(f"the forward pass runs {op} at one input shape and {type(other[1]).__name__} at another")
    if op not in FUNCTIONS:
        raise ExportError(f"unmapped op: {op} has no ONNX mapping in minisft.export.operators")
    names = [values.tensor(t, t2, op, i) for i, (t, t2) in enumerate(zip(inputs, other[2]))]
    values.tensors[id(out)] = FUNCTIONS[op](graph, Call(fn, other[1], options, names, inputs, out, other[4], values))


def _outputs(graph, values, wanted, out, other_out):
    """{output name: (first trace's array, second trace's shape)}, each an Identity of what the head made."""
    logits, other_logits = out.logits, other_out.logits
    name = values.tensors.get(id(logits))
    if name is None:
        raise ExportError("the model's output was not made by a traced op")
    if len(wanted) == 1:
        parts = [(name, logits.data, other_logits.shape)]
    else:  # question answering: (B, L, 2) -> start and end (B, L)
        parts = [(graph.op("Gather", [name, graph.constant(numpy.asarray(i, numpy.int64))], axis=-1),
                  logits.data[..., i], other_logits.shape[:-1]) for i in range(2)]
    found = {}
    for output, (source, array, other_shape) in zip(wanted, parts):
        graph.nodes.append(graph.helper.make_node("Identity", [source], [output], name=output))
        found[output] = (array, other_shape)
    return found


def _symbolic(shape, other_shape, dims):
    """Each axis as a dimension name where it follows one of them, else its size (None where it varies otherwise)."""
    out = []
    for a, b in zip(shape, other_shape):
        if a == b:
            out.append(int(a))
        else:
            out.append(next((n for n, (x, y) in dims.items() if (x, y) == (a, b)), None))
    return out


TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spm.model", "sentencepiece.bpe.model")
SETTINGS = "labels.json"  # beside the file: its task, labels and the settings predict needs


def save(model, task, output, source, settings, quantize=None):
    """Write `model` (plain, eval) for `task` (minisft.tasks) as the ONNX file `output`, int8 MatMul weights with
    quantize="int8" (onnxruntime's dynamic quantisation); beside it, the tokenizer files of
    directory `source` and labels.json ({task, id2label, inputs, outputs, settings...})."""
    import shutil

    import onnx

    from minisft.files.atomic import write_atomic, write_json_atomic

    output = pathlib.Path(output)
    if quantize is not None:
        require("onnxruntime")
    proto = build(model, task.exported_outputs, multiple_choice=task.choices_axis)
    if proto.ByteSize() >= 2 ** 31:
        raise ExportError(f"{output}: the model is {proto.ByteSize() / 2 ** 30:.1f} GiB, beyond one protobuf's 2 GiB")
    if quantize is None:
        write_atomic(output, lambda tmp: onnx.save_model(proto, tmp))
    else:
        write_atomic(output, lambda tmp: _quantized(proto, tmp))
    for name in TOKENIZER_FILES:
        if (pathlib.Path(source) / name).is_file() and (output.parent / name).resolve() != (pathlib.Path(source) / name).resolve():
            write_atomic(output.parent / name, lambda tmp, name=name: shutil.copyfile(pathlib.Path(source) / name, tmp))
    write_json_atomic({"task": task.name, "file": output.name, "quantize": quantize,
                       "id2label": {str(i): label for i, label in model.config.id2label.items()},
                       "inputs": [i.name for i in proto.graph.input], "outputs": [o.name for o in proto.graph.output],
                       "model_type": model.config.model_type, **settings}, output.parent / SETTINGS)
    return output


def _quantized(proto, path):
    """onnxruntime's dynamic quantisation (int8 weights of MatMul, activations quantised as they come)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=pathlib.Path(path).parent, prefix=".quantize-") as tmp:
        plain = pathlib.Path(tmp) / "float32.onnx"
        onnx.save_model(proto, plain)
        quantize_dynamic(plain, path, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
