"""Fast kernels: the reference kernels' results, with the reference kernels' signatures,
computed for speed on the CPU.

What makes them fast (minisft.engine.runtime has the threads):
- row-wise work runs in blocks of rows on minisft's thread pool, and matrix products in
  fixed tiles of rows on the same threads with the BLAS on one thread, so results do not
  depend on the thread count;
- arithmetic is in place, in cache-sized pieces where a kernel makes many passes, and
  LayerNorm's backward makes only dx at full size;
- GELU and the normal CDF are float32 arithmetic on the CDF's tail (exp and a polynomial),
  erf a rational function in float64, all in long pieces (fewer ufunc calls, so the threads
  hand each other the GIL less often);
- attention normalises its (L, L) scores in place and remakes, rather than keeps, the
  dropped-out probabilities.
On CuPy arrays the same code runs once over whole arrays.
"""
import math

import numpy

from minisft.engine.backend import get_array_module
from minisft.engine.runtime import CACHE_ELEMENTS, by_rows, by_tiles_on_one_blas_thread, get_num_threads, get_products
from minisft.kernels import erf_coefficients as table
from minisft.kernels import reference

PIECE = 1 << 17   # elements per piece of elementwise work: long ufunc calls hand the GIL between threads less
GEMM_TILE = 256   # rows per matrix-product call: the same tiles for any thread count


def _by_pieces(fn, *arrays, scratch):
    """fn(*pieces, *scratch pieces) over arrays of one size (None passes through), in pieces of
    PIECE elements on the CPU's threads, each thread with its own scratch pieces (one per dtype
    in `scratch`, made once); in one piece on the GPU."""
    xp, size = get_array_module(arrays[0]), arrays[0].size
    if xp is not numpy:
        fn(*arrays, *(xp.empty(size, dtype=dtype) for dtype in scratch))
        return

    def block(*blocks):
        buffers = [numpy.empty(min(PIECE, blocks[0].size), dtype=dtype) for dtype in scratch]
        for start in range(0, blocks[0].size, PIECE):
            pieces = [None if b is None else b[start:start + PIECE] for b in blocks]
            fn(*pieces, *(buffer[:pieces[0].size] for buffer in buffers))
    by_rows(block, *(None if a is None else a.reshape(-1) for a in arrays))


def _made_like(x, into):
    """`into`, or a new array of x's shape and dtype (C order, whatever x's layout)."""
    return get_array_module(x).empty(x.shape, dtype=x.dtype) if into is None else into


# --- erf: a rational function in float64 pieces --------------------------------------------
def _horner(coefficients, t, out):
    """out = the polynomial (coefficients lowest first) at t, in place."""
    get_array_module(t).multiply(t, coefficients[-1], out=out)
    out += coefficients[-2]
    for c in coefficients[-3::-1]:
        out *= t
        out += c
    return out


def _erf_rational(x, out, work, t, numerator, denominator):
    """out = erf(x) = x P(x^2) / Q(x^2), |x| clipped where erf rounds to 1 (accurate to 3.3e-8),
    in float64 `work`, `t`, `numerator` and `denominator`, rounded once into out."""
    xp = get_array_module(work)
    xp.clip(x, -table.RATIONAL_CLIP, table.RATIONAL_CLIP, out=work)  # widened to float64 in the same pass
    xp.multiply(work, work, out=t)
    work *= _horner(table.RATIONAL_P, t, numerator)
    xp.divide(work, _horner(table.RATIONAL_Q, t, denominator), out=out)


def erf(x):
    """erf(x): float32 by the rational table in float64 pieces, float64 as the reference."""
    if x.dtype != numpy.float32:
        return reference.erf(x)
    out = _made_like(x, None)
    _by_pieces(_erf_rational, x, out, scratch=(numpy.float64,) * 4)
    return out


# --- the normal CDF and GELU: the CDF's tail in float32, relative accuracy kept -------------
# Phi(x) = erfc(-x / sqrt 2) / 2 and 1 - Phi(x) = erfc(x / sqrt 2) / 2, with erfc(z) =
# exp(-z^2) t P(t), t = 1 / (1 + p z) (tools/fit_erf.py): the tail e = erfc(|x| / sqrt 2) / 2
# is made with its relative accuracy, and never subtracted from 1 where it is Phi itself.
# Every op is a plain ufunc pass (numpy's where=, copysign and maximum cost several multiplies).
_TAIL_SCALE = table.TAIL_P / math.sqrt(2)               # p z = (p / sqrt 2) |x|
_TAIL = tuple(c / 2 for c in table.TAIL)                 # the halving folded in
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def _cdf_tail(x, u, t, e):
    """u = |x|, e = Phi(-|x|) = erfc(|x| / sqrt 2) / 2 and t = exp(-x^2 / 2), in place."""
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
    e *= t


def _cdf_from_tail(x, e, out, positive):
    """out = Phi(x): e where x < 0, 1 - e elsewhere (positive: bool scratch)."""
    xp = get_array_module(x)
    f = x.dtype.type
    xp.greater_equal(x, f(0), out=positive)
    xp.multiply(e, f(-2), out=out)
    out += f(1)
    out *= positive
    out += e


def _normal_cdf_chunk(x, out, u, t, e, positive):
    _cdf_tail(x, u, t, e)
    _cdf_from_tail(x, e, out, positive)


def normal_cdf(x):
    if x.dtype != numpy.float32:
        return reference.normal_cdf(x)
    out = _made_like(x, None)
    _by_pieces(_normal_cdf_chunk, x, out, scratch=(x.dtype,) * 3 + (bool,))
    return out


def gelu_forward(x, slope=False, into=None, slope_into=None):
    if x.dtype != numpy.float32:
        return reference.gelu_forward(x, slope, into, slope_into)
    y, dy = _made_like(x, into), _made_like(x, slope_into) if slope else None
    _by_pieces(_gelu_chunk, x, y, dy, scratch=(x.dtype,) * 3 + (bool,))  # one pass
    return (y, dy) if slope else y


def _gelu_chunk(x, y, dy, u, t, e, positive):
    """y = x Phi(x) and, when dy is given, GELU's slope dy = Phi(x) + x phi(x), phi(x) =
    exp(-x^2 / 2) / sqrt(2 pi). y may be x itself: x is read for the last time before y is
    written. u, t, e: float32 scratch; positive: a bool one."""
    f = x.dtype.type
    _cdf_tail(x, u, t, e)
    if dy is not None:
        _cdf_from_tail(x, e, dy, positive)
        t *= x
        t *= f(_INV_SQRT_2PI)
        dy += t                                   # + x phi(x)
    u *= e
    xp = get_array_module(x)
    xp.add(x, xp.abs(x, out=t), out=y)
    y *= f(0.5)
    y -= u                                        # x Phi(x) = max(x, 0) - |x| Phi(-|x|)


def gelu_tanh_forward(x, slope=False, into=None, slope_into=None):
    """y into `into` (new, or x itself) after the slope is made from x (into slope_into)."""
    y, dy = _made_like(x, into), _made_like(x, slope_into) if slope else None
    _by_pieces(_gelu_tanh_chunk, x, y, dy, scratch=(x.dtype,) * 2)
    return (y, dy) if slope else y


def _gelu_tanh_chunk(x, y, dy, th, square):
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
def _products(kernel, *arrays, multiply_adds):
    """kernel(*arrays) in tiles of GEMM_TILE rows on minisft's threads (the BLAS on one), or
    in one call on the BLAS's own threads under set_products("blas")."""
    if get_products() == "blas":
        kernel(*arrays)
    else:
        by_tiles_on_one_blas_thread(kernel, *arrays, tile=GEMM_TILE, multiply_adds=multiply_adds)


def linear_forward(x, weight, bias):
    xp = get_array_module(x)
    out = xp.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)

    def tile(x, out):
        xp.matmul(x, weight.T, out=out)
        if bias is not None:
            out += bias
    _products(tile, x, out, multiply_adds=weight.size)
    return out


def _column_sum(x):
    """Sum over the rows of a 2-D array (rows, n) -> (n,), by matrix-vector products over
    tiles of columns (much faster than sum() over the rows)."""
    xp = get_array_module(x)
    ones, out = xp.ones(x.shape[0], dtype=x.dtype), xp.empty(x.shape[1], dtype=x.dtype)
    _products(lambda columns, out: xp.matmul(columns, ones, out=out), x.T, out, multiply_adds=x.shape[0])
    return out


def linear_backward(g, x, weight, needs):
    xp = get_array_module(g)
    gx = gw = None
    if needs[0]:
        gx = xp.empty((g.shape[0], weight.shape[1]), dtype=g.dtype)  # x may be None: not kept for a frozen weight
        _products(lambda g, gx: xp.matmul(g, weight, out=gx), g, gx, multiply_adds=weight.size)
    if needs[1]:  # dW's rows (output features) in tiles: g^T's rows are g's columns
        gw = xp.empty((g.shape[1], x.shape[1]), dtype=g.dtype)
        _products(lambda g_t, gw: xp.matmul(g_t, x, out=gw), g.T, gw, multiply_adds=x.size)
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
