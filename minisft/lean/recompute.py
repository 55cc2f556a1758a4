"""Gradient checkpointing: a block run without keeping what it computes inside, run again in
backward; and the pass that makes a plain model's embeddings and encoder layers such blocks.

    gradient_checkpointing(model)

Each encoder layer but the last keeps only its input; the embeddings keep only the ids
(their LayerNorm and dropout are remade, with the same mask, as backward ends). The last
layer keeps its activations: its backward starts as soon as the forward ends, so running it
again would cost time and lower no peak. Inside every layer, the fused feed-forward keeps
its pre-activation alone (lean_activations). Gradients are the plain model's (the same
products, the same dropout masks), but W2's, a sum over chunks of rows under
lean_activations.
"""
import inspect

import numpy

from minisft.engine.errors import UsageError
from minisft.engine import random
from minisft.engine.backend import get_array_module
from minisft.engine.runtime import release_free_memory
from minisft.engine.tensor import Function, Tensor, backpropagate, is_grad_enabled, no_grad
from minisft.lean.feed_forward import lean_activations
from minisft.lean.swap import mix_in


class _Recompute(Function):
    """Runs `block` on x without keeping what it computes inside; backward runs it again
    from x, with the random state it first ran with (so the same dropout masks), and
    backpropagates through that recomputed graph: parameter gradients go to the block's
    parameters, x's gradient is returned. The recomputed output itself is let go before
    that backward (only its gradient is needed), and as each pass through the block ends,
    its freed activations are handed back to the OS (runtime.release_free_memory). The
    block's parameters are inputs too, so that the op records even when x needs no
    gradient."""

    def forward(self, x, *parameters, block):
        self.block, self.rng = block, random.get_rng_state()
        self.save_for_backward(x)
        with no_grad():
            out = block(Tensor(x)).data
        _release_free_memory(x)
        return out

    def backward(self, g):
        (x,) = self.saved
        resumed = random.get_rng_state()
        random.set_rng_state(self.rng)
        try:
            x = Tensor(x, requires_grad=self.needs_input_grad[0])
            with no_grad(enabled=True):
                out = self.block(x)
            node, out = out._ctx, None  # the output's graph, without its array
            backpropagate(node, g)
        finally:
            random.set_rng_state(resumed)
        gx, x = x.grad if self.needs_input_grad[0] else None, None
        _release_free_memory(g)
        return (gx,) + (None,) * (len(self.needs_input_grad) - 1)


def _release_free_memory(array):
    """The recomputed block's freed memory back to the OS, on the CPU (a GPU's memory pool
    keeps its own)."""
    if get_array_module(array) is numpy:
        release_free_memory()


def recomputed(block, x, parameters):
    """block(x) -> Tensor, keeping only x for backward (gradient checkpointing: the
    activations inside the block are recomputed in backward). `parameters`: the block's."""
    trainable = [p for p in parameters if p.requires_grad]
    if not (x.requires_grad or trainable):
        return block(x)
    return _Recompute.apply(x, *trainable, block=block)


def _recording(module):
    return module.training and is_grad_enabled()


class RecomputedLayer:
    """An encoder layer that keeps only its input, when it records a graph for training."""

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        if output_attentions or not _recording(self):
            return super().forward(hidden_states, attention_mask, output_attentions)
        layer = super().forward

        def block(x):
            with lean_activations():
                return layer(x, attention_mask)[0]
        return recomputed(block, hidden_states, self.parameters()), None


class LeanActivationsLayer:
    """The last encoder layer under gradient checkpointing: its feed-forward keeps its
    pre-activation alone."""

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        with lean_activations(_recording(self) and not output_attentions):
            return super().forward(hidden_states, attention_mask, output_attentions)


class RecomputedEmbeddings:
    """Embeddings that keep only the ids, when they record a graph for training."""

    def forward(self, input_ids, *args):
        if not _recording(self):
            return super().forward(input_ids, *args)
        embed = super().forward
        return recomputed(lambda ids: embed(ids.data, *args), Tensor(input_ids), self.parameters())


def gradient_checkpointing(model):
    """`model` (a base or task model) with its embeddings and every encoder layer but the
    last run again in backward instead of keeping their activations."""
    layers = model.encoder_layers()
    inputs = list(inspect.signature(type(layers[0]).forward).parameters)[1:]
    if inputs != ["hidden_states", "attention_mask", "output_attentions"]:
        raise UsageError(f"gradient checkpointing is not available for {type(layers[0]).__name__} yet (its layers "
                         f"take {', '.join(inputs)}); train without --gradient-checkpointing")
    for layer in layers[:-1]:
        mix_in(layer, RecomputedLayer)
    mix_in(layers[-1], LeanActivationsLayer)
    mix_in(model.base_model().embeddings, RecomputedEmbeddings)
    return model
