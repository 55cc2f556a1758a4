"""Lean attention: Q, K and V as one product over weights packed once, and block attention,
which keeps no (L, L) array for backward; the passes that put them into a plain model.

    pack_qkv(model)                    # one (B, L, 3H) product instead of three
    block_attention(model, 128)        # from 128 keys on, query rows in blocks

Both give the plain attention's results: packing multiplies by the same weights stacked
(one GEMM of 3H columns where there were three of H: float32 sums over H terms, perhaps
blocked another way), block attention runs the same kernels on blocks of query rows and
remakes each block's probabilities in backward (as flash attention does), from the random
state its dropout mask was drawn with. The masks of a block are drawn block by block, so
they are not the whole attention's masks: with dropout, block and whole attention agree in
distribution, and each with itself to the bit.
"""
import math

import numpy

from minisft.engine import functional as F
from minisft.engine import random
from minisft.engine.backend import device_of, get_array_module
from minisft.engine.functional import _Attention, _AttentionBase, with_weights
from minisft.engine.ops import CatView, add_columns_, unbroadcast
from minisft.engine.runtime import get_num_threads
from minisft.engine.tensor import Tensor
from minisft.lean.chunks import slices
from minisft.lean.peft import LoraLinear
from minisft.lean.swap import swap_class
from minisft.models.bert import BertSelfAttention
from minisft.models.distilbert import MultiHeadSelfAttention

QUERY_BLOCK = 128  # query rows a block


class _BlockAttend:
    """attend and attend_backward by blocks of QUERY_BLOCK query rows: nothing of size
    (..., Lq, Lk) is kept; backward remakes each block's probabilities (and its dropout mask,
    from the random state it was drawn with). Saved for backward: (q, k, v, bias)."""

    def attend(self, q, k, v, bias, out, *, scale, dropout_p, keep_probs):
        bias = self.prepare(q, k, bias, scale, dropout_p)
        self.dropout_p, self.probs, self.blocks = dropout_p, None, []
        for rows in slices(q.shape[-2], QUERY_BLOCK):
            self.blocks.append((rows, random.get_rng_state() if dropout_p else None))
            keep = self._block_mask(q, k, rows)
            for batch in _batch_chunks(len(q)):  # what a block makes is then chunk-sized
                self._attend_block(q, k, v, bias, keep, rows, out[batch, ..., rows, :], items=batch)
        self.save_for_backward(q, k, v, bias)

    def _block_mask(self, q, k, rows):
        """The dropout mask of a block of query rows, drawn from the random state as it is."""
        if not self.dropout_p:
            return None
        return random.keep_mask(q.shape[:-2] + (rows.stop - rows.start, k.shape[-2]), self.dropout_p, device_of(q))

    def _attend_block(self, q, k, v, bias, keep, rows, out, items=slice(None)):
        """The context of query rows `rows` of batch items `items` (of the first axis) into
        `out` (items, ..., len(rows), dv); returns what the kernel keeps for backward."""
        return self.kernels.attention_forward(q[items, ..., rows, :], k[items], v[items],
                                              None if bias is None else bias[items, ..., rows, :],
                                              None if keep is None else keep[items],
                                              self.scale, self.dropout_scale, out)

    def attend_backward(self, g, gq, gk, gv, g_scores):
        q, k, v, bias = self.take_saved()
        xp = get_array_module(q)
        resumed = random.get_rng_state()
        # a block's probabilities are remade for a few batch items at a time, one per thread;
        # the first block writes gk and gv, each later one adds its share from part_k, part_v
        batches, block_rows = _batch_chunks(len(q)), self.blocks[0][0].stop
        chunk = batches[0].stop
        scratch = xp.empty((chunk,) + g.shape[1:-2] + (block_rows, g.shape[-1]), dtype=g.dtype)  # their context
        part_k, part_v = (None if a is None or len(self.blocks) == 1 else xp.empty((chunk,) + a.shape[1:], dtype=a.dtype)
                          for a in (gk, gv))
        try:
            for index, (rows, state) in enumerate(self.blocks):
                if state is not None:
                    random.set_rng_state(state)
                keep = self._block_mask(q, k, rows)
                for batch in batches:
                    n = batch.stop - batch.start
                    saved = self._attend_block(q, k, v, bias, keep, rows, items=batch,
                                               out=scratch[:n, ..., :rows.stop - rows.start, :])
                    into = (gk, gv) if index == 0 else (part_k, part_v)
                    into_k, into_v = (None if a is None else a[batch if index == 0 else slice(n)] for a in into)
                    self.kernels.attention_backward(g[batch, ..., rows, :], saved,
                                                    None if keep is None else keep[batch], self.scale,
                                                    self.dropout_scale,
                                                    None if gq is None else gq[batch, ..., rows, :], into_k, into_v, None)
                    del saved  # freed before the next items' are made
                    if index:
                        for total, part in ((gk, into_k), (gv, into_v)):
                            if total is not None:
                                total[batch] += part
                del keep
        finally:
            random.set_rng_state(resumed)


def _batch_chunks(items):
    """The batch in slices of as many items as threads: a block's work, one item per thread."""
    return slices(items, min(items, get_num_threads()))


class _BlockAttention(_BlockAttend, _Attention):
    """F.scaled_dot_product_attention's node, by blocks of query rows."""


class _PackedAttention(_AttentionBase):
    """Multi-head self-attention on packed projections: qkv (B, L, 3 * H), the query, key
    and value heads side by side, -> context (B, L, H). The heads are views of qkv, the
    context is made in (B, L, heads, d) memory and qkv's gradient in one (B, L, 3H) array,
    so that the packed projection's backward is one matrix product."""

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
        g_bias = xp.empty(self.scores_shape, dtype=g.dtype) if needs_bias else None
        self.attend_backward(g.reshape(self.head_shape).transpose(0, 2, 1, 3), *self._heads(g_qkv), g_bias)
        grads = (g_qkv.reshape(batch, length, -1), None if g_bias is None else unbroadcast(g_bias, self.bias_shape))
        return grads[:len(self.needs_input_grad)]


class _BlockPackedAttention(_BlockAttend, _PackedAttention):
    """multi_head_attention's node, by blocks of query rows."""


def _in_blocks(q, keys, attn_mask, need_weights, block_from):
    """Whether attention goes by blocks: from block_from keys on (None: never), when the
    probabilities are not asked for and the mask needs no gradient, on the CPU (CuPy's
    generator state cannot be read back, so a block's mask could not be remade)."""
    mask_grad = isinstance(attn_mask, Tensor) and attn_mask.requires_grad
    data = q.data if isinstance(q, Tensor) else q
    return (block_from is not None and keys >= block_from and not need_weights and not mask_grad
            and get_array_module(data) is numpy)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, scale=None,
                                 need_weights=False, block_from=None):
    """F.scaled_dot_product_attention, by blocks of query rows from `block_from` keys on."""
    if not _in_blocks(query, key.shape[-2], attn_mask, need_weights, block_from):
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, scale, need_weights)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    inputs = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
    return _BlockAttention()(*inputs, scale=scale, dropout_p=dropout_p, keep_probs=False)


def multi_head_attention(qkv, num_heads, attn_mask=None, dropout_p=0.0, scale=None, need_weights=False,
                         block_from=None):
    """Self-attention of `num_heads` heads on packed projections qkv (B, L, 3 * H) (query,
    key and value side by side, as one linear layer over stacked weights makes them);
    attn_mask as in F.scaled_dot_product_attention, broadcasting to (B, heads, L, L). Returns
    the (B, L, H) context (heads concatenated), and the (B, heads, L, L) probabilities too
    with need_weights. The same as F.scaled_dot_product_attention on the split, permuted
    heads, without the copies; by blocks of query rows from `block_from` keys on."""
    fn = _BlockPackedAttention() if _in_blocks(qkv, qkv.shape[1], attn_mask, need_weights, block_from) \
        else _PackedAttention()
    inputs = (qkv,) if attn_mask is None else (qkv, attn_mask)
    context = fn(*inputs, num_heads=num_heads, scale=scale, dropout_p=dropout_p, keep_probs=need_weights)
    return with_weights(fn, context, need_weights)


# --- the modules the passes put in -----------------------------------------------------------
def pack_rows(params):
    """One array holding the parameters' arrays as consecutive row blocks; each parameter's
    .data becomes a view of its block (the optimiser updates them in place)."""
    whole = get_array_module(params[0].data).concatenate([p.data for p in params])
    start = 0
    for param in params:
        param.data, start = whole[start:start + param.shape[0]], start + param.shape[0]
    return whole


class LeanAttention:
    """A family's self-attention with the lean options the passes set: `packed` (the query,
    key and value weights and biases packed by pack_qkv, or None) and `block_from` (block
    attention's threshold, or None). `projection_names` and `heads_name` name the family's
    attributes."""
    packed = None
    block_from = None

    def projections(self):
        return [getattr(self, name) for name in self.projection_names]

    def pack(self):
        """Pack the projections' weights and biases (again after they were moved)."""
        layers = self.projections()
        self.packed = (pack_rows([p.weight for p in layers]), pack_rows([p.bias for p in layers]))

    def attention(self, query, key, value, attention_mask, output_attentions):
        out = scaled_dot_product_attention(query, key, value, attention_mask, self.dropout.p if self.training else 0.0,
                                           need_weights=output_attentions, block_from=self.block_from)
        return out if output_attentions else (out, None)

    def packed_attention(self, hidden_states, attention_mask, output_attentions):
        """(context (B, L, H), probabilities or None) from the packed product (B, L, 3H) and
        multi_head_attention. LoRA adapters' updates are added into its columns."""
        layers = self.projections()
        weights, biases = [p.weight for p in layers], [p.bias for p in layers]
        if not all(p.data.base is whole for params, whole in zip((weights, biases), self.packed) for p in params):
            raise RuntimeError(f"{type(self).__name__}: the query, key and value weights were replaced since "
                               "pack_qkv packed them (an assignment to .data): run lean.pack_qkv(model) again")
        qkv = F.linear(hidden_states, CatView.apply(*weights, whole=self.packed[0]),
                       CatView.apply(*biases, whole=self.packed[1]))
        width = qkv.shape[-1] // 3
        deltas = {index * width: layer.delta(hidden_states) for index, layer in enumerate(layers)
                  if isinstance(layer, LoraLinear) and not layer.merged}
        if deltas:  # added into the product's columns: qkv is this function's own
            qkv = add_columns_(qkv, list(deltas.values()), list(deltas))
        out = multi_head_attention(qkv, getattr(self, self.heads_name), attention_mask,
                                   self.dropout.p if self.training else 0.0, need_weights=output_attentions,
                                   block_from=self.block_from)
        return out if output_attentions else (out, None)

    def after_move(self):
        if self.packed is not None:
            self.pack()


class LeanBertSelfAttention(LeanAttention, BertSelfAttention):
    projection_names, heads_name = ("query", "key", "value"), "num_attention_heads"

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        if self.packed is None:
            return super().forward(hidden_states, attention_mask, output_attentions)
        return self.packed_attention(hidden_states, attention_mask, output_attentions)


class LeanMultiHeadSelfAttention(LeanAttention, MultiHeadSelfAttention):
    projection_names, heads_name = ("q_lin", "k_lin", "v_lin"), "n_heads"

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        if self.packed is None:
            return super().forward(hidden_states, attention_mask, output_attentions)
        context, probs = self.packed_attention(hidden_states, attention_mask, output_attentions)
        return self.out_lin(context), probs


LEAN_ATTENTION = {BertSelfAttention: LeanBertSelfAttention, MultiHeadSelfAttention: LeanMultiHeadSelfAttention}


def _lean_attention_modules(model):
    """The model's self-attention modules, each now its family's LeanAttention."""
    found = []
    for module in model.modules():
        plain = next((cls for cls in LEAN_ATTENTION if isinstance(module, cls)), None)
        if plain is not None:
            if not isinstance(module, LeanAttention):
                swap_class(module, LEAN_ATTENTION[plain])
            found.append(module)
    return found


def pack_qkv(model):
    """`model` with each self-attention's query, key and value projections multiplied as one
    (B, L, 3H) product, their weights packed into one array now (where they all have biases)."""
    for module in _lean_attention_modules(model):
        if all(p.bias is not None for p in module.projections()):
            module.pack()
    return model


def block_attention(model, block_from=128):
    """`model` with attention by blocks of query rows from `block_from` keys on (None: whole
    attention always): no (B, heads, L, L) array kept for backward."""
    for module in _lean_attention_modules(model):
        module.block_from = block_from
    return model
