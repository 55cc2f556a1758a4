"""Tensor and the reverse-mode autograd graph.

A Tensor wraps a raw array (`.data`) and, when it was computed from tensors that require
gradients, a reference to the Function that made it (`._ctx`). `backward()` sorts that
graph topologically (iteratively, so deep graphs hit no recursion limit) and walks it once
in reverse, calling each Function's hand-written backward on raw arrays.
"""
import contextlib
import threading

import numpy

from minisft.engine.backend import Device, device_of, get_array_module, is_cupy_array, on_device
from minisft.engine.trace import active as active_trace

_state = threading.local()


def is_grad_enabled():
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def no_grad(enabled=False):
    """Inside this block no graph is recorded: outputs never require grad (enabled=True:
    recorded again, e.g. when backward recomputes a checkpointed block)."""
    previous = is_grad_enabled()
    _state.grad_enabled = enabled
    try:
        yield
    finally:
        _state.grad_enabled = previous


def _is_floating(dtype):
    return numpy.dtype(dtype).kind == "f"


def _default_dtype(array):
    """float64 input becomes float32 (the default); ints and bools keep their type."""
    return numpy.float32 if array.dtype == numpy.float64 else array.dtype


class Function:
    """One differentiable op: `forward` and `backward` on raw arrays.

    `forward(*arrays, **options)` returns the output array and keeps, through
    `save_for_backward`, only what `backward` needs. `backward(grad_output)` returns one
    gradient (or None) per input; `self.needs_input_grad` says which are wanted.

    The graph links a node to its `parents`: for each input, the Function that made it,
    the leaf tensor that receives its gradient, or None. It does not hold the input
    tensors themselves, so an intermediate result's array is freed as soon as nothing
    else uses it; after backward the saved arrays are freed too.

    On its last backward (`last_backward`: no walk of this graph follows, as without
    retain_graph), a node owns what it saved: `take_saved()` lets go of it, so each saved
    array is freed as soon as backward drops its own name for it, and backward may write
    its gradient into an array only forward made and nobody else holds (a GELU's slope, the
    kept pre-activation). On any other backward the saved arrays must stay as they are.
    """

    def __init__(self):
        self.saved = None
        self.output_shape = None
        self.parents = ()
        self.needs_input_grad = ()
        self.recording = False
        self.last_backward = False  # set by the walk: no backward of this node will follow

    def save_for_backward(self, *arrays):
        if self.recording:
            self.saved = arrays

    @classmethod
    def apply(cls, *inputs, **options):
        """Run a new node of this op on `inputs` (Tensors, arrays or scalars)."""
        return cls()(*inputs, **options)

    def __call__(self, *inputs, **options):
        tensors = _as_tensors(type(self).__name__, inputs)
        self.needs_input_grad = tuple(t.requires_grad for t in tensors)
        self.recording = is_grad_enabled() and any(self.needs_input_grad)
        with on_device(tensors[0].data):
            out = self.forward(*(t.data for t in tensors), **options)
        if not self.recording:
            result = Tensor(out)
        else:
            self.parents = tuple(t._ctx if t._ctx is not None else (t if t.requires_grad else None)
                                 for t in tensors)
            self.output_shape = out.shape  # for pictures of the graph (minisft.viz)
            result = Tensor(out, requires_grad=True, _ctx=self)
        trace = active_trace()
        if trace is not None:  # an exporter's recording (minisft.engine.trace)
            trace.function(self, tensors, options, result)
        return result

    def forward(self, *arrays, **options):
        raise NotImplementedError

    def backward(self, grad_output):
        raise NotImplementedError

    def take_saved(self):
        """What forward saved. On the graph's last backward the node lets go of it here, so
        that backward frees each saved array as soon as it drops its own name for it (and
        may write into arrays that only forward made, such as a GELU's slope)."""
        saved = self.saved
        if self.last_backward:
            self.saved = None
        return saved

    def release(self):
        """Free what forward kept; the graph below this node cannot be walked again."""
        self.saved = None
        self.parents = None


def _as_tensors(op, inputs):
    """Wrap scalars and arrays as constants beside the tensors; check devices and dtypes."""
    tensors = [x for x in inputs if isinstance(x, Tensor)]
    like = tensors[0]
    float_dtypes = {t.dtype for t in tensors if _is_floating(t.dtype)}
    if len(float_dtypes) > 1:
        names = " and ".join(sorted(str(d) for d in float_dtypes))
        raise TypeError(f"{op}: tensors of dtypes {names} mixed; convert one with .to(dtype=...)")
    devices = {str(t.device) for t in tensors}
    if len(devices) > 1:
        where = ", ".join(f"input {i} {tuple(x.shape)} on {x.device}"
                          for i, x in enumerate(inputs) if isinstance(x, Tensor))
        raise RuntimeError(f"{op}: tensors on different devices ({where}); move them with .to(device)")
    float_dtype = float_dtypes.pop() if float_dtypes else numpy.float32
    out = []
    for x in inputs:
        if not isinstance(x, Tensor):
            x = Tensor(_constant(x, like, float_dtype))
        out.append(x)
    return out


def _constant(x, like, float_dtype):
    """A scalar or array operand as an array beside `like`, without widening any dtype.

    Float arrays and Python floats take the tensors' float dtype; a Python int takes it too
    when `like` is floating (else like's int dtype); int and bool arrays keep theirs.
    """
    if hasattr(x, "dtype"):
        array = like.device.put(x)
        return array.astype(float_dtype, copy=False) if array.dtype.kind == "f" else array
    if isinstance(x, bool):
        return like.device.put(numpy.asarray(x))
    if isinstance(x, float) or _is_floating(like.dtype):
        return like.device.put(numpy.asarray(x, dtype=float_dtype))
    return like.device.put(numpy.asarray(x, dtype=like.dtype))


class Tensor:
    """An n-dimensional array with optional gradient tracking."""

    __array_ufunc__ = None  # numpy defers to Tensor's reflected operators

    def __init__(self, data, requires_grad=False, _ctx=None):
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._ctx = _ctx
        self._grad_hooks = ()

    # --- properties -----------------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def device(self):
        return device_of(self.data)

    @property
    def is_leaf(self):
        return self._ctx is None

    def size(self, dim=None):
        return self.data.shape if dim is None else self.data.shape[dim]

    def numel(self):
        return self.data.size

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        device = "" if self.device.type == "cpu" else f", device='{self.device}'"
        return f"tensor({self.numpy()!r}{device}{grad})"

    def numpy(self):
        """The data as a NumPy array (copied from the GPU if needed)."""
        return Device("cpu").put(self.data)

    def item(self):
        return self.data.item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def requires_grad_(self, requires_grad=True):
        self.requires_grad = requires_grad
        return self

    # --- autograd -------------------------------------------------------------------
    def register_post_accumulate_grad_hook(self, hook):
        """hook(tensor) runs once per backward pass, when this leaf's `.grad` holds every
        contribution of the pass (as torch's hook of the same name); data-parallel training
        starts a gradient's all-reduce from it."""
        self._grad_hooks = self._grad_hooks + (hook,)

    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) into every leaf's `.grad` that requires grad."""
        if not self.requires_grad:
            raise RuntimeError("backward(): this tensor does not require grad and has no graph")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a scalar, but this tensor has shape "
                    f"{tuple(self.shape)}: reduce it first (e.g. .sum()) or pass backward(grad)")
            grad = get_array_module(self.data).ones_like(self.data)
        else:
            grad = _given_grad(self, grad)
        if self._ctx is None:  # a leaf: its own gradient is `grad`
            _accumulate_leaf(self, grad, owned=False)
            _run_grad_hooks(self)
            return
        with on_device(self.data):
            backpropagate(self._ctx, grad, retain_graph)

    # Arithmetic operators and array methods (+, @, [], reshape, sum, exp, to, ...) are
    # installed by minisft.engine.ops, which defines the ops they call.
    def _compare(self, other, name):
        other = other.data if isinstance(other, Tensor) else other
        return Tensor(getattr(self.data, name)(other))

    def __lt__(self, other):
        return self._compare(other, "__lt__")

    def __le__(self, other):
        return self._compare(other, "__le__")

    def __gt__(self, other):
        return self._compare(other, "__gt__")

    def __ge__(self, other):
        return self._compare(other, "__ge__")

    def __eq__(self, other):
        return self._compare(other, "__eq__")

    def __ne__(self, other):
        return self._compare(other, "__ne__")

    __hash__ = object.__hash__


def backpropagate(node, grad, retain_graph=False):
    """The chain rule over the graph, micrograd's walk: sort the Functions that made the
    output of `node` topologically, then call each one's backward in reverse, from `grad` at
    that output, handing each input's gradient to its parent (GradientSums adds them up and
    fills the leaves' `.grad`s). The walk of Tensor.backward, for a caller that has let the
    output tensor go (its values are not needed, only its gradient)."""
    order = _topological_order(node)
    sums = GradientSums(order)
    sums.add(node, grad)
    for fn in reversed(order):
        g = sums.pop(fn)
        fn.last_backward = not retain_graph
        input_grads = fn.backward(g) if g is not None else (None,) * len(fn.parents)
        for parent, input_grad in zip(fn.parents, input_grads):
            sums.add(parent, input_grad, given_with=input_grads, output_grad=g)
        if not retain_graph:
            fn.release()


class GradientSums:
    """What backward's walk owes each node and leaf: the sum of the gradients that reach it.

    - A Function's gradients are summed in place in an array this walk made, else in a new
      one, so that no array a backward returned (g itself, a view, another leaf's .grad) is
      written over.
    - A leaf's arrive in its `.grad`: a fresh array an op made for this input alone is taken
      as it is, anything else is copied first, so that adding into one .grad never changes
      another gradient. (An id alone would not tell: an array added into a .grad is freed,
      and a later array may get its id.)
    - A leaf's post-accumulate hooks run once every input of the graph it is has had its
      turn (`register_post_accumulate_grad_hook`).
    """

    def __init__(self, order):
        self.sums = {}  # id(Function) -> gradient of its output
        self.owned = set()  # ids of Functions whose sum is an array made here
        self.given = {}  # id of an array given to a leaf in this pass -> that leaf
        self.pending_hooks = {}  # id(leaf with hooks) -> how many of its uses are still to come
        for fn in order:
            for parent in fn.parents:
                if isinstance(parent, Tensor) and parent._grad_hooks:
                    self.pending_hooks[id(parent)] = self.pending_hooks.get(id(parent), 0) + 1

    def pop(self, fn):
        """The sum owed to fn's output, or None when no gradient reached it."""
        return self.sums.pop(id(fn), None)

    def add(self, parent, grad, given_with=(), output_grad=None):
        """One gradient for `parent` (a Function, a leaf Tensor or None), returned among
        `given_with` by a backward that got `output_grad`; None adds nothing."""
        if id(parent) in self.pending_hooks:
            self.pending_hooks[id(parent)] -= 1
        if grad is not None and isinstance(parent, Tensor):
            self._to_leaf(parent, grad, given_with, output_grad)
        elif grad is not None and parent is not None:
            self._to_node(id(parent), grad)
        if self.pending_hooks.get(id(parent)) == 0:
            _run_grad_hooks(parent)

    def _to_node(self, key, grad):
        if key not in self.sums:
            self.sums[key] = grad
        elif key in self.owned:
            self.sums[key] += grad
        else:
            self.sums[key] = self.sums[key] + grad
            self.owned.add(key)

    def _to_leaf(self, leaf, grad, given_with, output_grad):
        holder = self.given.get(id(grad))
        fresh = (grad is not output_grad and grad.base is None
                 and (holder is None or holder.grad is not grad)
                 and sum(other is grad for other in given_with) == 1)
        self.given[id(grad)] = leaf
        _accumulate_leaf(leaf, grad, owned=fresh)


def _given_grad(tensor, grad):
    """backward(grad)'s gradient as an array beside `tensor`: moved to its device (CuPy never
    copies from the host by itself) and in its dtype."""
    grad = array_of(grad)
    if tuple(grad.shape) != tuple(tensor.shape):
        raise ValueError(f"backward(grad): grad has shape {tuple(grad.shape)}, "
                         f"tensor has shape {tuple(tensor.shape)}")
    if numpy.dtype(grad.dtype).kind != "f":
        raise TypeError(f"backward(grad): grad has dtype {grad.dtype}; give a floating-point gradient")
    return tensor.device.put(grad).astype(tensor.dtype, copy=False)


def _topological_order(root):
    """The Functions that `root` (a Function) depends on, inputs first; iterative, so a
    graph of any depth is fine."""
    order, visited, stack = [], set(), [(root, False)]
    while stack:
        fn, expanded = stack.pop()
        if expanded:
            order.append(fn)
            continue
        if id(fn) in visited:
            continue
        visited.add(id(fn))
        if fn.parents is None:
            raise RuntimeError("backward through a graph a second time: its saved arrays were "
                               "freed; call backward(retain_graph=True) the first time")
        stack.append((fn, True))
        stack.extend((p, False) for p in fn.parents if isinstance(p, Function) and id(p) not in visited)
    return order


def _run_grad_hooks(leaf):
    for hook in leaf._grad_hooks:
        hook(leaf)


def _accumulate_leaf(tensor, grad, owned):
    if grad.dtype != tensor.dtype:
        grad = grad.astype(tensor.dtype)
        owned = True
    if tensor.grad is None:
        tensor.grad = grad if owned else grad.copy()
    else:
        tensor.grad += grad


def array_of(x):
    """The array behind `x`: a Tensor's data, a NumPy or CuPy array as it is, anything else
    (lists, scalars) through numpy.asarray (which refuses CuPy arrays)."""
    if isinstance(x, Tensor):
        return x.data
    return x if isinstance(x, numpy.ndarray) or is_cupy_array(x) else numpy.asarray(x)


def tensor(data, requires_grad=False, dtype=None, device="cpu"):
    """A new leaf tensor. Floats default to float32; ints and bools keep their kind."""
    if isinstance(data, Tensor):
        data = data.data
    device = Device(device)
    array = device.put(data if hasattr(data, "dtype") else numpy.asarray(data))
    array = array.astype(dtype or _default_dtype(array), copy=True)
    if requires_grad and not _is_floating(array.dtype):
        raise TypeError(f"only floating tensors can require grad, not {array.dtype}")
    return Tensor(array, requires_grad=requires_grad)

