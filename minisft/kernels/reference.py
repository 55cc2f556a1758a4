"""Reference kernels: each op's formula, one statement per step, on NumPy or CuPy arrays.

Read these to learn what an op computes; minisft/kernels/fast.py computes the same with the
same signatures, faster on the CPU, and the tests hold the two equal. Shapes: x (..., n)
unless said otherwise; every kernel works in its inputs' dtype, on their device.
"""
import math

import numpy

from minisft.engine.backend import get_array_module, index_add
from minisft.kernels import erf_coefficients as table


# --- erf and the normal CDF ---------------------------------------------------------------
def _chebyshev(coefficients, interval, t):
    """sum_k c_k T_k(u) at u = t mapped from `interval` to [-1, 1] (Clenshaw's recurrence)."""
    lo, hi = interval
    u = (t - (lo + hi) / 2) * (2 / (hi - lo))
    b1 = b2 = 0.0
    for c in coefficients[:0:-1]:
        b1, b2 = 2 * u * b1 - b2 + c, b1
    return u * b1 - b2 + coefficients[0]


def erf(x):
    """erf(x), evaluated in float64 from the Chebyshev tables of tools/fit_erf.py (max error
    4e-15), then rounded to x's dtype."""
    xp = get_array_module(x)
    x64 = x.astype(numpy.float64)
    t = x64 * x64
    inner = x64 * _chebyshev(table.SMALL, table.SMALL_RANGE, xp.minimum(t, 4.0))     # |x| < 2
    w = 1 / xp.clip(t, 4.0, 36.0)
    erfc_tail = xp.exp(-t) * _chebyshev(table.LARGE, table.LARGE_RANGE, w) * xp.sqrt(w)
    outer = xp.sign(x64) * (1 - erfc_tail)                                            # |x| >= 2
    return xp.where(t < 4.0, inner, outer).astype(x.dtype)


def normal_cdf(x):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2, the standard normal CDF."""
    return (0.5 * (1 + erf(x.astype(numpy.float64) / math.sqrt(2)))).astype(x.dtype)


# --- GELU ---------------------------------------------------------------------------------
def gelu_forward(x, slope=False, into=None, slope_into=None):
    """y = x Phi(x), into `into` when given (x itself: GELU in place); with slope, (y, dy/dx)
    where dy/dx = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi), into `slope_into`
    when given: backward then needs only dy/dx (one array, not two)."""
    xp = get_array_module(x)
    cdf = normal_cdf(x)
    dy = _into(slope_into, cdf + x * (xp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi)))) if slope else None
    y = _into(into, x * cdf)
    return (y, dy) if slope else y


_TANH_K = math.sqrt(2 / math.pi)
_TANH_C = 0.044715


def gelu_tanh_forward(x, slope=False, into=None, slope_into=None):
    """y = x (1 + tanh u) / 2, u = sqrt(2/pi) (x + 0.044715 x^3), into `into` when given; with
    slope, (y, dy/dx) where dy/dx = (1 + tanh u) / 2 + x (1 - tanh^2 u) du/dx / 2,
    du/dx = sqrt(2/pi) (1 + 3 0.044715 x^2), into `slope_into` when given."""
    xp = get_array_module(x)
    th = xp.tanh(_TANH_K * (x + _TANH_C * x ** 3))
    du = _TANH_K * (1 + 3 * _TANH_C * x * x)
    dy = _into(slope_into, 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * du) if slope else None
    y = _into(into, 0.5 * x * (1 + th))
    return (y, dy) if slope else y


def _into(into, y):
    """y, or `into` holding y's values when given (the fast kernels write there directly)."""
    if into is None:
        return y
    into[...] = y
    return into


# --- softmax family (last axis) -----------------------------------------------------------
def softmax_forward(x):
    """y_i = exp(x_i - max x) / sum_j exp(x_j - max x)."""
    e = get_array_module(x).exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward(y, g):
    """dx_i = y_i (g_i - sum_j g_j y_j)."""
    return y * (g - (g * y).sum(axis=-1, keepdims=True))


def log_softmax_forward(x):
    """y_i = x_i - max x - log sum_j exp(x_j - max x)."""
    xp = get_array_module(x)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def log_softmax_backward(y, g):
    """dx_i = g_i - exp(y_i) sum_j g_j."""
    return g - get_array_module(y).exp(y) * g.sum(axis=-1, keepdims=True)


def _sum_rows(a):
    """Sum over the rows (axis 0), accumulated in float64, in a's dtype."""
    return a.sum(axis=0, dtype=numpy.float64).astype(a.dtype)


# --- linear -------------------------------------------------------------------------------
def linear_forward(x, weight, bias):
    """y = x W^T + b. x: (rows, in), weight: (out, in), bias: (out,) or None."""
    y = x @ weight.T
    return y if bias is None else y + bias


def linear_backward(g, x, weight, needs):
    """dx = g W, dW = g^T x, db = sum over rows of g; None where `needs` says no (x is None
    when dW is not needed, weight when dx is not)."""
    gx = g @ weight if needs[0] else None
    gw = g.T @ x if needs[1] else None
    gb = _sum_rows(g) if needs[2] else None
    return gx, gw, gb


# --- attention ----------------------------------------------------------------------------
def attention_forward(q, k, v, bias, keep, scale, dropout_scale, out):
    """out = dropout(softmax(q k^T scale + bias)) v, written into `out`.
    q: (batch..., Lq, d), k: (batch..., Lk, d), v: (batch..., Lk, dv), bias: None or
    broadcasting to the (batch..., Lq, Lk) scores, keep: None or the dropout's boolean mask
    of the scores' shape, kept entries scaled by dropout_scale = 1 / (1 - p).
    Returns what attention_backward needs: (q, k, v, probs)."""
    scale, dropout_scale = q.dtype.type(scale), q.dtype.type(dropout_scale)  # no widening
    scores = (q @ k.swapaxes(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    probs = softmax_forward(scores)
    dropped = probs if keep is None else probs * keep * dropout_scale
    out[...] = dropped @ v
    return q, k, v, probs


def attention_backward(g, saved, keep, scale, dropout_scale, gq, gk, gv, g_bias):
    """Fill the gradients asked for (None: not needed) from g (batch..., Lq, dv):
        dv = dropped^T g                   (term 1: the product with v)
        d_dropped = g v^T
        d_probs = d_dropped * keep * 1/(1-p)   (term 2: dropout)
        d_scores = softmax_backward(probs, d_probs)
        dq = d_scores k scale, dk = d_scores^T q scale, d_bias = d_scores   (term 3: q k^T)"""
    q, k, v, probs = saved
    scale, dropout_scale = q.dtype.type(scale), q.dtype.type(dropout_scale)
    dropped = probs if keep is None else probs * keep * dropout_scale
    if gv is not None:
        gv[...] = dropped.swapaxes(-1, -2) @ g
    d_probs = g @ v.swapaxes(-1, -2)
    if keep is not None:
        d_probs = d_probs * keep * dropout_scale
    d_scores = softmax_backward(probs, d_probs)
    if gq is not None:
        gq[...] = (d_scores @ k) * scale
    if gk is not None:
        gk[...] = (d_scores.swapaxes(-1, -2) @ q) * scale
    if g_bias is not None:
        g_bias[...] = d_scores


# --- LayerNorm (rows, features) -------------------------------------------------------------
def layer_norm_forward(x, weight, bias, eps):
    """y = xhat w + b, xhat = (x - mean) / sqrt(var + eps) per row (biased variance).
    Returns (y, xhat, rstd) with rstd = 1 / sqrt(var + eps) of shape (rows, 1)."""
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    rstd = 1 / get_array_module(x).sqrt(var + eps)
    xhat = centered * rstd
    y = xhat if weight is None else xhat * weight
    return (y if bias is None else y + bias), xhat, rstd


def layer_norm_backward(g, xhat, rstd, weight, need_params):
    """With dxhat = g w:
        dx = rstd (dxhat                     (term 1)
                   - mean(dxhat)             (term 2: through the mean)
                   - xhat mean(dxhat xhat))  (term 3: through the variance)
        dw = sum over rows of g xhat, db = sum over rows of g (when need_params)."""
    dxhat = g if weight is None else g * weight
    term2 = dxhat.mean(axis=-1, keepdims=True)
    term3 = xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    dx = rstd * (dxhat - term2 - term3)
    if not need_params:
        return dx, None, None
    return dx, _sum_rows(g * xhat), _sum_rows(g)


# --- dropout ------------------------------------------------------------------------------
def dropout(x, keep, scale, into=None):
    """x * keep * scale: inverted dropout's forward, and its backward on the gradient; into
    `into` when given (x itself: in place)."""
    return _into(into, x * keep * scale)


# --- cross-entropy ------------------------------------------------------------------------
def cross_entropy_forward(logits, target, valid, label_smoothing):
    """Per row: -(1 - s) log p[target] - s mean_c log p[c], 0 where not valid.
    logits: (N, C), target: (N,) in [0, C), valid: (N,) bool. Returns (loss, log p)."""
    xp = get_array_module(logits)
    logp = log_softmax_forward(logits)
    picked = logp[xp.arange(logits.shape[0]), target]
    loss = -((1 - label_smoothing) * picked + label_smoothing * logp.mean(axis=-1))
    return xp.where(valid, loss, 0).astype(logits.dtype), logp


def cross_entropy_backward(logp, target, valid, g, label_smoothing):
    """dlogits = (softmax - (1 - s) onehot(target) - s / C) g per valid row."""
    xp = get_array_module(logp)
    classes = logp.shape[1]
    onehot = xp.zeros_like(logp)
    onehot[xp.arange(logp.shape[0]), target] = 1
    smoothed = (1 - label_smoothing) * onehot + label_smoothing / classes
    return ((xp.exp(logp) - smoothed) * xp.where(valid, g, 0)[:, None]).astype(logp.dtype)


# --- embedding ----------------------------------------------------------------------------
def embedding_backward(ids, g, num_embeddings, padding_idx):
    """dW[i] = sum of g's rows whose id is i (none for padding_idx). ids: (n,), g: (n, dim)."""
    grad = get_array_module(g).zeros((num_embeddings, g.shape[1]), dtype=g.dtype)
    index_add(grad, ids, g)
    if padding_idx is not None:
        grad[padding_idx] = 0
    return grad


# --- Adam(W) ------------------------------------------------------------------------------
def adam_update(param, grad, exp_avg, exp_avg_sq, *, decay, beta1, beta2, eps, step_size, bias_correction2):
    """One Adam step in place (torch.optim's order of operations):
        p = p * decay                         (AdamW's decoupled weight decay, when decay is given)
        m = beta1 m + (1 - beta1) g
        v = beta2 v + (1 - beta2) g^2
        p = p - step_size m / (sqrt(v) / bias_correction2 + eps)
    with step_size = lr / (1 - beta1^t), bias_correction2 = sqrt(1 - beta2^t)."""
    if decay is not None:
        param *= decay
    exp_avg += (grad - exp_avg) * (1 - beta1)
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * grad * grad
    denom = get_array_module(param).sqrt(exp_avg_sq) / bias_correction2 + eps
    param -= step_size * (exp_avg / denom)
