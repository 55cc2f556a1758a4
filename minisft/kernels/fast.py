"""Fast kernels: the reference kernels' results, with the reference kernels' signatures,
computed for speed on the CPU.

What makes them fast (minisft.engine.runtime has the threads):
- row-wise work runs in blocks of rows on minisft's thread pool, and matrix products in
  fixed tiles of rows on the same threads with the BLAS on one thread, so results do not
  depend on the thread count;
- arithmetic is in place, in cache-sized pieces where a kernel makes many passes, and
  LayerNorm's backward makes only dx at full size;
- GELU is float32 arithmetic on the normal CDF's tail (exp and a polynomial, no float64),
  in long pieces (fewer ufunc calls, so the threads hand each other the GIL less often);
  erf and the normal CDF alone are a rational function evaluated in float64 chunks;
- attention normalises its (L, L) scores in place and remakes, rather than keeps, the
  dropped-out probabilities.
On CuPy arrays the same code runs once over whole arrays.
"""
import math

import numpy

from minisft.engine.backend import get_array_module
from minisft.engine.runtime import CACHE_ELEMENTS, by_rows, by_tiles_on_one_blas_thread, get_num_threads
from minisft.kernels import erf_coefficients as table
from minisft.kernels import reference

_CHUNK = 1 << 17  # elements per float64 chunk: big enough to amortise a call, small enough for the cache
GEMM_TILE = 256   # rows per matrix-product call: the same tiles for any thread count


# --- erf and the normal CDF: a rational function in float64 chunks ------------------------
def _horner(coefficients, t, out):
    """out = the polynomial (coefficients lowest first) at t, in place."""
    get_array_module(t).multiply(t, coefficients[-1], out=out)
    out += coefficients[-2]
    for c in coefficients[-3::-1]:
        out *= t
        out += c
    return out


def _odd_rational_terms(x, work, scratch, p, q, clip):
    """work <- x * P(x^2), |x| clipped at `clip`, and return Q(x^2), for float64 `work` and
    `scratch` (three arrays) of x's shape: the caller divides, rounding once into its output."""
    xp = get_array_module(work)
    t, numerator, denominator = scratch
    xp.clip(x, -clip, clip, out=work)  # widened to float64 in the same pass
    xp.multiply(work, work, out=t)
    work *= _horner(p, t, numerator)
    return _horner(q, t, denominator)


# Phi(x) = 1/2 + x P(x^2) / Q(x^2): the erf table at x / sqrt 2, with the 1/sqrt 2 and the
# halving folded into the coefficients (two array passes fewer).
_CDF_P = tuple(c / (2 * math.sqrt(2)) / 2 ** i for i, c in enumerate(table.RATIONAL_P))
_CDF_Q = tuple(c / 2 ** i for i, c in enumerate(table.RATIONAL_Q))


def _erf_rational(x, out, work, scratch):
    """out = erf(x), by the rational table (accurate to 3.3e-8)."""
    q = _odd_rational_terms(x, work, scratch, table.RATIONAL_P, table.RATIONAL_Q, table.RATIONAL_CLIP)
    get_array_module(work).divide(work, q, out=out)


def _normal_cdf_rational(x, out, work, scratch):
    """out = Phi(x) = (1 + erf(x / sqrt 2)) / 2, by the same table."""
    q = _odd_rational_terms(x, work, scratch, _CDF_P, _CDF_Q, table.RATIONAL_CLIP * math.sqrt(2))
    work /= q
    get_array_module(work).add(work, 0.5, out=out)


def _by_chunks(fn, *arrays, spare=False):
    """fn(*arrays, float64 work, scratch), and a float32 `spare` array last with spare, over
    float32 arrays of one size (None passes through): in cache-sized chunks on the CPU's
    threads, with no allocation per chunk; in one piece on the GPU."""
    xp, first = get_array_module(arrays[0]), arrays[0]
    if xp is not numpy:
        work, *scratch = xp.empty((4,) + first.shape)
        fn(*arrays, work, scratch, *([xp.empty(first.shape, dtype=first.dtype)] if spare else []))
        return
    by_rows(lambda *blocks: _in_chunks(fn, blocks, spare), *(None if a is None else a.reshape(-1) for a in arrays))


def _in_chunks(fn, arrays, spare):
    """_by_chunks on the CPU, over one thread's block of 1-D arrays."""
    size = min(_CHUNK, arrays[0].size)
    buffers, spare_buffer = numpy.empty((4, size)), numpy.empty(size if spare else 0, dtype=arrays[0].dtype)
    for start in range(0, arrays[0].size, _CHUNK):
        piece = slice(start, start + _CHUNK)
        n = arrays[0][piece].size
        work, *scratch = buffers[:, :n]
        fn(*(None if a is None else a[piece] for a in arrays), work, scratch, *([spare_buffer[:n]] if spare else []))


def _float32_by_chunks(fn, x):
    """fn(x, out, work, scratch) applied to a float32 array, returning out (float32)."""
    out = get_array_module(x).empty(x.shape, dtype=x.dtype)
    _by_chunks(fn, x, out)
    return out


def erf(x):
    """erf(x): float32 by the rational table in float64 chunks, float64 as the reference."""
    return _float32_by_chunks(_erf_rational, x) if x.dtype == numpy.float32 else reference.erf(x)


def normal_cdf(x):
    if x.dtype != numpy.float32:
        return reference.normal_cdf(x)
    return _float32_by_chunks(_normal_cdf_rational, x)


# --- GELU: the normal CDF's tail in float32, relative accuracy kept ------------------------
# Phi(x) = erfc(-x / sqrt 2) / 2 and 1 - Phi(x) = erfc(x / sqrt 2) / 2, with erfc(z) =
# exp(-z^2) t P(t), t = 1 / (1 + p z) (tools/fit_erf.py): the tail e = erfc(|x| / sqrt 2) / 2
# is made with its relative accuracy, and never subtracted from 1 where it is Phi itself.
_TAIL_SCALE = table.TAIL_P / math.sqrt(2)               # p z = (p / sqrt 2) |x|
_TAIL = tuple(c / 2 for c in table.TAIL)                 # the halving folded in
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_CHUNK32 = 1 << 17  # elements per piece: fewer, longer ufunc calls hand the GIL between threads less


def gelu_forward(x, slope=False, into=None, slope_into=None):
    if x.dtype != numpy.float32:
        return reference.gelu_forward(x, slope, into, slope_into)
    xp = get_array_module(x)
    y = xp.empty(x.shape, dtype=x.dtype) if into is None else into  # C order, whatever x's layout
    dy = (xp.empty(x.shape, dtype=x.dtype) if slope_into is None else slope_into) if slope else None
    _by_pieces(_gelu_chunk, x, y, dy)  # one pass
    return (y, dy) if slope else y


def _by_pieces(fn, *arrays):
    """fn(*pieces, u, t, e, positive): over arrays of one size and float dtype (None passes
    through), in pieces of _CHUNK32 on the CPU's threads with three scratch pieces of that
    dtype and a bool one; in one piece on the GPU."""
    xp, first = get_array_module(arrays[0]), arrays[0]
    if xp is not numpy:
        fn(*arrays, *xp.empty((3,) + first.shape, dtype=first.dtype), xp.empty(first.shape, dtype=bool))
        return

    def block(*blocks):
        size = min(_CHUNK32, blocks[0].size)
        scratch, positive = numpy.empty((3, size), dtype=first.dtype), numpy.empty(size, dtype=bool)
        for start in range(0, blocks[0].size, _CHUNK32):
            pieces = [None if b is None else b[start:start + _CHUNK32] for b in blocks]
            n = pieces[0].size
            fn(*pieces, *scratch[:, :n], positive[:n])
    by_rows(block, *(None if a is None else a.reshape(-1) for a in arrays))


def _gelu_chunk(x, y, dy, u, t, e, positive):
    """y = x Phi(x) and, when dy is given, GELU's slope dy = Phi(x) + x phi(x), phi(x) =
    exp(-x^2 / 2) / sqrt(2 pi). y may be x itself: x is read for the last time before y is
    written. u, t, e: float32 scratch; positive: a bool one. Every op is a plain ufunc pass
    (numpy's where=, copysign and maximum are several times slower than a multiply)."""
    xp = get_array_module(x)
    f = x.dtype.type
    xp.abs(x, out=u)
    xp.multiply(u, f(_TAIL_SCALE), out=t)
    t += f(1)
    xp.divide(f(1), t, out=t)                     # t = 1 / (1 + p |x| / sqrt 2)
    xp.multiply(t, f(_TAIL[-1]), out=e)           # e = t P(t) / 2, by Horner
    for c in _TAIL[-2::-1]:
        e += f(c)
        e *= t
    xp.multiply(u, u, out=t)
    t *= f(-0.5)
    xp.exp(t, out=t)                              # exp(-x^2 / 2)
    e *= t                                        # e = erfc(|x| / sqrt 2) / 2 = Phi(-|x|)
    if dy is not None:
        xp.greater_equal(x, f(0), out=positive)
        xp.multiply(e, f(-2), out=dy)
        dy += f(1)
        dy *= positive
        dy += e                                   # Phi(x): e where x < 0, 1 - e elsewhere
        t *= x
        t *= f(_INV_SQRT_2PI)
        dy += t                                   # + x phi(x)
    u *= e
    xp.add(x, xp.abs(x, out=t), out=y)
    y *= f(0.5)
    y -= u                                        # x Phi(x) = max(x, 0) - |x| Phi(-|x|)


def gelu_tanh_forward(x, slope=False, into=None, slope_into=None):
    """y into `into` (new, or x itself) after the slope is made from x (into slope_into)."""
    xp = get_array_module(x)
    y = xp.empty(x.shape, dtype=x.dtype) if into is None else into
    dy = (xp.empty(x.shape, dtype=x.dtype) if slope_into is None else slope_into) if slope else None
    _by_pieces(_gelu_tanh_chunk, x, y, dy)
    return (y, dy) if slope else y


def _gelu_tanh_chunk(x, y, dy, th, square, _, positive):
    """y = x (1 + tanh u) / 2, u = sqrt(2 / pi) (x + 0.044715 x^3), and its slope
    dy = (1 + tanh u + x (1 - tanh^2 u) du/dx) / 2; y may be x itself (written last)."""
    xp = get_array_module(x)
    cast = x.dtype.type
    xp.multiply(x, x, out=th)
    th *= cast(0.044715)
    th += cast(1)
    th *= x
    th *= cast(math.sqrt(2 / math.pi))
    xp.tanh(th, out=th)                           # tanh u
    if dy is not None:
        xp.multiply(x, x, out=dy)
        dy *= cast(3 * 0.044715)
        dy += cast(1)
        dy *= cast(math.sqrt(2 / math.pi))
        dy *= x                                   # x du/dx
        xp.multiply(th, th, out=square)
        xp.subtract(cast(1), square, out=square)
        dy *= square
        dy += th
        dy += cast(1)
        dy *= cast(0.5)
    th += cast(1)
    xp.multiply(th, x, out=y)
    y *= cast(0.5)


# --- softmax family (last axis, in place) ---------------------------------------------------
def _row_max(x):
    """max along the last axis; fmax.reduce is several times faster than max() on NumPy."""
    return numpy.fmax.reduce(x, axis=-1) if get_array_module(x) is numpy else x.max(axis=-1)


def _softmax_(x):
    """softmax over the last axis, in place; row sums by einsum (no temporary)."""
    xp = get_array_module(x)
    x -= _row_max(x)[..., None]
    xp.exp(x, out=x)
    x /= xp.einsum("...i->...", x)[..., None]
    return x


def _softmax_backward_(y, g):
    """g <- y * (g - rowsum(g * y)) in place; the row dot product by einsum."""
    g -= get_array_module(y).einsum("...i,...i->...", g, y)[..., None]
    g *= y
    return g


def softmax_forward(x):
    return _softmax_(x.copy())


def softmax_backward(y, g):
    return _softmax_backward_(y, g.copy())


def log_softmax_forward(x):
    xp = get_array_module(x)
    y = x - _row_max(x)[..., None]
    e = xp.exp(y)
    y -= xp.log(xp.einsum("...i->...", e))[..., None]
    return y


def log_softmax_backward(y, g):
    grad = get_array_module(y).exp(y)
    grad *= -g.sum(axis=-1, keepdims=True)
    grad += g
    return grad


# --- linear: products in tiles of rows on minisft's threads ----------------------------------
def linear_forward(x, weight, bias):
    xp = get_array_module(x)
    out = xp.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)

    def tile(x, out):
        xp.matmul(x, weight.T, out=out)
        if bias is not None:
            out += bias
    by_tiles_on_one_blas_thread(tile, x, out, tile=GEMM_TILE, multiply_adds=weight.size)
    return out


def _column_sum(x):
    """Sum over the rows of a 2-D array (rows, n) -> (n,), by matrix-vector products over
    tiles of columns (much faster than sum() over the rows)."""
    xp = get_array_module(x)
    ones, out = xp.ones(x.shape[0], dtype=x.dtype), xp.empty(x.shape[1], dtype=x.dtype)
    by_tiles_on_one_blas_thread(lambda columns, out: xp.matmul(columns, ones, out=out), x.T, out, tile=GEMM_TILE,
                                multiply_adds=x.shape[0])
    return out


def linear_backward(g, x, weight, needs):
    xp = get_array_module(g)
    gx = gw = None
    if needs[0]:
        gx = xp.empty((g.shape[0], weight.shape[1]), dtype=g.dtype)  # x may be None: not kept for a frozen weight
        by_tiles_on_one_blas_thread(lambda g, gx: xp.matmul(g, weight, out=gx), g, gx, tile=GEMM_TILE,
                                    multiply_adds=weight.size)
    if needs[1]:  # dW's rows (output features) in tiles: g^T's rows are g's columns
        gw = xp.empty((g.shape[1], x.shape[1]), dtype=g.dtype)
        by_tiles_on_one_blas_thread(lambda g_t, gw: xp.matmul(g_t, x, out=gw), g.T, gw, tile=GEMM_TILE,
                                    multiply_adds=x.size)
    gb = _column_sum(g) if needs[2] else None
    return gx, gw, gb


# --- attention: batch blocks on minisft's threads, scores normalised in place ---------------
def _by_batch(block, *arrays):
    """block over blocks of the batch: of the first axis, or of the second (heads) when the
    first is too short to give every thread a block. The arrays share their batch axes."""
    if arrays[0].ndim >= 4 and arrays[0].shape[0] < get_num_threads():
        arrays = [None if a is None else a.swapaxes(0, 1) for a in arrays]
    q, k = arrays[:2]  # two products per query row: q k^T and probs v
    by_tiles_on_one_blas_thread(block, *arrays, tile=1, multiply_adds=2 * q.size // q.shape[0] * k.shape[-2])


def attention_forward(q, k, v, bias, keep, scale, dropout_scale, out):
    """Keeps q pre-scaled, k, and v pre-scaled by the dropout's 1/(1-p), contiguous (NumPy's
    batched products are several times slower on strided operands, and heads are a permuted
    view of (B, L, H)): the scale touches (L, d) arrays, not (L, L) ones."""
    xp = get_array_module(q)
    cast = q.dtype.type
    saved_q, saved_k, saved_v = (xp.empty(a.shape, dtype=a.dtype) for a in (q, k, v))
    probs = xp.empty(q.shape[:-1] + (k.shape[-2],), dtype=q.dtype)

    def block(q, k, v, bias, keep, saved_q, saved_k, saved_v, probs, out):
        xp.multiply(q, cast(scale), out=saved_q)
        saved_k[...] = k
        xp.multiply(v, cast(dropout_scale), out=saved_v)
        xp.matmul(saved_q, xp.ascontiguousarray(k.swapaxes(-1, -2)), out=probs)
        if bias is not None:
            probs += bias
        _softmax_(probs)
        xp.matmul(probs if keep is None else probs * keep, saved_v, out=out)

    _by_batch(block, q, k, v, bias, keep, saved_q, saved_k, saved_v, probs, out)
    return saved_q, saved_k, saved_v, probs


def attention_backward(g, saved, keep, scale, dropout_scale, gq, gk, gv, g_bias):
    xp = get_array_module(g)
    cast = g.dtype.type

    def block(g, q, k, v, probs, keep, gq, gk, gv, g_scores_out):
        if gv is not None:  # out = (probs * keep) @ (v / (1 - p))
            dropped = probs if keep is None else probs * keep
            xp.matmul(dropped.swapaxes(-1, -2), g, out=gv)
            gv *= cast(dropout_scale)
            del dropped  # freed before g_scores is made
        g_scores = xp.matmul(g, xp.ascontiguousarray(v.swapaxes(-1, -2)), out=g_scores_out)
        if keep is not None:  # v is already scaled by 1 / (1 - p)
            g_scores *= keep
        _softmax_backward_(probs, g_scores)
        # scores = (q * scale) @ k^T: dq = scale * dS @ k, dk = dS^T @ (q * scale)
        if gq is not None:
            xp.matmul(g_scores, k, out=gq)
            gq *= cast(scale)
        if gk is not None:
            xp.matmul(g_scores.swapaxes(-1, -2), q, out=gk)

    _by_batch(block, g, *saved, keep, gq, gk, gv, g_bias)


# --- LayerNorm: blocks of rows, in place, row sums by einsum -------------------------------
def layer_norm_forward(x, weight, bias, eps):
    xp = get_array_module(x)
    cast = x.dtype.type
    features = x.shape[1]
    xhat, out = xp.empty(x.shape, dtype=x.dtype), xp.empty(x.shape, dtype=x.dtype)
    rstd = xp.empty((x.shape[0], 1), dtype=x.dtype)

    def block(x, xhat, rstd, out):
        xp.subtract(x, xp.einsum("ij->i", x)[:, None] * cast(1 / features), out=xhat)
        rstd[:, 0] = xp.einsum("ij,ij->i", xhat, xhat)
        rstd *= cast(1 / features)
        rstd += cast(eps)
        xp.divide(1, xp.sqrt(rstd, out=rstd), out=rstd)
        xhat *= rstd
        if weight is None:
            out[...] = xhat
        else:
            xp.multiply(xhat, weight, out=out)
        if bias is not None:
            out += bias

    by_rows(block, x, xhat, rstd, out)
    return out, xhat, rstd


def layer_norm_backward(g, xhat, rstd, weight, need_params):
    """Only dx is made at full size: the rows go in cache-sized tiles (the same for any thread
    count), and each tile's shares of dw and db are summed from its own rows while they are in
    cache."""
    xp = get_array_module(g)
    cast = g.dtype.type
    mean = cast(1 / xhat.shape[1])
    gx = xp.empty_like(xhat)

    def block(g, xhat, rstd, gx):
        ones, work = xp.ones(g.shape[0], dtype=g.dtype), xp.empty_like(g)
        shares = (ones @ xp.multiply(g, xhat, out=work), ones @ g) if need_params else None
        if weight is None:
            gx[...] = g
        else:
            xp.multiply(g, weight, out=gx)
        projection = xp.einsum("ij,ij->i", gx, xhat)[:, None] * mean
        gx -= xp.einsum("ij->i", gx)[:, None] * mean
        gx -= xp.multiply(xhat, projection, out=work)
        gx *= rstd
        return shares

    features = xhat.shape[1]
    parts = by_tiles_on_one_blas_thread(block, g, xhat, rstd, gx, tile=max(1, CACHE_ELEMENTS // max(features, 1)),
                                        multiply_adds=2 * features, elementwise=8 * features)
    if not need_params:
        return gx, None, None
    return gx, sum(share[0] for share in parts), sum(share[1] for share in parts)


# --- dropout --------------------------------------------------------------------------------
def dropout(x, keep, scale, into=None):
    xp = get_array_module(x)
    out = xp.empty(x.shape, dtype=x.dtype) if into is None else into

    def block(x, keep, out):
        xp.multiply(x, keep, out=out)
        out *= x.dtype.type(scale)
    by_rows(block, x, keep, out)
    return out


# --- cross-entropy: one softmax pass, the one-hot subtracted in place -----------------------
def cross_entropy_forward(logits, target, valid, label_smoothing):
    xp = get_array_module(logits)
    cast = logits.dtype.type
    logp = log_softmax_forward(logits)
    loss = logp[xp.arange(logits.shape[0]), target] * cast(-(1 - label_smoothing))
    if label_smoothing:
        loss -= cast(label_smoothing) * logp.mean(axis=-1)
    loss[~valid] = 0
    return loss, logp


def cross_entropy_backward(logp, target, valid, g, label_smoothing):
    xp = get_array_module(logp)
    cast = logp.dtype.type
    grad = xp.exp(logp)
    if label_smoothing:
        grad -= cast(label_smoothing / logp.shape[1])
    grad[xp.arange(logp.shape[0]), target] -= cast(1 - label_smoothing)
    grad *= xp.where(valid, g, cast(0))[:, None]
    return grad


# --- embedding: the reference's scatter is already a sort and a segmented sum ---------------
embedding_backward = reference.embedding_backward


# --- Adam(W): blocks of rows, cache-sized pieces, one scratch array -------------------------
def _adam_block(param, grad, exp_avg, exp_avg_sq, *, decay, beta1, beta2, eps, step_size, bias_correction2):
    xp = get_array_module(param)
    if decay is not None:
        param *= decay                                # p.mul_(1 - lr * weight_decay)
    work = grad - exp_avg
    work *= 1 - beta1
    exp_avg += work                                   # exp_avg.lerp_(grad, 1 - beta1)
    xp.multiply(grad, 1 - beta2, out=work)
    work *= grad
    exp_avg_sq *= beta2
    exp_avg_sq += work                                # .mul_(beta2).addcmul_(g, g, 1 - beta2)
    xp.sqrt(exp_avg_sq, out=work)
    work /= bias_correction2
    work += eps                                       # denom
    xp.divide(exp_avg, work, out=work)
    work *= step_size
    param -= work                                     # p.addcdiv_(exp_avg, denom, -step_size)


def adam_update(param, grad, exp_avg, exp_avg_sq, **hyper):
    by_rows(lambda *blocks: _adam_block(*blocks, **hyper), param, grad, exp_avg, exp_avg_sq, cache_sized=True)
