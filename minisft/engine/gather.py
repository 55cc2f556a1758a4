"""gather: torch.gather along one dim, the read DeBERTa's relative-position attention makes
(each query's row of position scores read at its keys' distances).

    out[..., i, j] = input[..., i, index[..., i, j]]        (dim = -1)

Backward scatters the gradient back, summing where an index repeats. An index along the last
dim that is the same for every leading row (a broadcast view, as DeBERTa's (L, K) table
expanded over batch and heads) is read and scattered for all of them at once: its flat
positions in each row's (L, R) block taken once, sorted once, repeats summed by add.reduceat
(in the order of the index, as index_add sums).
"""
import numpy

from minisft.engine.backend import get_array_module, index_add
from minisft.engine.tensor import Function, Tensor


def _shared(index):
    """The (L, K) table of an index broadcast over its leading dims (stride 0), else None."""
    if index.ndim < 3 or any(s != 0 for s in index.strides[:-2]):
        return None
    return index[(0,) * (index.ndim - 2)]


class _Gather(Function):
    def forward(self, x, *, index, dim):
        xp = get_array_module(x)
        self.dim, self.shape = dim % x.ndim, x.shape
        self.index, self.table = index, _shared(index) if self.dim == x.ndim - 1 else None
        if self.table is None:
            return xp.take_along_axis(x, index, axis=self.dim)
        length, width = x.shape[-2:]
        self.positions = (xp.arange(length)[:, None] * width + self.table).reshape(-1)  # into each (L * R) block
        rows = xp.ascontiguousarray(x).reshape(-1, length * width)
        return xp.take(rows, self.positions, axis=1).reshape(index.shape)

    def backward(self, g):
        xp = get_array_module(g)
        if self.table is not None:
            return (self._scatter_shared(xp, g),)
        g, index = xp.moveaxis(g, self.dim, -1), xp.moveaxis(self.index, self.dim, -1)
        shape = tuple(numpy.moveaxis(numpy.empty(self.shape, bool), self.dim, -1).shape)
        rows, width = int(numpy.prod(shape[:-1])), shape[-1]
        positions = (xp.arange(rows)[:, None] * width + index.reshape(rows, -1)).reshape(-1)
        grad = xp.zeros(rows * width, dtype=g.dtype)
        index_add(grad, positions, xp.ascontiguousarray(g).reshape(-1))
        return (xp.ascontiguousarray(xp.moveaxis(grad.reshape(shape), -1, self.dim)),)

    def _scatter_shared(self, xp, g):
        """The gradient when every leading row reads the same positions: sorted once, each
        position's columns summed (add.reduceat) where it repeats, written in one scatter."""
        length, width = self.shape[-2:]
        g = xp.ascontiguousarray(g).reshape(-1, self.positions.size)
        grad = xp.zeros((g.shape[0], length * width), dtype=g.dtype)
        if xp is not numpy:
            index_add(grad.T, self.positions, g.T)
            return grad.reshape(self.shape)
        order = numpy.argsort(self.positions, kind="stable")
        sorted_positions = self.positions[order]
        starts = numpy.flatnonzero(numpy.r_[True, sorted_positions[1:] != sorted_positions[:-1]])
        if starts.size == sorted_positions.size:  # no position read twice: a plain scatter
            grad[:, self.positions] = g
        else:
            grad[:, sorted_positions[starts]] = numpy.add.reduceat(numpy.take(g, order, axis=1), starts, axis=1)
        return grad.reshape(self.shape)


def gather(input, dim, index):
    """torch.gather: input's elements at `index` (ints, input's ndim, the output's shape) along
    `dim`; index may be a broadcast view (kept as one: it is an option, not an input)."""
    index = index.data if isinstance(index, Tensor) else index
    dim = dim % input.ndim
    if index.ndim != input.ndim or any(a != b for d, (a, b) in enumerate(zip(index.shape, input.shape)) if d != dim):
        raise ValueError(f"gather: index of shape {tuple(index.shape)} for input {tuple(input.shape)} along dim "
                         f"{dim}: other dims must match")
    device = input.device if isinstance(input, Tensor) else None
    return _Gather.apply(input, index=index if device is None else device.put(index), dim=dim)
