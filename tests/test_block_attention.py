"""Block attention (minisft.lean.attention, from block_from keys on): the same outputs and
gradients as whole attention, dropout masks remade exactly in backward, and no (..., L, L)
array kept."""
import numpy as np
import pytest

import minisft
from minisft.lean import attention


@pytest.fixture
def small_blocks(monkeypatch):
    """3 query rows a block (a last block of 2 rows for 11)."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 3)


def _attention_and_grads(packed, blocked, dropout_p=0.0):
    block_from = 8 if blocked else None
    rng = np.random.default_rng(0)
    bias = np.where(rng.random((2, 1, 1, 11)) < 0.2, -1e9, 0.0).astype(np.float32)
    if packed:
        x = minisft.tensor(rng.standard_normal((2, 11, 3 * 8)), requires_grad=True)
        minisft.manual_seed(3)
        out = attention.multi_head_attention(x, 2, bias, dropout_p=dropout_p, block_from=block_from)
        inputs = [x]
    else:
        inputs = [minisft.tensor(rng.standard_normal((2, 2, 11, 4)), requires_grad=True) for _ in range(3)]
        minisft.manual_seed(3)
        out = attention.scaled_dot_product_attention(*inputs, bias, dropout_p=dropout_p, block_from=block_from)
    out.backward(minisft.tensor(rng.standard_normal(out.shape)))
    return out.numpy(), [t.grad for t in inputs]


@pytest.mark.parametrize("packed", [False, True])
def test_blocks_give_whole_attention_s_outputs_and_gradients(kernel_set, packed, small_blocks):
    """kernel_set: both kernel sets (conftest)."""
    whole, whole_grads = _attention_and_grads(packed, False)
    blocked, blocked_grads = _attention_and_grads(packed, True)
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(blocked_grads, whole_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_backward_remakes_each_block_s_dropout_mask(kernel_set, small_blocks):
    rng = np.random.default_rng(1)
    q, k, v = (minisft.tensor(rng.standard_normal((1, 2, 10, 3)), requires_grad=True) for _ in range(3))

    def blocks(q, k, v):
        minisft.manual_seed(7)  # the same masks in every evaluation
        return attention.scaled_dot_product_attention(q, k, v, dropout_p=0.3, block_from=8)

    assert minisft.gradcheck(blocks, [q, k, v])


def test_no_array_of_the_scores_size_is_kept_at_512():
    rng = np.random.default_rng(2)
    x = minisft.tensor(rng.standard_normal((1, 512, 3 * 8)), requires_grad=True)
    out = attention.multi_head_attention(x, 2, dropout_p=0.1, block_from=128)
    node = out._ctx
    kept = [a for a in node.saved if hasattr(a, "shape")]
    assert node.blocks and all(a.shape[-2:] != (512, 512) for a in kept)
    out.sum().backward()
    assert x.grad.shape == x.shape and np.isfinite(x.grad).all()
