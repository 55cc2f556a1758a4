"""CUDA kernels: the reference kernels' results, with their signatures, fused for an NVIDIA GPU.

The third kernel set, the default on CuPy arrays. Each kernel below is plain CUDA C in
SOURCE, compiled once by CuPy (NVRTC) on first use:
- GELU: y = x Phi(x) and its slope Phi(x) + x phi(x) in one pass (normcdff, float32);
- softmax over rows, with attention's scale, additive bias (broadcast by strides) and
  dropout mask in the same pass, and its backward; one block per row;
- LayerNorm forward and backward: one block per row, mean and variance by block reduction;
- AdamW over every parameter of a step in one launch (`adam_update_many`: pointer tables,
  one grid row per tensor).
Matrix products stay CuPy's (cuBLAS). Kernels not written here are the reference's, and
any dtype other than float32 runs the reference too (mixed precision casts only the
Linear products, minisft.engine.amp).
"""
import math

import numpy

from minisft.engine.backend import get_array_module
from minisft.kernels import reference
from minisft.kernels.reference import (  # noqa: F401  (the rest of the set, as the reference computes it)
    cross_entropy_backward, cross_entropy_forward, dropout, embedding_backward, erf, gelu_tanh_forward, linear_backward,
    linear_forward, log_softmax_backward, log_softmax_forward, normal_cdf)

THREADS = 256  # per block; a multiple of the warp size

SOURCE = r"""
#define WARP 32
#define NEG_INF __int_as_float(0xff800000)

// The sum (or max) of v over the block, returned to every thread. shared: WARP floats.
__device__ float block_reduce(float v, float* shared, bool take_max) {
    for (int offset = WARP / 2; offset > 0; offset >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, v, offset);
        v = take_max ? fmaxf(v, other) : v + other;
    }
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = (blockDim.x + WARP - 1) / WARP;
    __syncthreads();                      // the previous call's result has been read
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : (take_max ? NEG_INF : 0.0f);
    for (int offset = WARP / 2; offset > 0; offset >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, v, offset);
        v = take_max ? fmaxf(v, other) : v + other;
    }
    return v;
}

// y = x Phi(x); slope (when not null) = Phi(x) + x phi(x), what backward multiplies by.
extern "C" __global__ void gelu_forward(const float* x, float* y, float* slope, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {
        float v = x[i], cdf = normcdff(v);
        y[i] = v * cdf;
        if (slope) slope[i] = cdf + v * 0.3989422804014327f * expf(-0.5f * v * v);
    }
}

// One block per row of `cols` scores s: p = softmax(s * scale + bias), written to probs;
// dropped = p * keep * dropout_scale when keep is not null. The bias row of row r is at
// bias + (r / (d1 * d2)) * s0 + (r / d2 % d1) * s1 + (r % d2) * s2 (element strides of a
// broadcast bias: rows are (d0, d1, d2) in C order).
extern "C" __global__ void softmax_rows(const float* scores, float* probs, const float* bias, long long s0,
                                        long long s1, long long s2, long long d1, long long d2,
                                        const unsigned char* keep, float* dropped, float scale,
                                        float dropout_scale, int cols) {
    __shared__ float shared[WARP];
    long long row = blockIdx.x;
    const float* s = scores + row * cols;
    const float* b = bias ? bias + (row / (d1 * d2)) * s0 + (row / d2 % d1) * s1 + (row % d2) * s2 : 0;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, s[j] * scale + (b ? b[j] : 0.0f));
    m = block_reduce(m, shared, true);
    float total = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) total += expf(s[j] * scale + (b ? b[j] : 0.0f) - m);
    float inverse = 1.0f / block_reduce(total, shared, false);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float p = expf(s[j] * scale + (b ? b[j] : 0.0f) - m) * inverse;
        probs[row * cols + j] = p;
        if (keep) dropped[row * cols + j] = keep[row * cols + j] ? p * dropout_scale : 0.0f;
    }
}

// One block per row, in place on d (the gradient of the dropped-out probabilities):
// d = p (d' - sum_j d'_j p_j) with d' = d * keep * dropout_scale (d' = d without keep).
extern "C" __global__ void softmax_backward_rows(const float* probs, float* d, const unsigned char* keep,
                                                 float dropout_scale, int cols) {
    __shared__ float shared[WARP];
    long long base = (long long)blockIdx.x * cols;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float dj = keep ? (keep[base + j] ? d[base + j] * dropout_scale : 0.0f) : d[base + j];
        dot += dj * probs[base + j];
    }
    dot = block_reduce(dot, shared, false);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float dj = keep ? (keep[base + j] ? d[base + j] * dropout_scale : 0.0f) : d[base + j];
        d[base + j] = probs[base + j] * (dj - dot);
    }
}

// One block per row: xhat = (x - mean) rstd, y = xhat w + b (w, b may be null), rstd per row.
extern "C" __global__ void layer_norm_forward(const float* x, const float* w, const float* b, float* y,
                                              float* xhat, float* rstd, int cols, float eps) {
    __shared__ float shared[WARP];
    long long base = (long long)blockIdx.x * cols;
    float total = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) total += x[base + j];
    float mean = block_reduce(total, shared, false) / cols;
    float squares = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float c = x[base + j] - mean;
        squares += c * c;
    }
    float r = rsqrtf(block_reduce(squares, shared, false) / cols + eps);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float h = (x[base + j] - mean) * r;
        xhat[base + j] = h;
        y[base + j] = (w ? h * w[j] : h) + (b ? b[j] : 0.0f);
    }
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

// One block per row: dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = g w.
extern "C" __global__ void layer_norm_backward(const float* g, const float* xhat, const float* rstd,
                                               const float* w, float* dx, int cols) {
    __shared__ float shared[WARP];
    long long base = (long long)blockIdx.x * cols;
    float sum1 = 0.0f, sum2 = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float d = w ? g[base + j] * w[j] : g[base + j];
        sum1 += d;
        sum2 += d * xhat[base + j];
    }
    float mean1 = block_reduce(sum1, shared, false) / cols;
    float mean2 = block_reduce(sum2, shared, false) / cols;
    float r = rstd[blockIdx.x];
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float d = w ? g[base + j] * w[j] : g[base + j];
        dx[base + j] = r * (d - mean1 - xhat[base + j] * mean2);
    }
}

// AdamW on many float32 tensors in one launch: grid row blockIdx.y is tensor t, whose
// param, grad, exp_avg, exp_avg_sq addresses are in the pointer tables and whose
// hyper-parameters are hyper[6 t ...]: decay (1: none), beta1, beta2, eps, step_size,
// bias_correction2. torch.optim.AdamW's order of operations.
extern "C" __global__ void adam_many(const unsigned long long* params, const unsigned long long* grads,
                                     const unsigned long long* exp_avgs, const unsigned long long* exp_avg_sqs,
                                     const long long* sizes, const float* hyper) {
    int t = blockIdx.y;
    float* p = (float*)params[t];
    const float* g = (const float*)grads[t];
    float* m = (float*)exp_avgs[t];
    float* v = (float*)exp_avg_sqs[t];
    const float* h = hyper + 6 * t;
    float decay = h[0], beta1 = h[1], beta2 = h[2], eps = h[3], step_size = h[4], correction2 = h[5];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < sizes[t];
         i += (long long)blockDim.x * gridDim.x) {
        float gi = g[i];
        float pi = p[i] * decay;
        float mi = m[i] + (gi - m[i]) * (1.0f - beta1);
        float vi = v[i] * beta2 + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - step_size * (mi / (sqrtf(vi) / correction2 + eps));
    }
}
"""

_module = None


def _kernel(name):
    """A compiled kernel of SOURCE (compiled once, for the current GPU)."""
    global _module
    if _module is None:
        import cupy

        _module = cupy.RawModule(code=SOURCE, options=("--std=c++14",))
    return _module.get_function(name)


def _ptr(array):
    """An array argument, or a null pointer for None (CuPy passes None as 0xffffffff)."""
    return numpy.uint64(0) if array is None else array


def _float32(*arrays):
    return all(a is None or a.dtype == numpy.float32 for a in arrays)


def _grid(n):
    return (min((n + THREADS - 1) // THREADS, 65535),)


# --- GELU ---------------------------------------------------------------------------------
def gelu_forward(x, slope=False, into=None, slope_into=None):
    if not _float32(x):
        return reference.gelu_forward(x, slope, into, slope_into)
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    y = xp.empty_like(x) if into is None else into  # x itself too: each thread reads x[i] before writing y[i]
    dy = (xp.empty_like(x) if slope_into is None else slope_into) if slope else None
    if x.size:
        _kernel("gelu_forward")(_grid(x.size), (THREADS,), (x, y, _ptr(dy), numpy.int64(x.size)))
    return (y, dy) if slope else y


# --- softmax family (last axis) -----------------------------------------------------------
def _softmax_into(scores, probs, bias=None, keep=None, dropped=None, scale=1.0, dropout_scale=1.0):
    """probs (and dropped) from contiguous scores (..., cols) by softmax_rows."""
    cols = scores.shape[-1]
    rows = scores.size // max(cols, 1)
    strides, dims = (numpy.int64(0),) * 3, (numpy.int64(1),) * 2
    if bias is not None:  # a broadcast view of the scores' shape, read through its strides
        shape = (1,) * (4 - bias.ndim) + bias.shape
        element = [s // bias.itemsize for s in (0,) * (4 - bias.ndim) + bias.strides]
        strides = tuple(numpy.int64(s) for s in element[:3])
        dims = (numpy.int64(shape[1]), numpy.int64(shape[2]))
    if rows:
        _kernel("softmax_rows")((rows,), (THREADS,), (
            scores, probs, _ptr(bias), *strides, *dims, _ptr(keep), _ptr(dropped), numpy.float32(scale),
            numpy.float32(dropout_scale),
            numpy.int32(cols)))


def _bias_readable(bias):
    """A bias the kernel can read by strides: float32, at most 4 dims, contiguous last axis."""
    return (bias is None or (bias.dtype == numpy.float32 and bias.ndim <= 4
                             and bias.strides[-1] in (0, bias.itemsize) and all(s >= 0 for s in bias.strides)))


def softmax_forward(x):
    if not _float32(x):
        return reference.softmax_forward(x)
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    probs = xp.empty_like(x)
    _softmax_into(x, probs)
    return probs


def _softmax_backward_into(probs, d, keep=None, dropout_scale=1.0):
    cols = probs.shape[-1]
    rows = probs.size // max(cols, 1)
    if rows:
        _kernel("softmax_backward_rows")((rows,), (THREADS,), (probs, d, _ptr(keep), numpy.float32(dropout_scale),
                                                                numpy.int32(cols)))


def softmax_backward(y, g):
    if not _float32(y, g):
        return reference.softmax_backward(y, g)
    xp = get_array_module(y)
    d = xp.array(g, order="C", copy=True)
    _softmax_backward_into(xp.ascontiguousarray(y), d)
    return d


# --- attention ----------------------------------------------------------------------------
def _contiguous_keep(keep):
    return None if keep is None else get_array_module(keep).ascontiguousarray(keep).view(numpy.uint8)


def attention_forward(q, k, v, bias, keep, scale, dropout_scale, out):
    if not (_float32(q, k, v) and _bias_readable(bias)):
        return reference.attention_forward(q, k, v, bias, keep, scale, dropout_scale, out)
    xp = get_array_module(q)
    scores = xp.matmul(q, k.swapaxes(-1, -2))          # cuBLAS, batched
    probs = xp.empty_like(scores)
    keep8 = _contiguous_keep(keep)
    dropped = xp.empty_like(scores) if keep is not None else None
    _softmax_into(scores, probs, bias, keep8, dropped, scale, dropout_scale)
    del scores
    out[...] = xp.matmul(probs if dropped is None else dropped, v)
    return q, k, v, probs


def attention_backward(g, saved, keep, scale, dropout_scale, gq, gk, gv, g_bias):
    q, k, v, probs = saved
    if not _float32(g, q, k, v):
        return reference.attention_backward(g, saved, keep, scale, dropout_scale, gq, gk, gv, g_bias)
    xp = get_array_module(g)
    keep8 = _contiguous_keep(keep)
    if gv is not None:
        dropped = probs if keep is None else probs * keep * numpy.float32(dropout_scale)
        gv[...] = xp.matmul(dropped.swapaxes(-1, -2), g)
        del dropped
    d = xp.matmul(g, v.swapaxes(-1, -2))
    _softmax_backward_into(probs, d, keep8, dropout_scale)   # d is now the scores' gradient
    if gq is not None:
        gq[...] = xp.matmul(d, k) * numpy.float32(scale)
    if gk is not None:
        gk[...] = xp.matmul(d.swapaxes(-1, -2), q) * numpy.float32(scale)
    if g_bias is not None:
        g_bias[...] = d


# --- LayerNorm (rows, features) -------------------------------------------------------------
def layer_norm_forward(x, weight, bias, eps):
    if not _float32(x, weight, bias):
        return reference.layer_norm_forward(x, weight, bias, eps)
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    rows, cols = x.shape
    y, xhat = xp.empty_like(x), xp.empty_like(x)
    rstd = xp.empty((rows, 1), dtype=x.dtype)
    if rows:
        _kernel("layer_norm_forward")((rows,), (THREADS,), (x, _ptr(weight), _ptr(bias), y, xhat, rstd, numpy.int32(cols),
                                                             numpy.float32(eps)))
    return y, xhat, rstd


def layer_norm_backward(g, xhat, rstd, weight, need_params):
    if not _float32(g, xhat, weight):
        return reference.layer_norm_backward(g, xhat, rstd, weight, need_params)
    xp = get_array_module(g)
    g = xp.ascontiguousarray(g)
    dx = xp.empty_like(g)
    if g.shape[0]:
        _kernel("layer_norm_backward")((g.shape[0],), (THREADS,), (g, xhat, rstd, _ptr(weight), dx,
                                                                   numpy.int32(g.shape[1])))
    if not need_params:
        return dx, None, None
    return dx, reference._sum_rows(g * xhat), reference._sum_rows(g)


# --- Adam(W) ------------------------------------------------------------------------------
def adam_update(param, grad, exp_avg, exp_avg_sq, **hyper):
    adam_update_many([param], [grad], [exp_avg], [exp_avg_sq], [hyper])


def adam_update_many(params, grads, exp_avgs, exp_avg_sqs, hypers):
    """adam_update on every (param, grad, exp_avg, exp_avg_sq) with its hyper-parameters
    (a dict each, adam_update's keywords), float32 tensors in one launch."""
    import cupy

    fused = [i for i, arrays in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs))
             if _float32(*arrays) and all(a.flags.c_contiguous for a in arrays)]
    for i in sorted(set(range(len(params))) - set(fused)):
        reference.adam_update(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], **hypers[i])
    if not fused:
        return
    tables = [numpy.array([arrays[i].data.ptr for i in fused], dtype=numpy.uint64)
              for arrays in (params, grads, exp_avgs, exp_avg_sqs)]
    sizes = numpy.array([params[i].size for i in fused], dtype=numpy.int64)
    hyper = numpy.array([[1.0 if hypers[i]["decay"] is None else hypers[i]["decay"], hypers[i]["beta1"],
                          hypers[i]["beta2"], hypers[i]["eps"], hypers[i]["step_size"], hypers[i]["bias_correction2"]]
                         for i in fused], dtype=numpy.float32)
    blocks = max(1, min(int(math.ceil(sizes.max() / THREADS)), 1024))
    _kernel("adam_many")((blocks, len(fused)), (THREADS,),
                         tuple(cupy.asarray(a) for a in (*tables, sizes, hyper)))
