"""The primitive differentiable ops behind Tensor's operators and methods.

Each op is a Function: `forward` on raw arrays keeps only what `backward` needs, and
`backward` returns one gradient per input, reduced back to that input's shape when the
forward broadcast it.
"""
import itertools

import numpy

from minisft.engine.backend import Device, device_of, get_array_module, index_add
from minisft.engine.tensor import Function, Tensor


def unbroadcast(grad, shape):
    """Sum `grad` over the axes that broadcasting added or stretched, giving `shape`."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape)


def _broadcast_shape(op, a, b):
    xp = get_array_module(a)
    try:
        return xp.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be "
                         f"broadcast together") from None


class _Binary(Function):
    """Elementwise op of two broadcastable inputs."""

    def forward(self, a, b):
        _broadcast_shape(type(self).__name__.lower(), a, b)
        self.shapes = (a.shape, b.shape)
        return self.compute(a, b)

    def reduce(self, ga, gb):
        shape_a, shape_b = self.shapes
        return (unbroadcast(ga, shape_a) if ga is not None else None,
                unbroadcast(gb, shape_b) if gb is not None else None)


class Add(_Binary):
    def compute(self, a, b):
        return a + b

    def backward(self, g):
        return self.reduce(g, g)


class AddInPlace(Add):
    """a + b written over a's array, which becomes the output (b broadcasting to a's shape):
    for a product just made and held by nothing else, as a residual connection's. Add's
    backward."""

    def compute(self, a, b):
        if _broadcast_shape("add_", a, b) != a.shape:
            raise ValueError(f"add_: b's shape {tuple(b.shape)} would widen a's {tuple(a.shape)}")
        a += b
        return a


class Sub(_Binary):
    def compute(self, a, b):
        return a - b

    def backward(self, g):
        return self.reduce(g, -g if self.needs_input_grad[1] else None)


class Mul(_Binary):
    def compute(self, a, b):
        need_a, need_b = self.needs_input_grad
        self.save_for_backward(a if need_b else None, b if need_a else None)  # da = g b, db = g a
        return a * b

    def backward(self, g):
        a, b = self.saved
        need_a, need_b = self.needs_input_grad
        return self.reduce(g * b if need_a else None, g * a if need_b else None)


class Div(_Binary):
    def compute(self, a, b):
        self.save_for_backward(a, b)
        return a / b

    def backward(self, g):
        a, b = self.saved
        need_a, need_b = self.needs_input_grad
        ga = g / b if need_a else None
        gb = -g * a / (b * b) if need_b else None
        return self.reduce(ga, gb)


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return (-g,)


class Pow(Function):
    """x ** p for a Python-number exponent p."""

    def forward(self, a, exponent):
        if isinstance(exponent, Tensor):
            raise TypeError("pow: the exponent must be a Python number, not a Tensor")
        self.exponent = exponent
        self.save_for_backward(a)
        return a ** a.dtype.type(exponent)

    def backward(self, g):
        (a,) = self.saved
        p = a.dtype.type(self.exponent)
        return (g * p * a ** (p - 1),)


class Exp(Function):
    def forward(self, a):
        out = get_array_module(a).exp(a)
        self.save_for_backward(out)
        return out

    def backward(self, g):
        (out,) = self.saved
        return (g * out,)


class Log(Function):
    def forward(self, a):
        self.save_for_backward(a)
        return get_array_module(a).log(a)

    def backward(self, g):
        (a,) = self.saved
        return (g / a,)


class Sqrt(Function):
    def forward(self, a):
        out = get_array_module(a).sqrt(a)
        self.save_for_backward(out)
        return out

    def backward(self, g):
        (out,) = self.saved
        return (g / (2 * out),)


class Tanh(Function):
    def forward(self, a):
        out = get_array_module(a).tanh(a)
        self.save_for_backward(out)
        return out

    def backward(self, g):
        (out,) = self.saved
        return (g * (1 - out * out),)


class MatMul(Function):
    """a @ b with NumPy's rules: batched over leading dims, 1-D operands promoted."""

    def forward(self, a, b):
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        if a2.shape[-1] != b2.shape[-2]:
            raise ValueError(
                f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} are incompatible: the last "
                f"dim of the first ({a2.shape[-1]}) must equal the second-to-last dim of the "
                f"second ({b2.shape[-2]})")
        self.save_for_backward(a2, b2)
        self.shapes = (a.shape, b.shape)
        out = a2 @ b2
        if a.ndim == 1:
            out = out[..., 0, :]
        if b.ndim == 1:
            out = out[..., 0]
        return out

    def backward(self, g):
        a2, b2 = self.saved
        shape_a, shape_b = self.shapes
        if len(shape_b) == 1:
            g = g[..., None]
        if len(shape_a) == 1:
            g = g[..., None, :]
        need_a, need_b = self.needs_input_grad
        ga = unbroadcast(g @ b2.swapaxes(-1, -2), a2.shape).reshape(shape_a) if need_a else None
        gb = unbroadcast(a2.swapaxes(-1, -2) @ g, b2.shape).reshape(shape_b) if need_b else None
        return ga, gb


class Reshape(Function):
    def forward(self, a, shape):
        self.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape {tuple(a.shape)} ({a.size} elements) "
                             f"into {shape}") from None

    def backward(self, g):
        return (g.reshape(self.shape),)


class Permute(Function):
    def forward(self, a, dims):
        self.dims = dims
        return a.transpose(dims)

    def backward(self, g):
        inverse = [0] * len(self.dims)
        for i, d in enumerate(self.dims):
            inverse[d % len(self.dims)] = i
        return (g.transpose(inverse),)


def _raw_index(index, device):
    """Unwrap Tensors inside an index expression and put index arrays on `device`."""
    if isinstance(index, tuple):
        return tuple(_raw_index(i, device) for i in index)
    if isinstance(index, Tensor):
        index = index.data
    if isinstance(index, list):
        index = numpy.asarray(index)
    return device.put(index) if hasattr(index, "shape") else index


def _is_advanced(index):
    parts = index if isinstance(index, tuple) else (index,)
    return any(hasattr(p, "shape") for p in parts)


class GetItem(Function):
    """a[index] with slices, ints, None, Ellipsis and integer or boolean arrays."""

    def forward(self, a, index):
        self.index = _raw_index(index, device_of(a))
        self.shape, self.dtype = a.shape, a.dtype
        return a[self.index]

    def backward(self, g):
        xp = get_array_module(g)
        grad = xp.zeros(self.shape, dtype=self.dtype)
        if not _is_advanced(self.index):
            grad[self.index] = g
            return (grad,)
        # Scatter-add through flat positions so that repeated indices accumulate.
        positions = xp.arange(grad.size).reshape(self.shape)[self.index]
        index_add(grad.reshape(-1), positions.reshape(-1), g.reshape(-1))
        return (grad,)


class Cat(Function):
    def forward(self, *arrays, dim):
        xp = get_array_module(arrays[0])
        self.dim = dim
        self.sizes = [a.shape[dim] for a in arrays]
        try:
            return xp.concatenate(arrays, axis=dim)
        except ValueError:
            shapes = ", ".join(str(tuple(a.shape)) for a in arrays)
            raise ValueError(f"cat: shapes {shapes} differ outside dim {dim}") from None

    def backward(self, g):
        bounds = list(itertools.accumulate(self.sizes))[:-1]
        return tuple(get_array_module(g).split(g, bounds, axis=self.dim))


class CatView(Function):
    """Tensors whose arrays are consecutive row blocks of one array `whole`, as that array:
    cat along dim 0 without a copy (minisft.nn.packed_rows makes such tensors); backward
    splits the gradient into the blocks."""
    dim = 0

    def forward(self, *arrays, whole):
        self.sizes = [a.shape[0] for a in arrays]
        return whole

    backward = Cat.backward


class AddColumns(Function):
    """packed[..., start:start + width] += part for each part, in packed's own array, which
    becomes the output (no copy, no (..., N) temporary): for a product just made and held by
    nothing else. Backward passes g on to packed and its columns to each part."""

    def forward(self, packed, *parts, starts):
        self.columns = [slice(start, start + part.shape[-1]) for start, part in zip(starts, parts)]
        for columns, part in zip(self.columns, parts):
            packed[..., columns] += part
        return packed

    def backward(self, g):
        return (g,) + tuple(g[..., columns] for columns in self.columns)


def _expand_reduced(g, shape, dim, keepdim):
    """Re-insert reduced axes into `g` so that it broadcasts against `shape`."""
    if dim is None:
        return g.reshape((1,) * len(shape))
    if not keepdim:
        dims = sorted(d % len(shape) for d in (dim if isinstance(dim, tuple) else (dim,)))
        for d in dims:
            g = get_array_module(g).expand_dims(g, d)
    return g


class Sum(Function):
    def forward(self, a, dim, keepdim):
        self.shape, self.dim, self.keepdim = a.shape, dim, keepdim
        return a.sum(axis=dim, keepdims=keepdim)

    def backward(self, g):
        xp = get_array_module(g)
        return (xp.broadcast_to(_expand_reduced(g, self.shape, self.dim, self.keepdim),
                                self.shape),)


class Mean(Function):
    def forward(self, a, dim, keepdim):
        self.shape, self.dim, self.keepdim = a.shape, dim, keepdim
        out = a.mean(axis=dim, keepdims=keepdim)
        self.count = a.size // max(out.size, 1) if a.size else 0
        return out

    def backward(self, g):
        xp = get_array_module(g)
        g = _expand_reduced(g, self.shape, self.dim, self.keepdim) / g.dtype.type(self.count)
        return (xp.broadcast_to(g, self.shape),)


class Max(Function):
    def forward(self, a, dim, keepdim):
        self.dim, self.keepdim = dim, keepdim
        out = a.max(axis=dim, keepdims=True)
        self.save_for_backward(a, out)
        if keepdim:
            return out
        return out.reshape(()) if dim is None else out.squeeze(axis=dim)

    def backward(self, g):
        a, out = self.saved
        mask = a == out
        g = _expand_reduced(g, a.shape, self.dim, self.keepdim)
        count = mask.sum(axis=self.dim, keepdims=True).astype(a.dtype)
        return (mask * (g / count),)


class Where(Function):
    """where(condition, x, y): x where condition is true, else y; the condition gets no grad."""

    def forward(self, condition, x, y):
        xp = get_array_module(x)
        self.shapes = (x.shape, y.shape)
        self.save_for_backward(condition)
        return xp.where(condition, x, y)

    def backward(self, g):
        (condition,) = self.saved
        shape_x, shape_y = self.shapes
        zero = g.dtype.type(0)
        xp = get_array_module(g)
        gx = unbroadcast(xp.where(condition, g, zero), shape_x) if self.needs_input_grad[1] else None
        gy = unbroadcast(xp.where(condition, zero, g), shape_y) if self.needs_input_grad[2] else None
        return None, gx, gy


class To(Function):
    """A copy on another device or of another dtype; the gradient goes back as it came."""

    def forward(self, a, device, dtype):
        self.source_dtype, self.source_device = a.dtype, device_of(a)
        return device.put(a).astype(dtype, copy=False)

    def backward(self, g):
        return (self.source_device.put(g).astype(self.source_dtype, copy=False),)


def in_place_target(x, name):
    """x, checked as the array an in-place op writes over: a leaf that needs a gradient (a
    parameter) keeps its values."""
    if isinstance(x, Tensor) and x.requires_grad and x.is_leaf:
        raise ValueError(f"{name} in place on a leaf tensor that requires grad (a parameter?) "
                         f"would overwrite it: use the op out of place")
    return x


def add_(a, b):
    """a + b in a's own array (a's values are lost): for a product that nothing else holds."""
    return AddInPlace.apply(in_place_target(a, "add_"), b)


def add_columns_(packed, parts, starts):
    """packed with each part (..., width) added to its columns start:start + width, in place
    (packed's array is the result): for a product that nothing else holds."""
    return AddColumns.apply(in_place_target(packed, "add_columns_"), *parts, starts=tuple(starts))


def cat(tensors, dim=0):
    """Concatenate tensors along an existing dim."""
    return Cat.apply(*tensors, dim=dim)


def where(condition, x, y):
    """x where `condition` is true, else y (all broadcast together)."""
    return Where.apply(condition, x, y)


# --- Tensor's operators and methods --------------------------------------------------------
# tensor.py defines Tensor without them, so that it imports nothing from above it; they are
# installed here, below the ops they call (as DeZero's setup_variable does).
def _dims(args):
    """f(2, 3) and f((2, 3)) alike."""
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)


def _reshape(self, *shape):
    return Reshape.apply(self, shape=_dims(shape))


def _permute(self, *dims):
    return Permute.apply(self, dims=_dims(dims))


def _transpose(self, dim0, dim1):
    dims = list(range(self.ndim))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return self.permute(dims)


def _max(self, dim=None, keepdim=False):
    """Maximum values (no indices); ties share the gradient equally, as torch.amax."""
    return Max.apply(self, dim=dim, keepdim=keepdim)


def _masked_fill(self, mask, value):
    """`value` where `mask` is true, self elsewhere (mask broadcasts)."""
    return Where.apply(mask, value, self)


def _to(self, device=None, dtype=None):
    """A copy on `device` and/or of `dtype`; gradients flow back to the original."""
    device = self.device if device is None else Device(device)
    dtype = self.dtype if dtype is None else numpy.dtype(dtype)
    if device == self.device and dtype == self.dtype:
        return self
    return To.apply(self, device=device, dtype=dtype)


_TENSOR_METHODS = {
    "__add__": lambda self, other: Add.apply(self, other),
    "__radd__": lambda self, other: Add.apply(other, self),
    "__sub__": lambda self, other: Sub.apply(self, other),
    "__rsub__": lambda self, other: Sub.apply(other, self),
    "__mul__": lambda self, other: Mul.apply(self, other),
    "__rmul__": lambda self, other: Mul.apply(other, self),
    "__truediv__": lambda self, other: Div.apply(self, other),
    "__rtruediv__": lambda self, other: Div.apply(other, self),
    "__neg__": lambda self: Neg.apply(self),
    "__pow__": lambda self, exponent: Pow.apply(self, exponent=exponent),
    "__matmul__": lambda self, other: MatMul.apply(self, other),
    "__rmatmul__": lambda self, other: MatMul.apply(other, self),
    "__getitem__": lambda self, index: GetItem.apply(self, index=index),
    "reshape": _reshape,
    "view": _reshape,
    "permute": _permute,
    "transpose": _transpose,
    "T": property(lambda self: self.permute(tuple(reversed(range(self.ndim))))),
    "sum": lambda self, dim=None, keepdim=False: Sum.apply(self, dim=dim, keepdim=keepdim),
    "mean": lambda self, dim=None, keepdim=False: Mean.apply(self, dim=dim, keepdim=keepdim),
    "max": _max,
    "amax": _max,
    "exp": lambda self: Exp.apply(self),
    "log": lambda self: Log.apply(self),
    "sqrt": lambda self: Sqrt.apply(self),
    "tanh": lambda self: Tanh.apply(self),
    "masked_fill": _masked_fill,
    "to": _to,
    "float": lambda self: self.to(dtype=numpy.float32),
    "double": lambda self: self.to(dtype=numpy.float64),
}
for _name, _method in _TENSOR_METHODS.items():
    setattr(Tensor, _name, _method)
