"""One list of op cases, run by torch (to make fixtures) and by minisft (to test).

Each case is an expression over a library namespace `L` (torch's or minisft's: the API
names are the same) and its inputs. Float inputs require grad; integer and bool inputs are
plain tensors. The fixture script stores inputs, the output and the gradient of
sum(output * v) for a fixed random v; the tests recompute them with minisft.
"""
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Case:
    name: str
    fn: Callable
    make_inputs: Callable  # rng -> list of arrays
    gradcheck: bool = True
    tags: tuple = field(default=())


def normal(*shape):
    return lambda rng: rng.standard_normal(shape)


def positive(*shape):
    return lambda rng: rng.uniform(0.5, 2.0, shape)


def ints(high, *shape):
    return lambda rng: rng.integers(0, high, shape)


def mask(*shape):
    return lambda rng: rng.random(shape) < 0.4


def inputs(*makers):
    return lambda rng: [make(rng) for make in makers]


def fixed(*arrays):
    return lambda rng: [np.asarray(a) for a in arrays]


def _with_padding_row(rng):
    ids = rng.integers(0, 6, (2, 5))
    ids[0, :2] = 0
    return [rng.standard_normal((6, 3)), ids]


def _targets_with_ignored(rng):
    target = rng.integers(0, 5, 6)
    target[[1, 4]] = -100
    return [rng.standard_normal((6, 5)), target]


CLASS_WEIGHTS = [0.5, 2.0, 1.0, 1.5, 0.25]  # five classes, none of weight 1

CASES = [
    # --- tensor ops ---
    Case("add_broadcast", lambda L, a, b: a + b, inputs(normal(3, 1, 4), normal(2, 4))),
    Case("add_scalar", lambda L, a: 1.5 + a + 2, inputs(normal(2, 3))),
    Case("sub_broadcast", lambda L, a, b: a - b, inputs(normal(2, 3), normal(3))),
    Case("rsub_scalar", lambda L, a: 2.0 - a, inputs(normal(2, 3))),
    Case("mul_broadcast", lambda L, a, b: a * b, inputs(normal(2, 3), normal(1, 3))),
    Case("div_broadcast", lambda L, a, b: a / b, inputs(normal(2, 3), positive(3))),
    Case("rdiv_scalar", lambda L, a: 1.0 / a, inputs(positive(4))),
    Case("neg", lambda L, a: -a, inputs(normal(2, 3))),
    Case("pow_int", lambda L, a: a ** 3, inputs(normal(2, 3))),
    Case("pow_fraction", lambda L, a: a ** 0.5, inputs(positive(2, 3))),
    Case("exp", lambda L, a: a.exp(), inputs(normal(2, 3))),
    Case("log", lambda L, a: a.log(), inputs(positive(2, 3))),
    Case("sqrt", lambda L, a: a.sqrt(), inputs(positive(2, 3))),
    Case("tanh", lambda L, a: a.tanh(), inputs(normal(2, 3))),
    Case("matmul_2d", lambda L, a, b: a @ b, inputs(normal(3, 4), normal(4, 2))),
    Case("matmul_batched_broadcast", lambda L, a, b: a @ b, inputs(normal(2, 1, 3, 4), normal(5, 4, 2))),
    Case("matmul_matrix_vector", lambda L, a, b: a @ b, inputs(normal(2, 3, 4), normal(4))),
    Case("matmul_vector_matrix", lambda L, a, b: a @ b, inputs(normal(4), normal(4, 3))),
    Case("reshape", lambda L, a: a.reshape(3, -1) * 2, inputs(normal(2, 3, 2))),
    Case("permute", lambda L, a: a.permute(2, 0, 1), inputs(normal(2, 3, 4))),
    Case("transpose", lambda L, a: a.transpose(0, 2), inputs(normal(2, 3, 4))),
    Case("T", lambda L, a: a.T, inputs(normal(2, 3))),
    Case("getitem_slices", lambda L, a: a[1:, ::2, None, -1], inputs(normal(3, 4, 2))),
    Case("getitem_int_array_repeated", lambda L, a, i: a[i], inputs(normal(4, 3), fixed([0, 2, 2, 3, 0]))),
    Case("getitem_mixed", lambda L, a, i: a[:, i], inputs(normal(2, 4, 3), fixed([[1, 1], [3, 0]]))),
    Case("getitem_bool_mask", lambda L, a, m: a[m], inputs(normal(3, 4), mask(3, 4))),
    Case("cat", lambda L, a, b: L.cat([a, b, a], dim=1), inputs(normal(2, 3), normal(2, 1))),
    Case("sum_all", lambda L, a: a.sum(), inputs(normal(2, 3))),
    Case("sum_dim_keepdim", lambda L, a: a.sum(dim=1, keepdim=True), inputs(normal(2, 3, 4))),
    Case("sum_dims", lambda L, a: a.sum(dim=(0, 2)), inputs(normal(2, 3, 4))),
    Case("mean_dim", lambda L, a: a.mean(dim=-1), inputs(normal(2, 3, 4))),
    Case("mean_all", lambda L, a: a.mean(), inputs(normal(2, 3))),
    Case("amax_dim", lambda L, a: a.amax(dim=1), inputs(normal(2, 5, 3))),
    Case("amax_all_keepdim", lambda L, a: a.amax(dim=(0, 1), keepdim=True), inputs(normal(3, 4))),
    Case("amax_ties", lambda L, a: a.amax(dim=1), fixed([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]), gradcheck=False),
    Case("where", lambda L, m, a, b: L.where(m, a, b), inputs(mask(2, 3), normal(2, 3), normal(3))),
    Case("masked_fill", lambda L, a, m: a.masked_fill(m, -1e4), inputs(normal(2, 3, 4), mask(2, 1, 4))),
    Case("shared_subgraph", lambda L, a: (a * a + a.exp()) * a.tanh(), inputs(normal(3, 2))),
    # --- functional ---
    Case("linear", lambda L, x, w, b: L.F.linear(x, w, b), inputs(normal(2, 3, 4), normal(5, 4), normal(5))),
    Case("linear_no_bias", lambda L, x, w: L.F.linear(x, w), inputs(normal(3, 4), normal(2, 4))),
    Case("gelu", lambda L, x: L.F.gelu(x), lambda rng: [np.concatenate([rng.standard_normal(20) * 3, [-6.5, -3.9, -1.0, 0.0, 1.0, 4.1, 7.0]])]),
    Case("gelu_tanh", lambda L, x: L.F.gelu(x, approximate="tanh"), inputs(normal(4, 5))),
    Case("relu", lambda L, x: L.F.relu(x), inputs(normal(4, 5))),
    Case("softmax", lambda L, x: L.F.softmax(x, dim=-1), inputs(normal(2, 3, 5))),
    Case("softmax_dim1", lambda L, x: L.F.softmax(x, dim=1), inputs(normal(2, 3, 5))),
    Case("softmax_masked", lambda L, x, m: L.F.softmax(x.masked_fill(m, -3.4028234663852886e38), dim=-1),
         lambda rng: [rng.standard_normal((2, 4)), np.array([[False, True, False, True], [False] * 4])], gradcheck=False),
    Case("attention", lambda L, q, k, v: L.F.scaled_dot_product_attention(q, k, v),
         inputs(normal(2, 3, 4, 5), normal(2, 3, 6, 5), normal(2, 3, 6, 2))),
    Case("attention_bias_scale", lambda L, q, k, v, b: L.F.scaled_dot_product_attention(q, k, v, b, scale=0.3),
         inputs(normal(2, 2, 4, 3), normal(2, 2, 4, 3), normal(2, 2, 4, 3), normal(2, 1, 1, 4))),
    Case("log_softmax", lambda L, x: L.F.log_softmax(x, dim=-1), inputs(normal(3, 5))),
    Case("layer_norm", lambda L, x, w, b: L.F.layer_norm(x, (6,), w, b, 1e-12), inputs(normal(2, 3, 6), normal(6), normal(6))),
    Case("layer_norm_2d", lambda L, x, w, b: L.F.layer_norm(x, (3, 4), w, b, 1e-5), inputs(normal(2, 3, 4), normal(3, 4), normal(3, 4))),
    Case("layer_norm_plain", lambda L, x: L.F.layer_norm(x, (5,)), inputs(normal(3, 5))),
    Case("embedding", lambda L, w, i: L.F.embedding(i, w), inputs(normal(6, 3), ints(6, 2, 5))),
    # padding_idx rows get no gradient by design, so finite differences disagree there.
    Case("embedding_padding_idx", lambda L, w, i: L.F.embedding(i, w, padding_idx=0), _with_padding_row,
         gradcheck=False),
    Case("cross_entropy", lambda L, x, t: L.F.cross_entropy(x, t), inputs(normal(6, 5), ints(5, 6))),
    Case("cross_entropy_ignore_index", lambda L, x, t: L.F.cross_entropy(x, t), _targets_with_ignored),
    Case("cross_entropy_label_smoothing", lambda L, x, t: L.F.cross_entropy(x, t, label_smoothing=0.1), _targets_with_ignored),
    Case("cross_entropy_sum", lambda L, x, t: L.F.cross_entropy(x, t, reduction="sum"), inputs(normal(4, 3), ints(3, 4))),
    Case("cross_entropy_none", lambda L, x, t: L.F.cross_entropy(x, t, reduction="none"), _targets_with_ignored),
    # class weights (a constant, as torch's CrossEntropyLoss(weight=...) takes them)
    Case("cross_entropy_weight", lambda L, x, t: L.F.cross_entropy(x, t, weight=L.constant(CLASS_WEIGHTS)),
         inputs(normal(6, 5), ints(5, 6))),
    Case("cross_entropy_weight_ignore_smoothing",
         lambda L, x, t: L.F.cross_entropy(x, t, weight=L.constant(CLASS_WEIGHTS), label_smoothing=0.1),
         _targets_with_ignored),
    Case("cross_entropy_weight_tokens",  # token classification's (B, L, C) logits, unlabeled tokens -100
         lambda L, x, t: L.F.cross_entropy(x.reshape(-1, 5), t.reshape(-1), weight=L.constant(CLASS_WEIGHTS)),
         lambda rng: [rng.standard_normal((2, 4, 5)), np.where(rng.random((2, 4)) < 0.3, -100, rng.integers(0, 5, (2, 4)))]),
    Case("cross_entropy_weight_sum",
         lambda L, x, t: L.F.cross_entropy(x, t, weight=L.constant(CLASS_WEIGHTS), reduction="sum"),
         _targets_with_ignored),
    Case("mse_loss", lambda L, x, t: L.F.mse_loss(x, t), inputs(normal(3, 4), normal(3, 4))),
    Case("mse_loss_sum", lambda L, x, t: L.F.mse_loss(x, t, reduction="sum"), inputs(normal(5), normal(5))),
    Case("bce_with_logits", lambda L, x, t: L.F.binary_cross_entropy_with_logits(x, t),
         lambda rng: [rng.standard_normal((3, 4)) * 4, rng.random((3, 4))]),
    Case("bce_with_logits_none", lambda L, x, t: L.F.binary_cross_entropy_with_logits(x, t, reduction="none"),
         lambda rng: [np.array([-30.0, -2.0, 0.0, 2.0, 30.0]), (rng.random(5) < 0.5) * 1.0]),
    # --- modules (the case's float inputs become the module's parameters) ---
    Case("module_linear", lambda L, x, w, b: L.call(L.nn.Linear(4, 5), {"weight": w, "bias": b}, x),
         inputs(normal(2, 3, 4), normal(5, 4), normal(5))),
    Case("module_embedding", lambda L, w, i: L.call(L.nn.Embedding(6, 3, padding_idx=2), {"weight": w}, i),
         inputs(normal(6, 3), ints(6, 3, 4)), gradcheck=False),
    Case("module_layer_norm", lambda L, x, w, b: L.call(L.nn.LayerNorm(4, eps=1e-12), {"weight": w, "bias": b}, x),
         inputs(normal(3, 4), normal(4), normal(4))),
]


def case_inputs(case, seed=0):
    """The case's inputs as float64/int64/bool arrays, from a seed fixed per case name."""
    rng = np.random.default_rng([seed, sum(map(ord, case.name))])
    arrays = [np.asarray(a) for a in case.make_inputs(rng)]
    return [a.astype(np.int64) if a.dtype.kind in "iu" else a for a in arrays]
