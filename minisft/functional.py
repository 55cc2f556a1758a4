"""Fused differentiable ops: each one forward/backward pair with a hand-derived backward.

A fused op keeps only the arrays its backward needs and computes the gradient in a few
array expressions, instead of recording a chain of primitive nodes. Shapes follow torch:
`x` is (..., features) unless said otherwise.
"""
import functools
import math

import numpy

from minisft import random
from minisft.backend import device_of, get_array_module, index_add
from minisft.ops import unbroadcast
from minisft.parallel import by_rows
from minisft.tensor import Function, Tensor

# --- erf ---------------------------------------------------------------------------------
# NumPy has no erf. Two evaluations, each fitted once (on first use) to math.erf, which is
# accurate to double precision:
# - float64 (gradient checks need ~1e-15): Chebyshev expansions in two pieces,
#     |x| < 2:       erf(x) = x * P(x^2)
#     2 <= |x| < 6:  erf(x) = sign(x) * (1 - exp(-x^2) * Q(1/x^2) / |x|)
#     |x| >= 6:      erf(x) = sign(x)       (erfc(6) is below half an ulp of 1)
#   max error 4e-15.
# - float32 (the hot path: GELU in every layer): one rational function
#     erf(x) = x * R(x^2),  R = P5 / Q5,  |x| clipped at 3.92 where erf rounds to 1,
#   evaluated in float64 over cache-sized chunks (side by side on the CPU's threads), so
#   that the float32 result is within 6e-8 (half a float32 epsilon) at the cost of ~25
#   array operations. GELU evaluates Phi(x) = (1 + erf(x / sqrt 2)) / 2 the same way, with
#   its constants folded into the coefficients.
_CLIP32 = 3.92
_CHUNK = 1 << 17  # elements per chunk: big enough to amortise a call, small enough for the cache


def _chebyshev_fit(f, lo, hi, degree):
    """Coefficients of the Chebyshev interpolant of f on [lo, hi]."""
    nodes = numpy.cos(numpy.pi * (numpy.arange(degree + 1) + 0.5) / (degree + 1))
    values = [f((lo + hi) / 2 + (hi - lo) / 2 * u) for u in nodes]
    return numpy.polynomial.chebyshev.chebfit(nodes, values, degree), lo, hi


def _erf_over_x(t):
    """erf(x) / x at t = x^2 (its limit 2/sqrt(pi) at 0)."""
    return math.erf(math.sqrt(t)) / math.sqrt(t) if t > 0 else 2 / math.sqrt(math.pi)


@functools.cache
def _erf64_coefficients():
    p = _chebyshev_fit(_erf_over_x, 0.0, 4.0, 18)
    q = _chebyshev_fit(lambda w: math.erfc(w ** -0.5) * math.exp(1 / w) * w ** -0.5, 1 / 36, 1 / 4, 16)
    return p, q


@functools.cache
def _erf32_rational(degree=5, points=2000, iterations=20):
    """(P, Q) power-series coefficients (lowest first, Q[0] = 1) with P/Q ~ erf(x)/x in t = x^2
    on [0, 3.92^2], fitted for relative error by reweighted linear least squares."""
    x = _CLIP32 / 2 * (1 + numpy.cos(numpy.pi * (numpy.arange(points) + 0.5) / points))
    t = x * x
    f = numpy.array([_erf_over_x(v) for v in t])
    powers = numpy.vander(t, degree + 1, increasing=True)
    weight = 1 / f
    for _ in range(iterations):
        # P(t) - f * (Q(t) - 1) = f, weighted by 1 / (f * Q_previous(t))
        system = numpy.hstack([powers, -f[:, None] * powers[:, 1:]]) * weight[:, None]
        c = numpy.linalg.lstsq(system, f * weight, rcond=None)[0]
        p, q = c[:degree + 1], numpy.r_[1.0, c[degree + 1:]]
        weight = 1 / (f * (powers @ q))
    return tuple(p), tuple(q)


def _clenshaw(fit, t):
    """Evaluate a Chebyshev fit (coefficients, lo, hi) at t, in t's dtype."""
    coefficients, lo, hi = fit
    cast = t.dtype.type
    u = (t - cast((lo + hi) / 2)) * cast(2 / (hi - lo))
    two_u = u + u
    b1 = b2 = cast(0)
    for coefficient in coefficients[:0:-1]:
        b1, b2 = two_u * b1 - b2 + cast(coefficient), b1
    return u * b1 - b2 + cast(coefficients[0])


def _horner(coefficients, t, out):
    """out = the polynomial (coefficients lowest first) at t, in place."""
    get_array_module(t).multiply(t, coefficients[-1], out=out)
    out += coefficients[-2]
    for c in coefficients[-3::-1]:
        out *= t
        out += c
    return out


def _erf64(x):
    xp = get_array_module(x)
    p, q = _erf64_coefficients()
    t = x * x
    inner = x * _clenshaw(p, xp.minimum(t, 4.0))
    w = 1 / xp.clip(t, 4.0, 36.0)
    outer = xp.sign(x) * (1 - xp.exp(-t) * _clenshaw(q, w) * xp.sqrt(w))
    return xp.where(t < 4.0, inner, outer)


@functools.cache
def _normal_cdf_coefficients():
    """(P, Q) with Phi(x) = 1/2 + x P(x^2) / Q(x^2): the erf fit at x / sqrt 2, with the
    1/sqrt 2 and the halving folded into the coefficients (two array passes fewer)."""
    p, q = _erf32_rational()
    return (tuple(c / (2 * math.sqrt(2)) / 2 ** i for i, c in enumerate(p)),
            tuple(c / 2 ** i for i, c in enumerate(q)))


def _odd_rational_terms(x, work, scratch, p, q, clip):
    """work <- x * P(x^2), |x| clipped at `clip`, and return Q(x^2), for float64 `work` and
    `scratch` (three arrays) of x's shape: the caller divides, rounding once into its output."""
    xp = get_array_module(work)
    t, numerator, denominator = scratch
    xp.clip(x, -clip, clip, out=work)  # widened to float64 in the same pass
    xp.multiply(work, work, out=t)
    work *= _horner(p, t, numerator)
    return _horner(q, t, denominator)


def _erf_rational(x, out, work, scratch):
    """out = erf(x), by the rational fit (accurate to 3.3e-8)."""
    q = _odd_rational_terms(x, work, scratch, *_erf32_rational(), _CLIP32)
    get_array_module(work).divide(work, q, out=out)


def _normal_cdf_rational(x, out, work, scratch):
    """out = Phi(x) = (1 + erf(x / sqrt 2)) / 2, by the same fit."""
    q = _odd_rational_terms(x, work, scratch, *_normal_cdf_coefficients(), _CLIP32 * math.sqrt(2))
    work /= q
    get_array_module(work).add(work, 0.5, out=out)


def _in_chunks(fn, x, out, product=None):
    """fn(x, out, float64 work, scratch) over cache-sized chunks of the 1-D float32 arrays,
    and product = x * out when given: no allocation per chunk."""
    buffers = numpy.empty((4, min(_CHUNK, x.size)))
    for start in range(0, x.size, _CHUNK):
        piece = slice(start, start + _CHUNK)
        work, *scratch = buffers[:, :x[piece].size]
        fn(x[piece], out[piece], work, scratch)
        if product is not None:
            numpy.multiply(x[piece], out[piece], out=product[piece])


def _float32_by_chunks(fn, x, with_product=False):
    """fn (as _in_chunks calls it) applied to a float32 array, returning float32 (and
    x * fn(x) too, with_product): in float64 chunks on the CPU's threads, in one piece on
    the GPU."""
    xp = get_array_module(x)
    out = xp.empty(x.shape, dtype=x.dtype)
    if xp is not numpy:
        work, *scratch = xp.empty((4,) + x.shape)
        fn(x, out, work, scratch)
        return (out, x * out) if with_product else out
    product = numpy.empty(x.shape, dtype=x.dtype) if with_product else None
    by_rows(lambda *blocks: _in_chunks(fn, *blocks), x.reshape(-1), out.reshape(-1),
            None if product is None else product.reshape(-1))
    return (out, product) if with_product else out


def erf(x):
    """The error function of a float32 or float64 array, elementwise, in its own dtype."""
    if x.dtype == numpy.float64:
        return _erf64(x)
    if x.dtype == numpy.float32:
        return _float32_by_chunks(_erf_rational, x)
    raise TypeError(f"erf: float32 or float64 arrays only, not {x.dtype}")


# --- activations -----------------------------------------------------------------------
def normal_cdf(x):
    """Phi(x) of a float32 or float64 array, in its dtype: float64 directly with the
    accurate erf, float32 in float64 chunks with the fast rational erf."""
    if x.dtype == numpy.float64:
        return 0.5 * (1 + _erf64(x * (1 / math.sqrt(2))))
    return _float32_by_chunks(_normal_cdf_rational, x)


def _gelu_grad(x, cdf, g, out):
    """out = g * (Phi(x) + x * phi(x)), the exact GELU's derivative times g."""
    xp = get_array_module(x)
    cast = x.dtype.type
    xp.multiply(x, x, out=out)
    out *= cast(-0.5)
    xp.exp(out, out=out)
    out *= x
    out *= cast(1 / math.sqrt(2 * math.pi))  # x * phi(x)
    out += cdf
    out *= g


class _GELU(Function):
    """x * Phi(x) (exact, BERT's "gelu") or its tanh approximation.

    The exact form keeps Phi(x) from the forward pass, so that backward,
    g * (Phi(x) + x * phi(x)), needs only an exp and no second erf.
    """

    def forward(self, x, approximate):
        xp = get_array_module(x)
        cast = x.dtype.type
        self.approximate = approximate
        if approximate == "tanh":
            self.save_for_backward(x)
            return cast(0.5) * x * (1 + xp.tanh(cast(math.sqrt(2 / math.pi)) * (x + cast(0.044715) * x ** 3)))
        if x.dtype == numpy.float32:
            cdf, out = _float32_by_chunks(_normal_cdf_rational, x, with_product=True)
        else:
            cdf = normal_cdf(x)
            out = x * cdf
        self.save_for_backward(x, cdf)
        return out

    def backward(self, g):
        xp = get_array_module(g)
        if self.approximate == "tanh":
            (x,) = self.saved
            cast = x.dtype.type
            k = cast(math.sqrt(2 / math.pi))
            th = xp.tanh(k * (x + cast(0.044715) * x ** 3))
            dinner = k * (1 + cast(3 * 0.044715) * x * x)
            return (g * (cast(0.5) * (1 + th) + cast(0.5) * x * (1 - th * th) * dinner),)
        x, cdf = self.saved
        grad = xp.empty_like(x)
        by_rows(_gelu_grad, x, cdf, g, grad, cache_sized=True)
        return (grad,)


def gelu(x, approximate="none"):
    """GELU: x * Phi(x) with the exact erf ("none", BERT's "gelu"), or the "tanh" form."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', not {approximate!r}")
    return _GELU.apply(x, approximate=approximate)


class _ReLU(Function):
    def forward(self, x):
        self.save_for_backward(x > 0)
        return get_array_module(x).maximum(x, x.dtype.type(0))

    def backward(self, g):
        (positive,) = self.saved
        return (g * positive,)


def relu(x):
    return _ReLU.apply(x)


def tanh(x):
    return x.tanh()


# --- column sums by BLAS (much faster than sum() over the rows) ------------------------
def _column_sum(x2):
    """Sum over the rows of a 2-D array by one vector-matrix product."""
    return get_array_module(x2).ones(x2.shape[0], dtype=x2.dtype) @ x2


# --- linear ----------------------------------------------------------------------------
class _Linear(Function):
    """x @ weight.T + bias as one 2-D matrix product over all leading dims (one large BLAS
    call instead of one per batch row)."""

    def forward(self, x, weight, bias=None):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: input shape {tuple(x.shape)} does not match weight shape "
                             f"{tuple(weight.shape)}: the input's last dim must be {weight.shape[1]}")
        x2 = x.reshape(-1, x.shape[-1])
        self.save_for_backward(x2, weight)
        self.shape = x.shape
        out = x2 @ weight.T
        if bias is not None:
            by_rows(lambda block: get_array_module(block).add(block, bias, out=block), out)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, g):
        x2, weight = self.saved
        needs = self.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        gx = (g2 @ weight).reshape(self.shape) if needs[0] else None
        gw = g2.T @ x2 if needs[1] else None
        gb = _column_sum(g2) if len(needs) > 2 and needs[2] else None
        return gx, gw, gb


def linear(x, weight, bias=None):
    """x @ weight.T + bias. x: (..., in), weight: (out, in), bias: (out,) -> (..., out)."""
    return _Linear.apply(x, weight) if bias is None else _Linear.apply(x, weight, bias)


# --- softmax family ---------------------------------------------------------------------
def _softmax_last_axis_(x):
    """softmax over the last axis, in place. fmax.reduce and einsum are several times
    faster than max() and sum() along a short last axis."""
    xp = get_array_module(x)
    x -= xp.fmax.reduce(x, axis=-1)[..., None]
    xp.exp(x, out=x)
    x /= xp.einsum("...i->...", x)[..., None]
    return x


class _Softmax(Function):
    def forward(self, x, dim):
        xp = get_array_module(x)
        self.dim = dim
        if dim in (-1, x.ndim - 1):
            y = _softmax_last_axis_(x.copy())
        else:
            y = x - x.max(axis=dim, keepdims=True)
            xp.exp(y, out=y)
            y /= y.sum(axis=dim, keepdims=True)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        return (_softmax_backward(y, g, self.dim),)


def _softmax_backward(y, g, dim):
    """dx = y * (g - sum(g * y)) for y = softmax(x) along `dim`, in a new array."""
    if dim in (-1, y.ndim - 1):
        return _softmax_backward_last_axis_(y, g.copy())
    out = g - (g * y).sum(axis=dim, keepdims=True)
    out *= y
    return out


def _softmax_backward_last_axis_(y, g):
    """g <- y * (g - rowsum(g * y)) in place, along the last axis; the row dot product by
    einsum (no temporary)."""
    g -= get_array_module(y).einsum("...i,...i->...", g, y)[..., None]
    g *= y
    return g


def softmax(x, dim=-1):
    return _Softmax.apply(x, dim=dim)


def _log_softmax_array(x, dim):
    xp = get_array_module(x)
    shifted = x - x.max(axis=dim, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=dim, keepdims=True))


class _LogSoftmax(Function):
    def forward(self, x, dim):
        self.dim = dim
        y = _log_softmax_array(x, dim)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        xp = get_array_module(y)
        return (g - xp.exp(y) * g.sum(axis=self.dim, keepdims=True),)


def log_softmax(x, dim=-1):
    return _LogSoftmax.apply(x, dim=dim)


# --- attention ----------------------------------------------------------------------------
# BLAS runs small products on one thread each (OpenBLAS: up to 100^3 multiply-adds) and
# threads larger ones itself: attention splits into blocks on minisft's threads only when
# its products are small, as blocks of threaded products would oversubscribe the cores.
_SMALL_PRODUCT = 100 ** 3


def _attention_blocks(kernel, *arrays, product_size):
    """by_rows for small products, else kernel once over the whole arrays."""
    return by_rows(kernel, *arrays) if product_size <= _SMALL_PRODUCT else [kernel(*arrays)]


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
    """softmax(q k^T * scale + bias) (with dropout) @ v on (batch..., L, d) arrays.

    Fused so that the (..., L, L) scores are made and normalised in place, block by block of
    the leading batch axis on the CPU's threads, and backward keeps only the probabilities
    and the dropout mask (the dropped-out probabilities are remade, one cheap pass, rather
    than kept: a (..., L, L) array per layer). The scale is applied to q and the dropout's
    1/(1-p) to v: (..., L, d) arrays, not (..., L, L) ones. q, k and v are kept contiguous:
    NumPy's batched products are several times slower on strided operands (heads are a
    permuted view of (B, L, H), k^T a transposed one). Subclasses lay out the inputs and
    outputs.
    """

    def attend(self, q, k, v, bias, out, *, scale, dropout_p, keep_probs):
        """Fill `out` (batch..., Lq, dv) with the context of q, k, v (batch..., L, d) and
        bias (broadcasting to the scores), keeping what backward needs."""
        xp = get_array_module(q)
        cast = q.dtype.type
        scores_shape = q.shape[:-1] + (k.shape[-2],)
        bias = None if bias is None else xp.broadcast_to(bias, scores_shape)
        self.scale, self.dropout_scale = cast(scale), cast(1 / (1 - dropout_p))
        keep = random.keep_mask(scores_shape, dropout_p, device_of(q)) if dropout_p else None
        saved_q, saved_k, saved_v = (xp.empty(a.shape, dtype=a.dtype) for a in (q, k, v))
        probs = xp.empty(scores_shape, dtype=q.dtype)

        def block(q, k, v, bias, keep, saved_q, saved_k, saved_v, probs, out):
            xp.multiply(q, self.scale, out=saved_q)
            saved_k[...] = k
            xp.multiply(v, self.dropout_scale, out=saved_v)
            xp.matmul(saved_q, xp.ascontiguousarray(k.swapaxes(-1, -2)), out=probs)
            if bias is not None:
                probs += bias
            _softmax_last_axis_(probs)
            xp.matmul(probs if keep is None else probs * keep, saved_v, out=out)

        self.product_size = q.shape[-2] * k.shape[-2] * max(q.shape[-1], v.shape[-1])
        _attention_blocks(block, q, k, v, bias, keep, saved_q, saved_k, saved_v, probs, out,
                          product_size=self.product_size)
        self.probs = probs if keep_probs else None
        self.save_for_backward(saved_q, saved_k, saved_v, probs, keep)

    def attend_backward(self, g, gq, gk, gv, g_scores):
        """Fill the gradients given (None: not needed) from g, the context's gradient."""
        q, k, v, probs, keep = self.saved  # q scaled, v scaled by the dropout's 1/(1-p)
        xp = get_array_module(g)

        def block(g, q, k, v, probs, keep, gq, gk, gv, g_scores_out):
            if gv is not None:  # out = (probs * keep) @ (v / (1 - p))
                dropped = probs if keep is None else probs * keep
                xp.matmul(dropped.swapaxes(-1, -2), g, out=gv)
                gv *= self.dropout_scale
                del dropped  # freed before g_scores is made
            g_scores = xp.matmul(g, xp.ascontiguousarray(v.swapaxes(-1, -2)), out=g_scores_out)
            if keep is not None:  # v is already scaled by 1 / (1 - p)
                g_scores *= keep
            _softmax_backward_last_axis_(probs, g_scores)
            # scores = (q * scale) @ k^T: dq = scale * dS @ k, dk = dS^T @ (q * scale)
            if gq is not None:
                xp.matmul(g_scores, k, out=gq)
                gq *= self.scale
            if gk is not None:
                xp.matmul(g_scores.swapaxes(-1, -2), q, out=gk)

        _attention_blocks(block, g, q, k, v, probs, keep, gq, gk, gv, g_scores,
                          product_size=self.product_size)


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
        q, k, v, probs = self.saved[:4]
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
        g_bias = xp.empty_like(self.saved[3]) if needs_bias else None
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
    """Normalise rows of x viewed as (rows, features), block by block of rows on the CPU's
    threads; in-place arithmetic, row sums by einsum (no temporaries, and several times
    faster than sum() along a short axis)."""

    def forward(self, x, weight=None, bias=None, *, features, eps):
        xp = get_array_module(x)
        cast = x.dtype.type
        x2 = x.reshape(-1, features)
        xhat, out = xp.empty(x2.shape, dtype=x.dtype), xp.empty(x2.shape, dtype=x.dtype)
        rstd = xp.empty((x2.shape[0], 1), dtype=x.dtype)

        def block(x2, xhat, rstd, out):
            xp.subtract(x2, xp.einsum("ij->i", x2)[:, None] * cast(1 / features), out=xhat)
            rstd[:, 0] = xp.einsum("ij,ij->i", xhat, xhat)
            rstd *= cast(1 / features)
            rstd += cast(eps)
            xp.divide(1, xp.sqrt(rstd, out=rstd), out=rstd)
            xhat *= rstd
            if weight is None:
                out[...] = xhat
            else:
                xp.multiply(xhat, weight.reshape(-1), out=out)
            if bias is not None:
                out += bias.reshape(-1)

        by_rows(block, x2, xhat, rstd, out)
        self.save_for_backward(xhat, rstd, weight)
        self.shape = x.shape
        return out.reshape(x.shape)

    def backward(self, g):
        xhat, rstd, weight = self.saved
        xp = get_array_module(g)
        cast = g.dtype.type
        needs = self.needs_input_grad
        g2 = g.reshape(xhat.shape)
        params_shape = self.shape[-1:] if weight is None else weight.shape
        need_gw = len(needs) > 1 and needs[1]
        g_times_xhat = xp.empty_like(xhat) if need_gw else None
        gx = xp.empty_like(xhat)

        def block(g2, xhat, rstd, g_times_xhat, gx):
            if g_times_xhat is not None:
                xp.multiply(g2, xhat, out=g_times_xhat)
            # dx = rstd * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat))
            if weight is None:
                gx[...] = g2
            else:
                xp.multiply(g2, weight.reshape(-1), out=gx)
            projection = xp.einsum("ij,ij->i", gx, xhat)[:, None] * cast(1 / xhat.shape[1])
            gx -= xp.einsum("ij->i", gx)[:, None] * cast(1 / xhat.shape[1])
            gx -= xhat * projection
            gx *= rstd

        by_rows(block, g2, xhat, rstd, g_times_xhat, gx)
        gw = _column_sum(g_times_xhat).reshape(params_shape) if need_gw else None
        gb = _column_sum(g2).reshape(params_shape) if len(needs) > 2 and needs[2] else None
        return (gx.reshape(self.shape), gw, gb)[:len(needs)]


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
    def forward(self, x, p):
        keep = random.keep_mask(x.shape, p, device_of(x))
        self.scale = x.dtype.type(1 / (1 - p))
        self.save_for_backward(keep)
        return _masked_scale(x, keep, self.scale)

    def backward(self, g):
        (keep,) = self.saved
        return (_masked_scale(g, keep, self.scale),)


def _masked_scale(x, keep, scale):
    """x * keep * scale, by blocks of rows on the CPU's threads."""
    xp = get_array_module(x)
    out = xp.empty(x.shape, dtype=x.dtype)

    def block(x, keep, out):
        xp.multiply(x, keep, out=out)
        out *= scale
    by_rows(block, x, keep, out)
    return out


def dropout(x, p=0.5, training=True):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout: p must be in [0, 1], not {p}")
    if not training or p == 0:
        return x
    if p == 1:
        return x * 0
    return _Dropout.apply(x, p=p)


# --- embedding --------------------------------------------------------------------------
class _Embedding(Function):
    def forward(self, weight, ids, padding_idx):
        if ids.dtype.kind not in "iu":
            raise TypeError(f"embedding: indices must be integers, not {ids.dtype}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
            raise IndexError(f"embedding: index {int(ids.max()) if int(ids.max()) >= weight.shape[0] else int(ids.min())} "
                             f"out of range for a table of {weight.shape[0]} rows")
        self.save_for_backward(ids)
        self.weight_shape, self.padding_idx = weight.shape, padding_idx
        return weight[ids]

    def backward(self, g):
        (ids,) = self.saved
        xp = get_array_module(g)
        grad = xp.zeros(self.weight_shape, dtype=g.dtype)
        index_add(grad, ids.reshape(-1), g.reshape(-1, self.weight_shape[1]))
        if self.padding_idx is not None:
            grad[self.padding_idx] = 0
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
    """Per-example loss -(1-s) log p[target] - s * mean_c log p[c]; ignored rows are 0."""

    def forward(self, logits, target, ignore_index, label_smoothing):
        xp = get_array_module(logits)
        n, classes = logits.shape
        cast = logits.dtype.type
        valid = target != ignore_index
        safe_target = xp.where(valid, target, 0)
        if bool(((safe_target < 0) | (safe_target >= classes)).any()):
            raise IndexError(f"cross_entropy: target values must be in [0, {classes}) or "
                             f"ignore_index={ignore_index}")
        logp = _log_softmax_array(logits, -1)
        picked = logp[xp.arange(n), safe_target]
        loss = -(cast(1 - label_smoothing) * picked + cast(label_smoothing) * logp.mean(axis=-1))
        self.save_for_backward(logp, safe_target, valid)
        self.label_smoothing = label_smoothing
        return xp.where(valid, loss, cast(0))

    def backward(self, g):
        logp, target, valid = self.saved
        xp = get_array_module(logp)
        cast = logp.dtype.type
        n, classes = logp.shape
        grad = xp.exp(logp)  # softmax - smoothed one-hot
        grad -= cast(self.label_smoothing / classes)
        grad[xp.arange(n), target] -= cast(1 - self.label_smoothing)
        grad *= xp.where(valid, g, cast(0))[:, None]
        return grad, None


def cross_entropy(input, target, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Softmax cross-entropy. input: (N, C) logits, target: (N,) class indices.

    With reduction="mean" the sum is divided by the number of targets not equal to
    ignore_index, as torch does (nan when every target is ignored).
    """
    if input.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, C), got {tuple(input.shape)}; "
                         "reshape token logits to (-1, C) and targets to (-1,)")
    target_data = target.data if isinstance(target, Tensor) else target
    if tuple(target_data.shape) != (input.shape[0],):
        raise ValueError(f"cross_entropy: target shape {tuple(target_data.shape)} does not match "
                         f"logits shape {tuple(input.shape)}; expected ({input.shape[0]},)")
    loss = _CrossEntropy.apply(input, target, ignore_index=ignore_index,
                               label_smoothing=label_smoothing)
    count = int((target_data != ignore_index).sum()) if reduction == "mean" else None
    return _reduce(loss, reduction, count if count else float("nan"))


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
    """Per-element max(x, 0) - x*t + log(1 + exp(-|x|)), stable for any x."""

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
