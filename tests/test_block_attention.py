"""Block attention (from BLOCKED_FROM keys on): the same outputs and gradients as whole
attention, dropout masks remade exactly in backward, and no (..., L, L) array kept."""
import numpy as np
import pytest

import minisft
import minisft.functional as F


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks from 8 keys on, 3 query rows at a time (a last block of 2 rows for 11)."""
    monkeypatch.setattr(F, "BLOCKED_FROM", 8)
    monkeypatch.setattr(F, "QUERY_BLOCK", 3)


def _attention_and_grads(packed, blocked, monkeypatch, dropout_p=0.0):
    monkeypatch.setattr(F, "BLOCKED_FROM", 8 if blocked else 10 ** 9)
    rng = np.random.default_rng(0)
    bias = np.where(rng.random((2, 1, 1, 11)) < 0.2, -1e9, 0.0).astype(np.float32)
    if packed:
        x = minisft.tensor(rng.standard_normal((2, 11, 3 * 8)), requires_grad=True)
        minisft.manual_seed(3)
        out = F.multi_head_attention(x, 2, bias, dropout_p=dropout_p)
        inputs = [x]
    else:
        inputs = [minisft.tensor(rng.standard_normal((2, 2, 11, 4)), requires_grad=True) for _ in range(3)]
        minisft.manual_seed(3)
        out = F.scaled_dot_product_attention(*inputs, bias, dropout_p=dropout_p)
    out.backward(minisft.tensor(rng.standard_normal(out.shape)))
    return out.numpy(), [t.grad for t in inputs]


@pytest.mark.parametrize("packed", [False, True])
def test_blocks_give_whole_attention_s_outputs_and_gradients(kernel_set, packed, monkeypatch):
    """kernel_set: both kernel sets (conftest)."""
    monkeypatch.setattr(F, "QUERY_BLOCK", 3)
    whole, whole_grads = _attention_and_grads(packed, False, monkeypatch)
    blocked, blocked_grads = _attention_and_grads(packed, True, monkeypatch)
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(blocked_grads, whole_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_backward_remakes_each_block_s_dropout_mask(kernel_set, small_blocks):
    rng = np.random.default_rng(1)
    q, k, v = (minisft.tensor(rng.standard_normal((1, 2, 10, 3)), requires_grad=True) for _ in range(3))

    def attention(q, k, v):
        minisft.manual_seed(7)  # the same masks in every evaluation
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)

    assert minisft.gradcheck(attention, [q, k, v])


def test_no_array_of_the_scores_size_is_kept_at_512():
    rng = np.random.default_rng(2)
    x = minisft.tensor(rng.standard_normal((1, 512, 3 * 8)), requires_grad=True)
    out = F.multi_head_attention(x, 2, dropout_p=0.1)
    node = out._ctx
    kept = [a for group in node.saved if group is not None for a in group if hasattr(a, "shape")]
    assert node.blocks and all(a.shape[-2:] != (512, 512) for a in kept)
    out.sum().backward()
    assert x.grad.shape == x.shape and np.isfinite(x.grad).all()
