"""What the shared op cases do not cover: erf accuracy, dropout, loss edge cases."""
import math
import tracemalloc

import numpy as np
import pytest

import minisft
import minisft.functional as F
from minisft.lean import attention, feed_forward
from conftest import assert_close


@pytest.mark.parametrize("dtype, tolerance", [(np.float32, 1e-7), (np.float64, 5e-15)])
def test_erf_accuracy_against_math_erf(device, dtype, tolerance):
    x = np.concatenate([np.linspace(-8, 8, 40001), [0.0, 1e-30, -1e-8, 0.999, 1.0, 1.001]]).astype(dtype)
    ours = minisft.Device("cpu").put(F.erf(minisft.Device(device).put(x)))
    assert ours.dtype == dtype
    reference = np.array([math.erf(v) for v in x.astype(np.float64)])
    assert np.abs(ours - reference).max() < tolerance


def test_erf_rejects_integers():
    with pytest.raises(TypeError, match="float32 or float64"):
        F.erf(np.arange(3))


def test_dropout_is_seeded_inverted_and_off_in_eval(device):
    x = minisft.tensor(np.ones((200, 500)), requires_grad=True, device=device)
    minisft.manual_seed(3)
    first = F.dropout(x, 0.1)
    minisft.manual_seed(3)
    second = F.dropout(x, 0.1)
    assert_close(first, second.numpy())
    values = first.numpy()
    kept = values != 0
    assert abs(kept.mean() - 0.9) < 0.01
    assert_close(values[kept], np.full(kept.sum(), 1 / 0.9))
    first.sum().backward()
    assert_close(x.grad, values)  # gradient = mask / (1 - p)
    assert F.dropout(x, 0.1, training=False) is x
    assert F.dropout(x, 0.0) is x
    assert (F.dropout(x, 1.0).numpy() == 0).all()
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        F.dropout(x, 1.5)


def test_cross_entropy_all_ignored_is_nan_like_torch():
    logits = minisft.tensor(np.zeros((2, 3)), requires_grad=True)
    loss = F.cross_entropy(logits, np.array([-100, -100]))
    assert math.isnan(loss.item())


def test_cross_entropy_rejects_out_of_range_targets():
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        F.cross_entropy(minisft.tensor(np.zeros((2, 3))), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"target shape \(3,\)"):
        F.cross_entropy(minisft.tensor(np.zeros((2, 3))), np.array([0, 1, 2]))


def test_bce_with_logits_is_stable_for_huge_logits():
    x = minisft.tensor([-1e4, 1e4], requires_grad=True)
    loss = F.binary_cross_entropy_with_logits(x, np.array([0.0, 1.0], np.float32))
    loss.backward()
    assert loss.item() == 0.0 and np.isfinite(x.grad).all()


def test_embedding_rejects_out_of_range_ids():
    with pytest.raises(IndexError, match="index 7 out of range for a table of 5 rows"):
        F.embedding(np.array([1, 7]), minisft.tensor(np.zeros((5, 2))))


def test_linear_shape_error():
    with pytest.raises(ValueError, match=r"last dim must be 4"):
        F.linear(minisft.tensor(np.zeros((2, 3))), minisft.tensor(np.zeros((5, 4))))


def test_masked_softmax_rows_match_unmasked_subset():
    """Positions filled with the dtype's most negative value get exactly zero weight."""
    x = np.random.default_rng(0).standard_normal((1, 5)).astype(np.float32)
    mask = np.array([[False, False, False, True, True]])
    masked = F.softmax(minisft.tensor(x).masked_fill(mask, np.finfo(np.float32).min), dim=-1)
    alone = F.softmax(minisft.tensor(x[:, :3]), dim=-1)
    assert_close(masked.numpy()[:, :3], alone.numpy(), atol=1e-7)
    assert (masked.numpy()[:, 3:] == 0).all()


def _seeded(fn, seed=5):
    """fn with the generator reset before each call: the same dropout mask every time."""
    def call(*args):
        minisft.manual_seed(seed)
        return fn(*args)
    return call


def test_attention_with_dropout_gradcheck_and_expectation(device):
    rng = np.random.default_rng(0)
    q, k, v = (minisft.tensor(rng.standard_normal(s), device=device) for s in [(2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 2)])
    bias = minisft.tensor(rng.standard_normal((2, 1, 1, 6)), device=device)
    minisft.gradcheck(_seeded(lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, b, dropout_p=0.3)),
                      [q, k, v, bias])
    # the mask drops whole probabilities: with p = 0 it is plain attention
    plain = F.scaled_dot_product_attention(q, k, v, bias)
    assert_close(F.scaled_dot_product_attention(q, k, v, bias, dropout_p=0.0), plain.numpy(), atol=0)


def test_attention_broadcasts_batch_dims_and_takes_unbatched_inputs(device):
    rng = np.random.default_rng(1)
    q = minisft.tensor(rng.standard_normal((2, 3, 4, 5)), device=device)
    k, v = (minisft.tensor(rng.standard_normal(s), device=device) for s in [(1, 3, 6, 5), (3, 6, 2)])
    minisft.gradcheck(F.scaled_dot_product_attention, [q, k, v])
    q2, k2, v2 = (minisft.tensor(rng.standard_normal(s), device=device) for s in [(4, 5), (6, 5), (6, 2)])
    minisft.gradcheck(F.scaled_dot_product_attention, [q2, k2, v2])
    batched = F.scaled_dot_product_attention(q2.reshape(1, 4, 5), k2.reshape(1, 6, 5), v2.reshape(1, 6, 2))
    assert_close(F.scaled_dot_product_attention(q2, k2, v2), batched.numpy()[0], atol=1e-12)


def test_multi_head_attention_equals_attention_on_the_split_heads(device):
    rng = np.random.default_rng(2)
    batch, length, heads, size = 2, 5, 3, 4
    qkv = minisft.tensor(rng.standard_normal((batch, length, 3 * heads * size)), requires_grad=True, device=device)
    bias = minisft.tensor(rng.standard_normal((batch, 1, 1, length)), requires_grad=True, device=device)
    context, probs = attention.multi_head_attention(qkv, heads, bias, need_weights=True)
    split = qkv.reshape(batch, length, 3, heads, size)
    q, k, v = (split[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    expected, expected_probs = F.scaled_dot_product_attention(q, k, v, bias, need_weights=True)
    expected = expected.permute(0, 2, 1, 3).reshape(batch, length, heads * size)
    assert_close(context, expected.numpy(), atol=1e-6)
    assert_close(probs, expected_probs.numpy(), atol=1e-6)
    g = rng.standard_normal(context.shape).astype(np.float32)
    context.backward(g)
    ours = qkv.grad.copy(), bias.grad.copy()
    qkv.grad = bias.grad = None
    expected.backward(g)
    assert_close(ours[0], qkv.grad, atol=1e-6)
    assert_close(ours[1], bias.grad, atol=1e-6)
    minisft.gradcheck(_seeded(lambda x, b: attention.multi_head_attention(x, heads, b, dropout_p=0.2)), [qkv, bias])


def test_multi_head_attention_rejects_a_size_that_is_not_three_heads():
    with pytest.raises(ValueError, match=r"last dim 10 is not 3 x num_heads \(2\)"):
        attention.multi_head_attention(minisft.tensor(np.zeros((1, 2, 10))), 2)


def _linear_gelu_linear(rng, rows=256, features=16, inner=64):
    x = minisft.tensor(rng.standard_normal((rows, features)).astype(np.float32), requires_grad=True)
    w1, w2 = (minisft.tensor(rng.standard_normal(s).astype(np.float32) * 0.1, requires_grad=True)
              for s in [(inner, features), (features, inner)])
    return x, w1, w2, F.linear(F.gelu(F.linear(x, w1)), w2).sum()


def test_the_last_backward_frees_what_forward_kept_as_it_goes():
    """On the graph's last walk the second Linear makes dW, drops its input (GELU's output),
    then makes dx, and GELU makes its gradient in its own slope: no (rows, inner) array is
    made beside the two that forward kept."""
    inner_bytes = 256 * 64 * 4
    tracemalloc.start()  # before forward: the frees of what it kept are counted
    try:
        x, w1, w2, loss = _linear_gelu_linear(np.random.default_rng(0))
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        loss.backward()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - before < inner_bytes // 2, (peak - before, inner_bytes)


def test_a_retained_graph_keeps_what_backward_would_free():
    """backward(retain_graph=True) leaves the saved arrays as they were: a second walk gives
    the same gradients (GELU's slope is not overwritten by its gradient)."""
    x, w1, w2, loss = _linear_gelu_linear(np.random.default_rng(1))
    loss.backward(retain_graph=True)
    first = [t.grad.copy() for t in (x, w1, w2)]
    for t in (x, w1, w2):
        t.grad = None
    loss.backward()
    for grad, t in zip(first, (x, w1, w2)):
        assert np.array_equal(grad, t.grad)


@pytest.mark.parametrize("activation", [lambda x, **kw: F.gelu(x, **kw), lambda x, **kw: F.gelu(x, "tanh", **kw),
                                        lambda x, **kw: F.relu(x, **kw)], ids=["gelu", "gelu_tanh", "relu"])
def test_activations_in_place_write_over_their_input(device, activation):
    """inplace=True: the result is the input's own array, with the values and the gradient of
    the op out of place, a non-contiguous input included; a parameter is refused."""
    rng = np.random.default_rng(6)
    x = minisft.tensor(rng.standard_normal((5, 8)) * 3, requires_grad=True, device=device)
    g = rng.standard_normal((5, 8))
    for view in (lambda t: t, lambda t: t.T):
        expected = activation(view(x))
        expected.backward(minisft.tensor(g, device=device).reshape(expected.shape))
        expected_grad, x.grad = x.grad.copy(), None
        product = view(x * 1.0)
        out = activation(product, inplace=True)
        assert out.data is product.data
        assert_close(out, expected.numpy(), atol=1e-12)
        out.backward(minisft.tensor(g, device=device).reshape(out.shape))
        assert_close(x.grad, expected_grad, atol=1e-12)
        x.grad = None
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        activation(x, inplace=True)


def test_dropout_and_add_in_place_write_over_their_first_input(device):
    """F.dropout(inplace=True) and ops.add_ (a residual connection's tail): the result is the
    first input's own array, with the values and gradients of the ops out of place."""
    from minisft.engine.ops import add_

    rng = np.random.default_rng(13)
    x = minisft.tensor(rng.standard_normal((4, 6)), requires_grad=True, device=device)
    residual = minisft.tensor(rng.standard_normal((4, 6)), requires_grad=True, device=device)
    bias = minisft.tensor(rng.standard_normal(6), requires_grad=True, device=device)
    g = minisft.tensor(rng.standard_normal((4, 6)), device=device)
    results = []
    for inplace in (False, True):
        minisft.manual_seed(3)
        product = x * 1.0
        dropped = F.dropout(product, 0.4, inplace=inplace)
        out = add_(dropped, residual) if inplace else dropped + residual
        out = add_(out, bias) if inplace else out + bias
        assert (out.data is product.data) == inplace
        out.backward(g)
        results.append([out.numpy()] + [t.grad.copy() for t in (x, residual, bias)])
        for t in (x, residual, bias):
            t.grad = None
    for ours, expected in zip(*results):
        assert_close(ours, expected, atol=1e-12)
    minisft.gradcheck(lambda a, b: add_(a * 1.0, b), [x, bias])
    with pytest.raises(ValueError, match="would widen"):
        add_(bias * 1.0, x)


def test_gelu_in_place_makes_one_array_fewer_at_its_peak():
    """Linear -> GELU in place: the forward's peak holds the product (becoming GELU's output)
    and the slope, one (rows, inner) array fewer than out of place."""
    rng = np.random.default_rng(7)
    rows, inner = 1024, 1024
    x = minisft.tensor(rng.standard_normal((rows, 16)).astype(np.float32))
    w = minisft.tensor(rng.standard_normal((inner, 16)).astype(np.float32), requires_grad=True)
    peaks = {}
    for inplace in (False, True):
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            y = F.gelu(F.linear(x, w), inplace=inplace)
            peaks[inplace] = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        del y
    assert peaks[True] <= peaks[False] - 0.9 * rows * inner * 4, peaks


def _feed_forward_inputs(rng, trainable, rows=2500, features=8, inner=32, dtype=np.float32):
    """x (2, rows / 2, features) and (w1, b1, w2, b2); `trainable`: whether x, the first
    Linear and the second need gradients (2500 rows: three chunks, the last one short)."""
    def tensor(shape, grad, scale=1.0):
        return minisft.tensor((rng.standard_normal(shape) * scale).astype(dtype), requires_grad=grad)
    x = tensor((2, rows // 2, features), trainable[0])
    return [x, tensor((inner, features), trainable[1], 0.3), tensor((inner,), trainable[1]),
            tensor((features, inner), trainable[2], 0.3), tensor((features,), trainable[2])]


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("trainable", [(True, True, True), (True, False, False), (False, True, False),
                                       (False, False, True), (True, False, True)])
def test_feed_forward_is_linear_gelu_linear_to_the_bit(kernel_set, trainable, approximate, lean):
    """feed_forward.feed_forward gives the output and every gradient of linear, gelu and linear, whatever
    needs a gradient; a retained graph walked twice gives the same gradients. With the fast
    kernels bit for bit: their products go by fixed tiles of rows, so chunks of rows give the
    same products. The reference kernels' whole-array products may round differently for
    fewer rows (BLAS blocks by size), and so may W2's gradient under lean_activations (a sum
    over chunks of rows). Those are float32 sums of the same n terms in another order: each
    order is within (n - 1) eps sum|terms| of the exact sum (Higham, recursive summation),
    so the two within twice that, element by element (n: the rows, or the inner size for
    the products whose sums run over it)."""
    tensors = _feed_forward_inputs(np.random.default_rng(8), trainable)
    v = minisft.tensor(np.random.default_rng(9).standard_normal((2, 1250, 8)).astype(np.float32))
    results = []
    for fused in (True, False):
        x, w1, b1, w2, b2 = tensors
        with feed_forward.lean_activations(lean):
            out = (feed_forward.feed_forward(x, w1, b1, w2, b2, approximate) if fused
                   else F.linear(F.gelu(F.linear(x, w1, b1), approximate), w2, b2))
        loss = (out * v).sum()
        walks = []
        for retain in ((True, False) if fused else (False,)):
            loss.backward(retain_graph=retain)
            walks.append([None if t.grad is None else t.grad.copy() for t in tensors])
            for t in tensors:
                t.grad = None
        results.append((out.numpy(), walks))
    (fused_out, fused_walks), (plain_out, (plain_grads,)) = results

    bounds = _feed_forward_sum_bounds(tensors, v)

    def same(actual, expected, exact, bound):
        assert np.array_equal(actual, expected) if exact else (np.abs(actual - expected) <= bound).all()

    same(fused_out, plain_out, kernel_set == "fast", bounds[0])
    for grads in fused_walks:
        for index, (grad, expected, tensor) in enumerate(zip(grads, plain_grads, tensors)):
            assert (grad is None) == (not tensor.requires_grad)
            if grad is not None:
                same(grad, expected, kernel_set == "fast" and not (lean and index == 3), bounds[index + 1])


def _feed_forward_sum_bounds(tensors, v):
    """Element by element, how far two float32 orders of the sums in linear, gelu, linear
    (loss sum(out * v)) may put the output and each gradient apart: each order is within
    gamma_N = N eps of the exact value relative to the same chain of sums taken over
    absolute values (Higham's bound for recursive summation, chained), N the lengths of the
    sums in the chain (features + inner + rows), so the two within twice that. |gelu(h)| <=
    |h| in both forms, and |gelu'| <= 1.13."""
    x, w1, b1, w2, b2 = (abs(t.numpy().astype(np.float64)) for t in tensors)
    x = x.reshape(-1, x.shape[-1])
    g = abs(v.numpy().astype(np.float64)).reshape(-1, v.shape[-1])
    y = x @ w1.T + b1  # bounds |h| and |gelu(h)|
    gh = (g @ w2) * 1.13  # bounds |dloss/dh|
    magnitudes = [(y @ w2.T + b2).reshape(v.shape), (gh @ w1).reshape(tensors[0].shape), gh.T @ x, gh.sum(0),
                  g.T @ y, g.sum(0)]
    chain = x.shape[1] + w1.shape[0] + len(x)
    return [2 * chain * (np.finfo(np.float32).eps / 2) * m for m in magnitudes]



def test_feed_forward_gradcheck_and_shape_errors():
    x, w1, b1, w2, b2 = _feed_forward_inputs(np.random.default_rng(10), (True, True, True), rows=6, features=3,
                                             inner=5, dtype=np.float64)
    minisft.gradcheck(lambda *a: feed_forward.feed_forward(*a), [x, w1, b1, w2, b2])
    minisft.gradcheck(lambda *a: feed_forward.feed_forward(*a, approximate="tanh"), [x, w1, b1, w2, b2])
    with feed_forward.lean_activations():
        minisft.gradcheck(lambda *a: feed_forward.feed_forward(*a), [x, w1, b1, w2, b2])
    with pytest.raises(ValueError, match="do not chain"):
        feed_forward.feed_forward(x, w1, b1, w1, b1)
    with pytest.raises(ValueError, match="approximate"):
        feed_forward.feed_forward(x, w1, b1, w2, b2, approximate="erf")


FEED_FORWARD_INNER_BYTES = 4096 * 1024 * 4  # one (rows, inner) float32 array of _feed_forward_peaks


def _feed_forward_peaks(trainable, seed, runs):
    """{name: (kept, forward peak, backward peak)} in bytes (tracemalloc) of each of `runs`,
    {name: run(x, w1, b1, w2, b2) -> output}, on 4096 rows of 16 features, 1024 inner."""
    tensors = _feed_forward_inputs(np.random.default_rng(seed), trainable, rows=4096, features=16, inner=1024)
    g = np.random.default_rng(seed + 1).standard_normal(tensors[0].shape).astype(np.float32)
    peaks = {}
    for name, run in runs.items():
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            out = run(*tensors)
            kept, forward = (value - start for value in tracemalloc.get_traced_memory())
            tracemalloc.reset_peak()
            out.backward(minisft.tensor(g))
            peaks[name] = kept, forward, tracemalloc.get_traced_memory()[1] - start
        finally:
            tracemalloc.stop()
        del out
        for t in tensors:
            t.grad = None
    return peaks


def test_feed_forward_with_frozen_weights_keeps_only_the_slope_and_makes_no_inner_array_beside_it():
    """LoRA's feed-forward (both weights frozen): forward goes by chunks of rows, so its peak
    is about one (rows, inner) array (the slope it keeps) below linear, gelu and linear's;
    backward makes the gradient at the pre-activation inside the slope, again about one
    (rows, inner) array below."""
    peaks = _feed_forward_peaks((True, False, False), 11, {
        "fused": feed_forward.feed_forward,
        "plain": lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1), inplace=True), w2, b2)})
    (kept, forward, backward), (_, plain_forward, plain_backward) = peaks["fused"], peaks["plain"]
    assert FEED_FORWARD_INNER_BYTES <= kept < 1.5 * FEED_FORWARD_INNER_BYTES, peaks
    assert forward <= plain_forward - 0.5 * FEED_FORWARD_INNER_BYTES, peaks
    assert backward <= plain_backward - 0.5 * FEED_FORWARD_INNER_BYTES, peaks


def test_lean_feed_forward_keeps_its_pre_activation_alone():
    """Under lean_activations, with every weight trainable, the feed-forward keeps one
    (rows, inner) array (h) where it keeps two (GELU's output and slope); backward, which
    remakes them chunk by chunk, peaks within a quarter of such an array of the plain one's
    (a chunk is a quarter of these rows)."""
    def lean(*tensors):
        with feed_forward.lean_activations():
            return feed_forward.feed_forward(*tensors)
    peaks = _feed_forward_peaks((True, True, True), 13, {"lean": lean, "plain": feed_forward.feed_forward})
    (kept, _, backward), (plain_kept, _, plain_backward) = peaks["lean"], peaks["plain"]
    assert FEED_FORWARD_INNER_BYTES <= kept < 1.2 * FEED_FORWARD_INNER_BYTES <= 0.6 * plain_kept, peaks
    assert backward <= plain_backward + 0.25 * FEED_FORWARD_INNER_BYTES, peaks


def test_add_columns_adds_each_part_into_its_columns_in_place(device):
    """ops.add_columns_ (LoRA's updates into the packed Q/K/V product): the sum, in the packed
    array itself, and gradient-checked."""
    from minisft.engine.ops import add_columns_

    rng = np.random.default_rng(4)
    packed = minisft.tensor(rng.standard_normal((2, 3, 9)), device=device)
    a, b = (minisft.tensor(rng.standard_normal((2, 3, 3)), device=device) for _ in range(2))
    expected = packed.numpy().copy()
    expected[..., :3] += a.numpy()
    expected[..., 6:] += b.numpy()
    fresh = packed * 1.0
    out = add_columns_(fresh, [a, b], [0, 6])
    assert_close(out, expected, atol=1e-12)
    assert out.data is fresh.data  # no copy
    minisft.gradcheck(lambda p, a, b: add_columns_(p * 1.0, [a, b], [0, 6]), [packed, a, b])


@pytest.mark.parametrize("shared", [True, False], ids=["broadcast-table", "full-index"])
def test_gather_equals_torch_and_gradchecks(shared):
    """F.gather (torch.gather) along the last dim, with repeated positions (clipped distances, as
    DeBERTa reads them): the broadcast (L, K) table takes the one-scatter path, a full index the
    general one; and along another dim."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 7))
    table = np.clip(np.arange(5)[:, None] - np.arange(6)[None, :] + 3, 0, 6)  # repeats at both ends
    index = np.broadcast_to(table, (2, 3, 5, 6))
    index = index if shared else np.ascontiguousarray(index)
    minisft.gradcheck(lambda a: F.gather(a, -1, index), [x])
    along_heads = rng.integers(0, 3, (2, 3, 5, 7))  # repeats along dim 1 too
    minisft.gradcheck(lambda a: F.gather(a, 1, along_heads), [x])
    torch = pytest.importorskip("torch")
    g = rng.standard_normal(index.shape).astype(np.float32)
    ours = minisft.tensor(x.astype(np.float32), requires_grad=True)
    out = F.gather(ours, -1, index)
    out.backward(g)
    theirs = torch.tensor(x.astype(np.float32), requires_grad=True)
    expected = torch.gather(theirs, -1, torch.tensor(np.ascontiguousarray(index)))
    expected.backward(torch.tensor(g))
    np.testing.assert_array_equal(out.numpy(), expected.detach().numpy())
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), atol=1e-6)  # float32 sums of repeats, another order


def test_gather_names_a_mismatched_index():
    with pytest.raises(ValueError, match=r"gather: index of shape \(2, 4\) for input \(3, 4\) along dim 1"):
        F.gather(minisft.tensor(np.zeros((3, 4), np.float32)), 1, np.zeros((2, 4), np.int64))
