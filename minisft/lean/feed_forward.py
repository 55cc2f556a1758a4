"""The fused feed-forward: Linear -> GELU -> Linear as one node that keeps less, and the
pass that puts it into a plain model's layers.

    fuse_feed_forward(model)    # BertLayer / FFN layers whose two Linear layers and GELU fuse

The fused layer gives the plain layer's output and gradients, bit for bit: the same
products (the fast kernels' GEMMs go by fixed tiles of rows, so chunks of rows give the same
products) and the same GELU. Under lean_activations (gradient checkpointing) W2's gradient
is a sum over chunks of rows instead, within float32 rounding of the one product's.
"""
import contextlib
import threading

from minisft import kernels
from minisft import nn
from minisft.engine import amp
from minisft.engine import functional as F
from minisft.engine.backend import get_array_module
from minisft.engine.ops import add_
from minisft.engine.tensor import Function
from minisft.lean.chunks import slices
from minisft.lean.swap import plain_class, swap_class
from minisft.models.bert import GELU_FORMS, BertLayer
from minisft.models.distilbert import FFN

FEED_FORWARD_CHUNK = 1024  # rows per chunk: a multiple of the fast kernels' GEMM tile, so the same products


class _FeedForward(Function):
    """out = gelu(x W1^T + b1) W2^T + b2, a transformer layer's feed-forward, as one node, so
    that its (rows, inner) arrays are its own and live no longer than they must. Kept for
    backward: GELU's slope, y = gelu(h) when W2 needs its gradient, x when W1 does; or, with
    `remake` (lean_activations) where both y and the slope would be kept, the pre-activation
    h alone, from which backward remakes them chunk by chunk.
    - Forward: where y is kept, it is made over h (GELU in place); where not (W2 frozen, as
      under LoRA, or remade), the rows go in chunks and y is chunk-sized.
    - Backward: the gradient at h, (g W2) * slope, is made chunk by chunk inside the slope
      (or inside h).
    No (rows, inner) array beside what is kept; the same products and results as linear,
    gelu and linear, except that a remade y gives W2's gradient as a sum over chunks of rows
    (within float32 rounding of the one product's)."""

    def forward(self, x, w1, b1, w2, b2, *, approximate, remake):
        self.kernels, self.shape = kernels.for_array(x), x.shape
        self.gelu = getattr(self.kernels, "gelu_tanh_forward" if approximate == "tanh" else "gelu_forward")
        x2 = x.reshape(-1, x.shape[-1])
        needs = self.needs_input_grad  # x, W1, b1, W2, b2
        keep_slope, keep_y = self.recording and any(needs[:3]), self.recording and needs[3]
        keep_h = remake and keep_slope and keep_y  # one (rows, inner) array where two would be kept
        xp = get_array_module(x)
        slope = xp.empty((len(x2), w1.shape[0]), dtype=x2.dtype) if keep_slope and not keep_h else None
        h = self.kernels.linear_forward(x2, w1, b1) if keep_h else None
        if keep_y and not keep_h:
            y = _gelu_over(self.gelu, self.kernels.linear_forward(x2, w1, b1), slope)
            out = self.kernels.linear_forward(y, w2, b2)
        else:
            y, out = None, xp.empty((len(x2), w2.shape[0]), dtype=x2.dtype)
            for rows in _chunks(len(x2)):
                y_rows = (self.gelu(h[rows]) if keep_h else
                          _gelu_over(self.gelu, self.kernels.linear_forward(x2[rows], w1, b1),
                                     None if slope is None else slope[rows]))
                out[rows] = self.kernels.linear_forward(y_rows, w2, b2)
                del y_rows  # before the next chunk's is made
        self.save_for_backward(x2 if needs[1] else None, w1 if needs[0] else None, w2 if keep_slope else None, y,
                               slope, h)
        return out.reshape(*x.shape[:-1], w2.shape[0])

    def backward(self, g):
        x2, w1, w2, y, slope, h = self.take_saved()
        needs = self.needs_input_grad
        g = g.reshape(-1, g.shape[-1])
        if h is not None:
            return self._backward_remaking(g, x2, w1, w2, h)
        gw2, gb2 = self.kernels.linear_backward(g, y, None, (False, needs[3], needs[4]))[1:]
        del y
        if slope is None:
            return None, None, None, gw2, gb2
        gh = slope if self.last_backward else get_array_module(g).empty_like(slope)  # the slope is this node's alone
        for rows in _chunks(len(g)):
            self._gradient_at_h(g[rows], w2, slope[rows], gh[rows])
        del slope
        return self._backward_first(gh, x2, w1) + (gw2, gb2)

    def _backward_remaking(self, g, x2, w1, w2, h):
        """backward from the kept pre-activation: y and the slope remade chunk by chunk, W2's
        gradient summed over the chunks, the gradient at h written inside h."""
        gb2 = self.kernels.linear_backward(g, None, None, (False, False, True))[2] if self.needs_input_grad[4] else None
        gw2, gh = None, h if self.last_backward else get_array_module(h).empty_like(h)
        for rows in _chunks(len(g)):
            y_rows, slope_rows = self.gelu(h[rows], slope=True)
            part = self.kernels.linear_backward(g[rows], y_rows, None, (False, True, False))[1]
            if gw2 is None:
                gw2 = part
            else:
                gw2 += part
            self._gradient_at_h(g[rows], w2, slope_rows, gh[rows])
            del y_rows, slope_rows  # before the next chunk's are made
        return self._backward_first(gh, x2, w1) + (gw2, gb2)

    def _gradient_at_h(self, g_rows, w2, slope_rows, into):
        """(g W2) * slope for a chunk of rows, written into `into`."""
        product = self.kernels.linear_backward(g_rows, None, w2, (True, False, False))[0]
        get_array_module(product).multiply(product, slope_rows, out=into)

    def _backward_first(self, gh, x2, w1):
        """(gx, gW1, gb1) from the gradient at h."""
        gx, gw1, gb1 = self.kernels.linear_backward(gh, x2, w1, self.needs_input_grad[:3])
        return None if gx is None else F.shaped(gx, self.shape), gw1, gb1


_lean = threading.local()


@contextlib.contextmanager
def lean_activations(enabled=True):
    """Inside, ops that can remake an activation in backward keep less for it: feed_forward
    keeps its pre-activation alone and remakes GELU's output and slope in backward (GELU's
    work twice). For gradient checkpointing, which trades compute for memory. Per thread."""
    previous = getattr(_lean, "enabled", False)
    _lean.enabled = enabled
    try:
        yield
    finally:
        _lean.enabled = previous


def _gelu_over(kernel, h, slope):
    """GELU of h written over h; its slope written into `slope` when given."""
    return kernel(h, into=h) if slope is None else kernel(h, slope=True, into=h, slope_into=slope)[0]


def _chunks(rows):
    return slices(rows, FEED_FORWARD_CHUNK)


def feed_forward(x, w1, b1, w2, b2, approximate="none"):
    """gelu(x W1^T + b1) W2^T + b2 (approximate: GELU's form, as in gelu) as one node, which
    keeps less than linear, gelu and linear do (see _FeedForward), with the same results;
    under lean_activations, less again (its pre-activation alone).
    x: (..., in), w1: (inner, in), b1: (inner,), w2: (out, inner), b2: (out,) -> (..., out)."""
    if x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"feed_forward: input shape {tuple(x.shape)}, w1 {tuple(w1.shape)} and w2 "
                         f"{tuple(w2.shape)} do not chain: need (..., in), (inner, in), (out, inner)")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"feed_forward: approximate must be 'none' or 'tanh', not {approximate!r}")
    return _FeedForward.apply(x, w1, b1, w2, b2, approximate=approximate, remake=getattr(_lean, "enabled", False))


class FusedBertLayer(BertLayer):
    """BertLayer with its feed-forward as one feed_forward node, its dropout and residual sum
    written over that node's output (an array of its own): output.LayerNorm(dropout(
    output.dense(gelu(intermediate.dense(x)))) + x). Unfused under autocast (the fused node
    has no float16 products)."""

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        if amp.compute_dtype() is not None:
            return super().forward(hidden_states, attention_mask, output_attentions)
        attention_output, probs = self.attention(hidden_states, attention_mask, output_attentions)
        inner, output = self.intermediate.dense, self.output
        projected = feed_forward(attention_output, inner.weight, inner.bias, output.dense.weight, output.dense.bias,
                                 GELU_FORMS[self.intermediate.hidden_act])
        dropped = F.dropout(projected, output.dropout.p, output.dropout.training, inplace=True)
        return output.LayerNorm(add_(dropped, attention_output)), probs


class FusedFFN(FFN):
    """DistilBERT's FFN as one feed_forward node, its dropout over the node's output."""

    def forward(self, x):
        if amp.compute_dtype() is not None:
            return super().forward(x)
        projected = feed_forward(x, self.lin1.weight, self.lin1.bias, self.lin2.weight, self.lin2.bias,
                                 GELU_FORMS[self.activation_name])
        return F.dropout(projected, self.dropout.p, self.dropout.training, inplace=True)


def _fusable(module):
    """Whether a layer's feed-forward (not fused yet) is two plain Linear layers with biases
    and a GELU."""
    if isinstance(module, (FusedBertLayer, FusedFFN)):
        return False
    if plain_class(type(module)) is BertLayer:
        linears, activation = (module.intermediate.dense, module.output.dense), module.intermediate.hidden_act
    elif plain_class(type(module)) is FFN:
        linears, activation = (module.lin1, module.lin2), module.activation_name
    else:
        return False
    return activation in GELU_FORMS and all(type(m) is nn.Linear and m.bias is not None for m in linears)


def fuse_feed_forward(model):
    """`model` with each plain BertLayer and DistilBERT FFN whose feed-forward can fuse (two
    plain Linear layers with biases around a GELU) running it as one feed_forward node."""
    for module in model.modules():
        if _fusable(module):
            swap_class(module, FusedBertLayer if isinstance(module, BertLayer) else FusedFFN)
    return model
