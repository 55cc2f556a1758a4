"""Differentiable ops: each a Function whose forward and backward call a kernel.

Each op checks its arguments, keeps what its backward needs, and runs the active kernel
set's kernel (minisft.kernels: `reference`, plain formulas, or `fast`). The kernel set is
chosen at forward time and the same set runs the backward. Shapes follow torch: `x` is
(..., features) unless said otherwise.
"""
import math

import numpy

from minisft import kernels
from minisft.engine import amp, random
from minisft.engine.backend import device_of, get_array_module, read_back
from minisft.engine.gather import gather  # noqa: F401 (torch.gather, here for F.gather)
from minisft.engine.ops import in_place_target, unbroadcast
from minisft.engine.tensor import Function, Tensor, array_of


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


def shaped(a, shape):
    """`a` in `shape`: `a` itself where it has that shape already. A reshape would be a view,
    which the engine must copy before it becomes a leaf's .grad."""
    return a if a.shape == tuple(shape) else a.reshape(shape)


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
        return (None if gx is None else shaped(gx, self.shape), gw, gb)[:len(self.needs_input_grad)]


def linear(x, weight, bias=None):
    """x @ weight.T + bias. x: (..., in), weight: (out, in), bias: (out,) -> (..., out)."""
    return _Linear.apply(x, weight) if bias is None else _Linear.apply(x, weight, bias)


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
    Saved for backward: what the kernel's forward returned, (q, k, v, P), and the dropout
    mask (the dropped-out probabilities are remade rather than kept: a (..., L, L) array per
    layer). Subclasses lay out the inputs and outputs; minisft.lean.attention's block
    attention replaces attend and attend_backward.
    """

    def prepare(self, q, k, bias, scale, dropout_p):
        """Keep the scores' shape, the kernel set and the scales; returns bias broadcast to
        the scores (or None)."""
        self.scores_shape = q.shape[:-1] + (k.shape[-2],)
        self.kernels = kernels.for_array(q)
        self.scale, self.dropout_scale = scale, 1 / (1 - dropout_p)
        return None if bias is None else get_array_module(q).broadcast_to(bias, self.scores_shape)

    def attend(self, q, k, v, bias, out, *, scale, dropout_p, keep_probs):
        """Fill `out` (batch..., Lq, dv) with the context of q, k, v (batch..., L, d) and
        bias (broadcasting to the scores), keeping what backward needs."""
        bias = self.prepare(q, k, bias, scale, dropout_p)
        keep = random.keep_mask(self.scores_shape, dropout_p, device_of(q)) if dropout_p else None
        saved = self.kernels.attention_forward(q, k, v, bias, keep, scale, self.dropout_scale, out)
        self.probs = saved[-1] if keep_probs else None
        self.save_for_backward(saved, keep)

    def attend_backward(self, g, gq, gk, gv, g_scores):
        """Fill the gradients given (None: not needed) from g, the context's gradient."""
        saved, keep = self.take_saved()
        self.kernels.attention_backward(g, saved, keep, self.scale, self.dropout_scale, gq, gk, gv, g_scores)


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
        self.layouts = [(a.shape, _axis_order(a), a.dtype) for a in (q, k, v)]
        out = _empty_in_order(xp, batch + (q.shape[-2], v.shape[-1]), self.layouts[0][1], q.dtype)
        self.attend(q, k, v, bias, out, scale=scale, dropout_p=dropout_p, keep_probs=keep_probs)
        if self.unbatched and self.probs is not None:
            self.probs = self.probs[0]
        return out[0] if self.unbatched else out

    def backward(self, g):
        xp = get_array_module(g)
        needs = list(self.needs_input_grad) + [False] * (4 - len(self.needs_input_grad))
        gq, gk, gv = (_empty_in_order(xp, shape, order, dtype) if need else None
                      for (shape, order, dtype), need in zip(self.layouts, needs))
        g_bias = xp.empty(self.scores_shape, dtype=g.dtype) if needs[3] else None
        self.attend_backward(g[None] if self.unbatched else g, gq, gk, gv, g_bias)
        grads = [None if grad is None else unbroadcast(grad, shape)
                 for grad, shape in zip((gq, gk, gv, g_bias), self.input_shapes)]
        if self.unbatched:
            grads[:3] = [None if grad is None else grad[0] for grad in grads[:3]]
        return tuple(grads[:len(self.needs_input_grad)])


def with_weights(fn, context, need_weights):
    """An attention op's result: the context, and fn's probabilities as a Tensor too when asked."""
    return (context, Tensor(fn.probs)) if need_weights else context


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, scale=None,
                                 need_weights=False):
    """softmax(query key^T scale + attn_mask) value, dropout on the probabilities, over
    (batch..., L, d) query/key/value (scale defaults to 1 / sqrt(d)); attn_mask is added to
    the scores (a float bias broadcasting to (batch..., L, L), e.g. the dtype's minimum at
    padding). Returns the (batch..., L, d) context, and the probabilities too with
    need_weights."""
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    fn = _Attention()
    inputs = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
    context = fn(*inputs, scale=scale, dropout_p=dropout_p, keep_probs=need_weights)
    return with_weights(fn, context, need_weights)



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
        return (shaped(gx, self.shape),) + tuple(shaped(grad, self.params_shape) if need else None
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


def cross_entropy(input, target, ignore_index=-100, label_smoothing=0.0, reduction="mean", weight=None):
    """Softmax cross-entropy. input: (N, C) logits, target: (N,) class indices, weight: (C,)
    class weights or None.

    With reduction="mean" the sum is divided by the number of targets not equal to
    ignore_index, as torch does (nan when every target is ignored); with weights, by the sum
    of the targets' weights, and label smoothing's term weighs each class c by weight[c], as
    torch's CrossEntropyLoss(weight=...) does.
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
    if weight is not None:
        return _weighted_cross_entropy(input, target_data, valid, weight, label_smoothing, reduction)
    loss = _CrossEntropy.apply(input, target, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return _reduce(loss, reduction, (count or float("nan")) if reduction == "mean" else None)


def _weighted_cross_entropy(logits, target, valid, weight, label_smoothing, reduction):
    """Per example: loss = -sum_c m[c] log p[c], m = (1 - s) w[target] onehot(target) + s w / C
    (0 for ignored rows), made of log_softmax and a product with the constant m; the mean
    divides by the sum of w[target] over the rows kept."""
    xp = get_array_module(logits.data)
    put = logits.device.put
    w, target, valid = put(array_of(weight)).astype(logits.dtype), put(target), put(valid)  # w: data, not a parameter
    classes = logits.shape[1]
    if tuple(w.shape) != (classes,):
        raise ValueError(f"cross_entropy: weight has shape {tuple(w.shape)}; expected ({classes},), one per class")
    safe = xp.where(valid, target, 0)
    onehot = (safe[:, None] == xp.arange(classes)[None, :]) & valid[:, None]
    m = onehot * ((1 - label_smoothing) * w[safe])[:, None]
    if label_smoothing:
        m = m + valid[:, None] * (w * (label_smoothing / classes))[None, :]
    loss = -(log_softmax(logits, dim=-1) * Tensor(m.astype(logits.dtype))).sum(-1)
    return _reduce(loss, reduction, (w[safe] * valid).sum() if reduction == "mean" else None)


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
