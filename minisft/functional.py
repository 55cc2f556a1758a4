"""Differentiable ops: each a Function whose forward and backward call a kernel.

Each op checks its arguments, keeps what its backward needs, and runs the active kernel
set's kernel (minisft.kernels: `reference`, plain formulas, or `fast`). The kernel set is
chosen at forward time and the same set runs the backward. Shapes follow torch: `x` is
(..., features) unless said otherwise.
"""
import contextlib
import math
import threading

import numpy

from minisft import amp, kernels, random
from minisft.backend import device_of, get_array_module, read_back
from minisft.ops import in_place_target, unbroadcast
from minisft.runtime import get_num_threads
from minisft.tensor import Function, Tensor, array_of


def _float_kernels(op, x):
    if x.dtype not in (numpy.float32, numpy.float64):
        raise TypeError(f"{op}: float32 or float64 arrays only, not {x.dtype}")
    return kernels.for_array(x)


def erf(x):
    """The error function of a float32 or float64 array, elementwise, in its own dtype
    (an array function, not differentiable: see gelu)."""
    return _float_kernels("erf", x).erf(x)


def normal_cdf(x):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2 of a float32 or float64 array, in its dtype."""
    return _float_kernels("normal_cdf", x).normal_cdf(x)


# --- activations -----------------------------------------------------------------------
class _GELU(Function):
    """Exact: y = x Phi(x), dy/dx = Phi(x) + x phi(x).
    tanh: y = x (1 + tanh u) / 2, u = sqrt(2/pi) (x + 0.044715 x^3),
          dy/dx = (1 + tanh u) / 2 + x (1 - tanh^2 u) u' / 2.
    Forward keeps dy/dx itself, made from the same Phi or tanh: one (..., I) array per layer
    for backward instead of x and Phi(x). In place, y is written over x's array once dy/dx
    is made: a (..., I) array fewer at the forward's peak."""

    def forward(self, x, approximate, inplace):
        kernel = getattr(kernels.for_array(x), "gelu_tanh_forward" if approximate == "tanh" else "gelu_forward")
        into = _own_array(x) if inplace else None
        if self.recording:
            y, slope = kernel(x, slope=True, into=into)
            self.save_for_backward(slope)
        else:
            y = kernel(x, into=into)
        return _written_into(x, y) if inplace else y

    def backward(self, g):
        (slope,) = self.take_saved()
        if self.last_backward:  # the slope is this node's alone: the gradient is made in it
            slope *= g
            return (slope,)
        return (g * slope,)


def _own_array(x):
    """x itself where a kernel can write into it (C-contiguous), else None (a new array)."""
    return x if x.flags.c_contiguous else None


def _written_into(x, y):
    """An in-place op's result: x, holding y's values."""
    if y is not x:
        x[...] = y
    return x


def gelu(x, approximate="none", inplace=False):
    """GELU: x * Phi(x) with the exact erf ("none", BERT's "gelu"), or the "tanh" form.
    inplace: the result is written over x's array (x's values are lost), for a product that
    nothing else holds, such as a feed-forward layer's first Linear's."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', not {approximate!r}")
    return _GELU.apply(in_place_target(x, "gelu") if inplace else x, approximate=approximate, inplace=inplace)


class _ReLU(Function):
    """y = max(x, 0), dy/dx = [x > 0]."""

    def forward(self, x, inplace):
        self.save_for_backward(x > 0)
        return get_array_module(x).maximum(x, x.dtype.type(0), out=x if inplace else None)

    def backward(self, g):
        (positive,) = self.saved
        return (g * positive,)


def relu(x, inplace=False):
    """max(x, 0); inplace: written over x's array, as gelu's."""
    return _ReLU.apply(in_place_target(x, "relu") if inplace else x, inplace=inplace)


def tanh(x):
    return x.tanh()


# --- linear ----------------------------------------------------------------------------
class _Linear(Function):
    """y = x W^T + b over all leading dims as one (rows, in) matrix;
    dx = g W, dW = g^T x, db = sum of g over rows."""

    def forward(self, x, weight, bias=None):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: input shape {tuple(x.shape)} does not match weight shape "
                             f"{tuple(weight.shape)}: the input's last dim must be {weight.shape[1]}")
        self.kernels = kernels.for_array(x)
        x2 = x.reshape(-1, x.shape[-1])
        self.dtype, self.half = x.dtype, amp.compute_dtype()  # autocast: products in float16
        if self.half is not None:
            x2, weight = x2.astype(self.half), weight.astype(self.half)
        needs_x, needs_weight = self.needs_input_grad[:2]
        self.save_for_backward(x2 if needs_weight else None, weight if needs_x else None)  # dW = g^T x, dx = g W
        self.shape = x.shape
        y = self.kernels.linear_forward(x2, weight, None if self.half is not None else bias)
        if self.half is not None:
            y = y.astype(self.dtype)
            if bias is not None:
                y += bias
        return y.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, g):
        x2, weight = self.take_saved()
        needs = tuple(self.needs_input_grad) + (False,) * (3 - len(self.needs_input_grad))
        g = g.reshape(-1, g.shape[-1])
        product_g = g if self.half is None else g.astype(self.half)  # autocast: products in float16
        # dW first: on the last backward x is then freed before dx, often its size, is made
        _, gw, gb = self.kernels.linear_backward(product_g, x2, None, (False, needs[1], needs[2] and self.half is None))
        del x2
        gx = self.kernels.linear_backward(product_g, None, weight, (needs[0], False, False))[0]
        if self.half is not None:  # the bias's sum and every result in float32
            gx, gw = (None if a is None else a.astype(self.dtype) for a in (gx, gw))
            gb = self.kernels.linear_backward(g, None, None, (False, False, True))[2] if needs[2] else None
        return (None if gx is None else gx.reshape(self.shape), gw, gb)[:len(self.needs_input_grad)]


def linear(x, weight, bias=None):
    """x @ weight.T + bias. x: (..., in), weight: (out, in), bias: (out,) -> (..., out)."""
    return _Linear.apply(x, weight) if bias is None else _Linear.apply(x, weight, bias)


# --- feed-forward: Linear -> GELU -> Linear in one node ------------------------------------
FEED_FORWARD_CHUNK = 1024  # rows per chunk: a multiple of the fast kernels' GEMM tile, so the same products


class _FeedForward(Function):
    """out = gelu(x W1^T + b1) W2^T + b2, a transformer layer's feed-forward, as one node, so
    that its (rows, inner) arrays are its own and live no longer than they must. Kept for
    backward: GELU's slope, y = gelu(h) when W2 needs its gradient, x when W1 does; or, with
    `remake` (lean_activations) where both y and the slope would be kept, the pre-activation
    h alone, from which backward remakes them chunk by chunk.
    - Forward: where y is kept, it is made over h (GELU in place); where not (W2 frozen, as
      under LoRA, or remade), the rows go in chunks and y is chunk-sized.
    - Backward: the gradient at h, (g W2) * slope, is made chunk by chunk inside the slope
      (or inside h).
    No (rows, inner) array beside what is kept; the same products and results as linear,
    gelu and linear, except that a remade y gives W2's gradient as a sum over chunks of rows
    (within float32 rounding of the one product's)."""

    def forward(self, x, w1, b1, w2, b2, *, approximate, remake):
        self.kernels, self.shape = kernels.for_array(x), x.shape
        self.gelu = getattr(self.kernels, "gelu_tanh_forward" if approximate == "tanh" else "gelu_forward")
        x2 = x.reshape(-1, x.shape[-1])
        needs = self.needs_input_grad  # x, W1, b1, W2, b2
        keep_slope, keep_y = self.recording and any(needs[:3]), self.recording and needs[3]
        keep_h = remake and keep_slope and keep_y  # one (rows, inner) array where two would be kept
        xp = get_array_module(x)
        slope = xp.empty((len(x2), w1.shape[0]), dtype=x2.dtype) if keep_slope and not keep_h else None
        h = self.kernels.linear_forward(x2, w1, b1) if keep_h else None
        if keep_y and not keep_h:
            y = _gelu_over(self.gelu, self.kernels.linear_forward(x2, w1, b1), slope)
            out = self.kernels.linear_forward(y, w2, b2)
        else:
            y, out = None, xp.empty((len(x2), w2.shape[0]), dtype=x2.dtype)
            for rows in _chunks(len(x2)):
                y_rows = (self.gelu(h[rows]) if keep_h else
                          _gelu_over(self.gelu, self.kernels.linear_forward(x2[rows], w1, b1),
                                     None if slope is None else slope[rows]))
                out[rows] = self.kernels.linear_forward(y_rows, w2, b2)
                del y_rows  # before the next chunk's is made
        self.save_for_backward(x2 if needs[1] else None, w1 if needs[0] else None, w2 if keep_slope else None, y,
                               slope, h)
        return out.reshape(*x.shape[:-1], w2.shape[0])

    def backward(self, g):
        x2, w1, w2, y, slope, h = self.take_saved()
        needs = self.needs_input_grad
        g = g.reshape(-1, g.shape[-1])
        if h is not None:
            return self._backward_remaking(g, x2, w1, w2, h)
        gw2, gb2 = self.kernels.linear_backward(g, y, None, (False, needs[3], needs[4]))[1:]
        del y
        if slope is None:
            return None, None, None, gw2, gb2
        gh = slope if self.last_backward else get_array_module(g).empty_like(slope)  # the slope is this node's alone
        for rows in _chunks(len(g)):
            self._gradient_at_h(g[rows], w2, slope[rows], gh[rows])
        del slope
        return self._backward_first(gh, x2, w1) + (gw2, gb2)

    def _backward_remaking(self, g, x2, w1, w2, h):
        """backward from the kept pre-activation: y and the slope remade chunk by chunk, W2's
        gradient summed over the chunks, the gradient at h written inside h."""
        gb2 = self.kernels.linear_backward(g, None, None, (False, False, True))[2] if self.needs_input_grad[4] else None
        gw2, gh = None, h if self.last_backward else get_array_module(h).empty_like(h)
        for rows in _chunks(len(g)):
            y_rows, slope_rows = self.gelu(h[rows], slope=True)
            part = self.kernels.linear_backward(g[rows], y_rows, None, (False, True, False))[1]
            if gw2 is None:
                gw2 = part
            else:
                gw2 += part
            self._gradient_at_h(g[rows], w2, slope_rows, gh[rows])
            del y_rows, slope_rows  # before the next chunk's are made
        return self._backward_first(gh, x2, w1) + (gw2, gb2)

    def _gradient_at_h(self, g_rows, w2, slope_rows, into):
        """(g W2) * slope for a chunk of rows, written into `into`."""
        product = self.kernels.linear_backward(g_rows, None, w2, (True, False, False))[0]
        get_array_module(product).multiply(product, slope_rows, out=into)

    def _backward_first(self, gh, x2, w1):
        """(gx, gW1, gb1) from the gradient at h."""
        gx, gw1, gb1 = self.kernels.linear_backward(gh, x2, w1, self.needs_input_grad[:3])
        return None if gx is None else gx.reshape(self.shape), gw1, gb1


_lean = threading.local()


@contextlib.contextmanager
def lean_activations(enabled=True):
    """Inside, ops that can remake an activation in backward keep less for it: feed_forward
    keeps its pre-activation alone and remakes GELU's output and slope in backward (GELU's
    work twice). For gradient checkpointing, which trades compute for memory. Per thread."""
    previous = getattr(_lean, "enabled", False)
    _lean.enabled = enabled
    try:
        yield
    finally:
        _lean.enabled = previous


def _gelu_over(kernel, h, slope):
    """GELU of h written over h; its slope written into `slope` when given."""
    return kernel(h, into=h) if slope is None else kernel(h, slope=True, into=h, slope_into=slope)[0]


def _chunks(rows):
    return _slices(rows, FEED_FORWARD_CHUNK)


def _slices(length, size):
    """range(length) in slices of `size` (the last one may be shorter)."""
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def feed_forward(x, w1, b1, w2, b2, approximate="none"):
    """gelu(x W1^T + b1) W2^T + b2 (approximate: GELU's form, as in gelu) as one node, which
    keeps less than linear, gelu and linear do (see _FeedForward), with the same results;
    under lean_activations, less again (its pre-activation alone).
    x: (..., in), w1: (inner, in), b1: (inner,), w2: (out, inner), b2: (out,) -> (..., out)."""
    if x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"feed_forward: input shape {tuple(x.shape)}, w1 {tuple(w1.shape)} and w2 "
                         f"{tuple(w2.shape)} do not chain: need (..., in), (inner, in), (out, inner)")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"feed_forward: approximate must be 'none' or 'tanh', not {approximate!r}")
    return _FeedForward.apply(x, w1, b1, w2, b2, approximate=approximate, remake=getattr(_lean, "enabled", False))


# --- softmax family ---------------------------------------------------------------------
class _LastAxisOp(Function):
    """An op along one axis, run by kernels along the last: other axes are moved there and
    back as views."""

    def forward(self, x, dim):
        self.kernels, self.dim = kernels.for_array(x), dim
        y = self.kernel_forward(self.kernels, get_array_module(x).moveaxis(x, dim, -1))
        self.save_for_backward(y)
        return get_array_module(x).moveaxis(y, -1, dim)

    def backward(self, g):
        (y,) = self.saved
        xp = get_array_module(g)
        return (xp.moveaxis(self.kernel_backward(self.kernels, y, xp.moveaxis(g, self.dim, -1)), -1, self.dim),)


class _Softmax(_LastAxisOp):
    """y_i = exp(x_i) / sum_j exp(x_j), dx_i = y_i (g_i - sum_j g_j y_j)."""
    kernel_forward = staticmethod(lambda k, x: k.softmax_forward(x))
    kernel_backward = staticmethod(lambda k, y, g: k.softmax_backward(y, g))


class _LogSoftmax(_LastAxisOp):
    """y_i = x_i - log sum_j exp(x_j), dx_i = g_i - exp(y_i) sum_j g_j."""
    kernel_forward = staticmethod(lambda k, x: k.log_softmax_forward(x))
    kernel_backward = staticmethod(lambda k, y, g: k.log_softmax_backward(y, g))


def softmax(x, dim=-1):
    return _Softmax.apply(x, dim=dim)


def log_softmax(x, dim=-1):
    return _LogSoftmax.apply(x, dim=dim)


# --- attention ----------------------------------------------------------------------------
def _axis_order(a):
    """a's axes from the outermost in memory to the innermost; C order for arrays with a
    repeated (0-stride) axis."""
    if 0 in a.strides:
        return tuple(range(a.ndim))
    return tuple(sorted(range(a.ndim), key=lambda axis: -a.strides[axis]))


def _empty_in_order(xp, shape, order, dtype):
    """An empty array of `shape` whose axes lie in memory in `order` (see _axis_order)."""
    return xp.empty([shape[axis] for axis in order], dtype=dtype).transpose(tuple(numpy.argsort(order).tolist()))


class _AttentionBase(Function):
    """out = dropout(softmax(q k^T scale + bias)) v on (batch..., L, d) arrays, with
    P = softmax(S), S = q k^T scale + bias, D = P * keep / (1 - p):
        dv = D^T g,  dD = g v^T,  dP = dD * keep / (1 - p),
        dS = P * (dP - rowsum(dP * P)),  dq = dS k scale,  dk = dS^T q scale,  dbias = dS.
    Backward keeps only what the kernel's forward returned and the dropout mask (the
    dropped-out probabilities are remade rather than kept: a (..., L, L) array per layer).
    Subclasses lay out the inputs and outputs.
    """

    def attend(self, q, k, v, bias, out, *, scale, dropout_p, keep_probs):
        """Fill `out` (batch..., Lq, dv) with the context of q, k, v (batch..., L, d) and
        bias (broadcasting to the scores), keeping what backward needs. From BLOCKED_FROM
        keys on (and when the probabilities are not asked for and bias needs no gradient),
        query rows go in blocks of QUERY_BLOCK and nothing of size (..., Lq, Lk) is kept:
        backward recomputes each block's probabilities (and its dropout mask, from the random
        state it was drawn with), as flash attention does. On a GPU attention stays whole:
        CuPy's generator state cannot be read back, so a mask could not be remade."""
        xp = get_array_module(q)
        scores_shape = q.shape[:-1] + (k.shape[-2],)
        bias = None if bias is None else xp.broadcast_to(bias, scores_shape)
        self.kernels = kernels.for_array(q)
        self.scale, self.dropout_scale, self.dropout_p = scale, 1 / (1 - dropout_p), dropout_p
        self.blocks = None
        bias_grad = len(self.needs_input_grad) > 1 and self.needs_input_grad[-1] and bias is not None
        if k.shape[-2] >= BLOCKED_FROM and not keep_probs and not bias_grad and xp is numpy:
            self.probs, self.blocks = None, []
            for rows in _query_blocks(q.shape[-2]):
                self.blocks.append((rows, random.get_rng_state() if dropout_p else None))
                keep = self._block_mask(q, k, rows)
                for batch in _batch_chunks(len(q)):  # what a block makes is then chunk-sized
                    self._attend_block(q, k, v, bias, keep, rows, out[batch, ..., rows, :], items=batch)
            self.save_for_backward((q, k, v, bias), None)
            return
        keep = random.keep_mask(scores_shape, dropout_p, device_of(q)) if dropout_p else None
        saved = self.kernels.attention_forward(q, k, v, bias, keep, scale, self.dropout_scale, out)
        self.probs = saved[-1] if keep_probs else None
        self.save_for_backward(saved, keep)

    def _block_mask(self, q, k, rows):
        """The dropout mask of a block of query rows, drawn from the random state as it is."""
        if not self.dropout_p:
            return None
        return random.keep_mask(q.shape[:-2] + (rows.stop - rows.start, k.shape[-2]), self.dropout_p, device_of(q))

    def _attend_block(self, q, k, v, bias, keep, rows, out, items=slice(None)):
        """The context of query rows `rows` of batch items `items` (of the first axis) into
        `out` (items, ..., len(rows), dv); returns what the kernel keeps for backward."""
        return self.kernels.attention_forward(q[items, ..., rows, :], k[items], v[items],
                                              None if bias is None else bias[items, ..., rows, :],
                                              None if keep is None else keep[items],
                                              self.scale, self.dropout_scale, out)

    def attend_backward(self, g, gq, gk, gv, g_scores):
        """Fill the gradients given (None: not needed) from g, the context's gradient."""
        if self.blocks is None:
            saved, keep = self.saved
            self.kernels.attention_backward(g, saved, keep, self.scale, self.dropout_scale, gq, gk, gv, g_scores)
            return
        (q, k, v, bias), _ = self.saved
        xp = get_array_module(q)
        resumed = random.get_rng_state()
        # a block's probabilities are remade for a few batch items at a time, one per thread;
        # the first block writes gk and gv, each later one adds its share from part_k, part_v
        batches, block_rows = _batch_chunks(len(q)), self.blocks[0][0].stop
        chunk = batches[0].stop
        scratch = xp.empty((chunk,) + g.shape[1:-2] + (block_rows, g.shape[-1]), dtype=g.dtype)  # their context
        part_k, part_v = (None if a is None or len(self.blocks) == 1 else xp.empty((chunk,) + a.shape[1:], dtype=a.dtype)
                          for a in (gk, gv))
        try:
            for index, (rows, state) in enumerate(self.blocks):
                if state is not None:
                    random.set_rng_state(state)
                keep = self._block_mask(q, k, rows)
                for batch in batches:
                    n = batch.stop - batch.start
                    saved = self._attend_block(q, k, v, bias, keep, rows, items=batch,
                                               out=scratch[:n, ..., :rows.stop - rows.start, :])
                    into = (gk, gv) if index == 0 else (part_k, part_v)
                    into_k, into_v = (None if a is None else a[batch if index == 0 else slice(n)] for a in into)
                    self.kernels.attention_backward(g[batch, ..., rows, :], saved,
                                                    None if keep is None else keep[batch], self.scale,
                                                    self.dropout_scale,
                                                    None if gq is None else gq[batch, ..., rows, :], into_k, into_v, None)
                    del saved  # freed before the next items' are made
                    if index:
                        for total, part in ((gk, into_k), (gv, into_v)):
                            if total is not None:
                                total[batch] += part
                del keep
        finally:
            random.set_rng_state(resumed)


BLOCKED_FROM, QUERY_BLOCK = 128, 128  # block attention from 128 keys on, 128 query rows at a time
BLOCKED_FROM_DEFAULT = BLOCKED_FROM


def _batch_chunks(items):
    """The batch in slices of as many items as threads: a block's work, one item per thread."""
    return _slices(items, min(items, get_num_threads()))


def _query_blocks(length):
    return _slices(length, QUERY_BLOCK)


class _Attention(_AttentionBase):
    """Attention on separate (batch..., L, d) q, k, v, broadcasting their batch dims. The
    context and the gradients are laid out in memory as the inputs are: heads that are a
    permuted view of (B, L, H) get a context and gradients that permute back as views."""

    def forward(self, q, k, v, bias=None, *, scale, dropout_p, keep_probs):
        xp = get_array_module(q)
        self.unbatched = q.ndim == 2
        if self.unbatched:
            q, k, v = q[None], k[None], v[None]
        self.input_shapes = [a.shape for a in (q, k, v)] + [None if bias is None else bias.shape]
        batch = numpy.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        q, k, v = (xp.broadcast_to(a, batch + a.shape[-2:]) for a in (q, k, v))
        self.orders = [_axis_order(a) for a in (q, k, v)]
        out = _empty_in_order(xp, batch + (q.shape[-2], v.shape[-1]), self.orders[0], q.dtype)
        self.attend(q, k, v, bias, out, scale=scale, dropout_p=dropout_p, keep_probs=keep_probs)
        if self.unbatched and self.probs is not None:
            self.probs = self.probs[0]
        return out[0] if self.unbatched else out

    def backward(self, g):
        (q, k, v, probs), _ = self.saved  # blocked: (q, k, v, bias), and no bias gradient
        xp = get_array_module(g)
        needs = list(self.needs_input_grad) + [False] * (4 - len(self.needs_input_grad))
        gq, gk, gv = (_empty_in_order(xp, a.shape, order, a.dtype) if need else None
                      for a, order, need in zip((q, k, v), self.orders, needs))
        g_bias = xp.empty_like(probs) if needs[3] else None
        self.attend_backward(g[None] if self.unbatched else g, gq, gk, gv, g_bias)
        grads = [None if grad is None else unbroadcast(grad, shape)
                 for grad, shape in zip((gq, gk, gv, g_bias), self.input_shapes)]
        if self.unbatched:
            grads[:3] = [None if grad is None else grad[0] for grad in grads[:3]]
        return tuple(grads[:len(self.needs_input_grad)])


class _PackedAttention(_AttentionBase):
    """Multi-head self-attention on packed projections: qkv (B, L, 3 * H), the query, key
    and value heads side by side, -> context (B, L, H). The heads are views of qkv, the
    context is made in (B, L, heads, d) memory and qkv's gradient in one (B, L, 3H) array,
    so that a fused QKV projection's backward is one matrix product."""

    def forward(self, qkv, bias=None, *, num_heads, scale, dropout_p, keep_probs):
        xp = get_array_module(qkv)
        batch, length, packed = qkv.shape
        if packed % (3 * num_heads):
            raise ValueError(f"multi_head_attention: qkv's last dim {packed} is not 3 x num_heads "
                             f"({num_heads}) x a head size")
        self.head_shape = (batch, length, num_heads, packed // (3 * num_heads))
        q, k, v = self._heads(qkv.reshape(batch, length, 3, *self.head_shape[2:]))
        out = xp.empty(self.head_shape, dtype=qkv.dtype)
        self.bias_shape = None if bias is None else bias.shape
        scale = 1 / math.sqrt(self.head_shape[-1]) if scale is None else scale
        self.attend(q, k, v, bias, out.transpose(0, 2, 1, 3), scale=scale, dropout_p=dropout_p,
                    keep_probs=keep_probs)
        return out.reshape(batch, length, -1)

    @staticmethod
    def _heads(packed):
        """(B, L, 3, heads, d) -> three (B, heads, L, d) views."""
        return [packed[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]

    def backward(self, g):
        xp = get_array_module(g)
        batch, length, heads, size = self.head_shape
        g_qkv = xp.empty((batch, length, 3, heads, size), dtype=g.dtype)
        needs_bias = len(self.needs_input_grad) > 1 and self.needs_input_grad[1]
        g_bias = xp.empty_like(self.saved[0][-1]) if needs_bias else None
        self.attend_backward(g.reshape(self.head_shape).transpose(0, 2, 1, 3), *self._heads(g_qkv), g_bias)
        grads = (g_qkv.reshape(batch, length, -1), None if g_bias is None else unbroadcast(g_bias, self.bias_shape))
        return grads[:len(self.needs_input_grad)]


def _with_weights(fn, context, need_weights):
    return (context, Tensor(fn.probs)) if need_weights else context


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, scale=None,
                                 need_weights=False):
    """Attention over (batch..., L, d) query/key/value; attn_mask is added to the scores
    (a float bias broadcasting to (batch..., L, L), e.g. the dtype's minimum at padding).
    Returns the (batch..., L, d) context, and the probabilities too with need_weights."""
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    fn = _Attention()
    inputs = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
    context = fn(*inputs, scale=scale, dropout_p=dropout_p, keep_probs=need_weights)
    return _with_weights(fn, context, need_weights)


def multi_head_attention(qkv, num_heads, attn_mask=None, dropout_p=0.0, scale=None, need_weights=False):
    """Self-attention of `num_heads` heads on packed projections qkv (B, L, 3 * H) (query,
    key and value side by side, as one linear layer over stacked weights makes them);
    attn_mask as in scaled_dot_product_attention, broadcasting to (B, heads, L, L). Returns
    the (B, L, H) context (heads concatenated), and the (B, heads, L, L) probabilities too
    with need_weights. The same as scaled_dot_product_attention on the split, permuted heads,
    without the copies."""
    fn = _PackedAttention()
    inputs = (qkv,) if attn_mask is None else (qkv, attn_mask)
    context = fn(*inputs, num_heads=num_heads, scale=scale, dropout_p=dropout_p, keep_probs=need_weights)
    return _with_weights(fn, context, need_weights)


# --- normalisation and regularisation ---------------------------------------------------
class _LayerNorm(Function):
    """y = xhat w + b with xhat = (x - mean) / sqrt(var + eps) over the last `features`
    elements, rows = everything before; with dxhat = g w,
        dx = (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) / sqrt(var + eps),
        dw = sum over rows of g xhat,  db = sum over rows of g."""

    def forward(self, x, weight=None, bias=None, *, features, eps):
        self.kernels, self.shape = kernels.for_array(x), x.shape
        self.params_shape = None if weight is None else weight.shape
        weight, bias = (None if p is None else p.reshape(-1) for p in (weight, bias))
        y, xhat, rstd = self.kernels.layer_norm_forward(x.reshape(-1, features), weight, bias, eps)
        self.save_for_backward(xhat, rstd, weight)
        return y.reshape(x.shape)

    def backward(self, g):
        xhat, rstd, weight = self.saved
        needs = self.needs_input_grad
        gx, *params = self.kernels.layer_norm_backward(g.reshape(xhat.shape), xhat, rstd, weight,
                                                       any(needs[1:]))
        return (gx.reshape(self.shape),) + tuple(grad.reshape(self.params_shape) if need else None
                                                 for grad, need in zip(params, needs[1:]))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Normalise over the trailing `normalized_shape` dims, then scale and shift."""
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[-len(normalized_shape):]) != normalized_shape:
        raise ValueError(f"layer_norm: input shape {tuple(x.shape)} does not end with "
                         f"normalized_shape {normalized_shape}")
    params = [p for p in (weight, bias) if p is not None]
    if weight is None and bias is not None:
        raise ValueError("layer_norm: a bias without a weight is not supported")
    return _LayerNorm.apply(x, *params, features=math.prod(normalized_shape), eps=eps)


class _Dropout(Function):
    """y = x * keep / (1 - p), dx = g * keep / (1 - p), keep ~ Bernoulli(1 - p)."""

    def forward(self, x, p, inplace):
        self.kernels = kernels.for_array(x)
        keep = random.keep_mask(x.shape, p, device_of(x))
        self.scale = 1 / (1 - p)
        self.save_for_backward(keep)
        return self.kernels.dropout(x, keep, self.scale, into=x if inplace else None)

    def backward(self, g):
        (keep,) = self.saved
        return (self.kernels.dropout(g, keep, self.scale),)


def dropout(x, p=0.5, training=True, inplace=False):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).
    inplace: written over x's array, as gelu's."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout: p must be in [0, 1], not {p}")
    if not training or p == 0:
        return x
    if p == 1:
        return x * 0
    return _Dropout.apply(in_place_target(x, "dropout") if inplace else x, p=p, inplace=inplace)


# --- embedding --------------------------------------------------------------------------
class _Embedding(Function):
    """y[...] = W[ids[...]], dW[i] = sum of g's rows whose id is i (none for padding_idx)."""

    def forward(self, weight, ids, padding_idx):
        if ids.dtype.kind not in "iu":
            raise TypeError(f"embedding: indices must be integers, not {ids.dtype}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
            raise IndexError(f"embedding: index {int(ids.max()) if int(ids.max()) >= weight.shape[0] else int(ids.min())} "
                             f"out of range for a table of {weight.shape[0]} rows")
        self.kernels = kernels.for_array(weight)
        self.save_for_backward(ids)
        self.weight_shape, self.padding_idx = weight.shape, padding_idx
        return weight[ids]

    def backward(self, g):
        (ids,) = self.saved
        grad = self.kernels.embedding_backward(ids.reshape(-1), g.reshape(-1, self.weight_shape[1]),
                                               self.weight_shape[0], self.padding_idx)
        return grad, None


def embedding(input, weight, padding_idx=None):
    """Rows of `weight` (num_embeddings, dim) picked by integer `input` (...) -> (..., dim)."""
    return _Embedding.apply(weight, input, padding_idx=padding_idx)


# --- losses -----------------------------------------------------------------------------
def _reduce(loss, reduction, count=None):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / count if count is not None else loss.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")


class _CrossEntropy(Function):
    """Per example: loss = -(1 - s) log p[target] - s mean_c log p[c], p = softmax(logits),
    dlogits = (p - (1 - s) onehot(target) - s / C) g; ignored rows are 0."""

    def forward(self, logits, target, ignore_index, label_smoothing):
        xp = get_array_module(logits)
        valid = target != ignore_index
        safe_target = xp.where(valid, target, 0)
        self.kernels, self.label_smoothing = kernels.for_array(logits), label_smoothing
        loss, logp = self.kernels.cross_entropy_forward(logits, safe_target, valid, label_smoothing)
        self.save_for_backward(logp, safe_target, valid)
        return loss

    def backward(self, g):
        logp, target, valid = self.saved
        return self.kernels.cross_entropy_backward(logp, target, valid, g, self.label_smoothing), None


def cross_entropy(input, target, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Softmax cross-entropy. input: (N, C) logits, target: (N,) class indices.

    With reduction="mean" the sum is divided by the number of targets not equal to
    ignore_index, as torch does (nan when every target is ignored).
    """
    if input.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, C), got {tuple(input.shape)}; "
                         "reshape token logits to (-1, C) and targets to (-1,)")
    target_data = array_of(target)
    if tuple(target_data.shape) != (input.shape[0],):
        raise ValueError(f"cross_entropy: target shape {tuple(target_data.shape)} does not match "
                         f"logits shape {tuple(input.shape)}; expected ({input.shape[0]},)")
    valid = target_data != ignore_index
    out_of_range = valid & ((target_data < 0) | (target_data >= input.shape[1]))
    count, wrong = (int(v) for v in read_back(valid.sum(), out_of_range.sum()))  # one read from a GPU
    if wrong:
        raise IndexError(f"cross_entropy: target values must be in [0, {input.shape[1]}) or "
                         f"ignore_index={ignore_index}")
    loss = _CrossEntropy.apply(input, target, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return _reduce(loss, reduction, (count or float("nan")) if reduction == "mean" else None)


def _check_same_shape(op, input, target):
    if tuple(input.shape) != tuple(target.shape):
        raise ValueError(f"{op}: input shape {tuple(input.shape)} and target shape "
                         f"{tuple(target.shape)} differ")


def mse_loss(input, target, reduction="mean"):
    """Mean squared error between same-shaped input and target."""
    _check_same_shape("mse_loss", input, target)
    diff = input - target
    return _reduce(diff * diff, reduction)


class _BCEWithLogits(Function):
    """Per element: loss = max(x, 0) - x t + log(1 + exp(-|x|)) (stable for any x),
    dloss/dx = sigmoid(x) - t, dloss/dt = -x."""

    def forward(self, x, target):
        xp = get_array_module(x)
        cast = x.dtype.type
        self.save_for_backward(x, target)
        return xp.maximum(x, cast(0)) - x * target + xp.log1p(xp.exp(-xp.abs(x)))

    def backward(self, g):
        x, target = self.saved
        xp = get_array_module(x)
        e = xp.exp(-xp.abs(x))  # sigmoid without overflow: 1/(1+e) or e/(1+e)
        sigmoid = xp.where(x >= 0, 1, e) / (1 + e)
        gx = g * (sigmoid - target) if self.needs_input_grad[0] else None
        gt = -g * x if self.needs_input_grad[1] else None
        return gx, gt


def binary_cross_entropy_with_logits(input, target, reduction="mean"):
    """Sigmoid + binary cross-entropy in one stable op; target in [0, 1], same shape."""
    _check_same_shape("binary_cross_entropy_with_logits", input, target)
    return _reduce(_BCEWithLogits.apply(input, target), reduction)
