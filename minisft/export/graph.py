"""An ONNX graph under construction, with symbolic batch and sequence sizes.

The same forward pass is traced twice, at two input shapes whose sizes differ in every
symbolic dimension (minisft.export.exporter). A size that is the same in both traces is a
constant; one that differs is c x the product of some of the inputs' dimensions (batch,
choices, sequence), solved from the two traces, and written as Shape, Gather and Mul
operators, so that one file serves every batch and length.
"""
import itertools
import math

import numpy

from minisft.engine.errors import UserError


class ExportError(UserError, ValueError):
    """A model the exporter cannot write: an op with no ONNX mapping, an adapter not merged, ..."""


class Graph:
    """Nodes, initializers and the symbolic sizes of one ONNX graph.

    dims: {name: (size in trace 1, size in trace 2, graph input, its axis)} of the symbolic
    dimensions, e.g. {"batch": (2, 3, "input_ids", 0), "sequence": (7, 11, "input_ids", 1)};
    max_length: the longest sequence the model takes (tables of the length are cut from it)."""

    def __init__(self, dims, max_length):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers, self.dims, self.max_length = [], {}, dims, max_length
        self._names = itertools.count()
        self._dim_values = {}

    def prune(self, outputs):
        """Keep only the nodes that the graph's `outputs` depend on, and the initializers they
        read (a Linear's weight is stored transposed, not as it is); returns the names read."""
        needed, kept = set(outputs), []
        for node in reversed(self.nodes):
            if any(out in needed for out in node.output):
                kept.append(node)
                needed.update(node.input)
        self.nodes = kept[::-1]
        self.initializers = {name: tensor for name, tensor in self.initializers.items() if name in needed}
        return needed

    def name(self, hint):
        return f"{hint}_{next(self._names)}"

    def op(self, op_type, inputs, hint=None, **attributes):
        """Add a node with one output; returns the output's name."""
        out = self.name(hint or op_type)
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], name=out, **attributes))
        return out

    def constant(self, array, hint="const", name=None):
        """An initializer holding `array` (kept as its own dtype); returns its name."""
        name = name or self.name(hint)
        if name not in self.initializers:
            self.initializers[name] = self.numpy_helper.from_array(numpy.array(array, order="C"), name)  # 0-d stays 0-d
        return name

    def scalar(self, value, dtype):
        return self.constant(numpy.asarray(value, dtype=dtype), hint="scalar")

    def ints(self, values):
        return self.constant(numpy.asarray(values, dtype=numpy.int64), hint="ints")

    # --- symbolic sizes ---------------------------------------------------------------
    def dim(self, name):
        """The size of symbolic dimension `name`, a 1-D int64 tensor of one element."""
        if name not in self._dim_values:
            _, _, source, axis = self.dims[name]
            if source not in self._dim_values:
                self._dim_values[source] = self.op("Shape", [source], hint=f"shape_of_{source}")
            self._dim_values[name] = self.op("Gather", [self._dim_values[source], self.ints([axis])], hint=name)
        return self._dim_values[name]

    def size(self, first, second):
        """A size seen as `first` in trace 1 and `second` in trace 2: an int when they agree,
        else the name of a 1-D int64 tensor computing it from the inputs' dimensions."""
        if first == second:
            return int(first)
        names = list(self.dims)
        for count in range(1, len(names) + 1):
            for subset in itertools.combinations(names, count):
                p1 = math.prod(self.dims[n][0] for n in subset)
                p2 = math.prod(self.dims[n][1] for n in subset)
                if first % p1 == 0 and second % p2 == 0 and first // p1 == second // p2:
                    value = self.dim(subset[0])
                    for other in subset[1:]:
                        value = self.op("Mul", [value, self.dim(other)], hint="size")
                    if first // p1 != 1:
                        value = self.op("Mul", [value, self.ints([first // p1])], hint="size")
                    return value
        raise ExportError(f"a size ({first}, then {second} at another input shape) that is no multiple of the "
                          f"inputs' dimensions {', '.join(names)}: the exporter cannot make it symbolic")

    def shape(self, first, second):
        """A shape (sequence of sizes) seen in the two traces, as a 1-D int64 tensor's name."""
        if len(first) != len(second):
            raise ExportError(f"a shape of rank {len(first)} at one input shape and {len(second)} at another")
        sizes = [self.size(a, b) for a, b in zip(first, second)]
        if all(isinstance(s, int) for s in sizes):
            return self.ints(sizes)
        parts = [self.ints([s]) if isinstance(s, int) else s for s in sizes]
        return self.op("Concat", parts, hint="shape", axis=0)

    def scalar_dim(self, name):
        """The size of symbolic dimension `name` as a 0-D int64 tensor (for Range)."""
        return self.op("Squeeze", [self.dim(name), self.ints([0])], hint=f"{name}_scalar")
