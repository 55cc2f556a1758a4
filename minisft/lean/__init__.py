"""Passes over a plain model: each takes a model from `from_pretrained` and returns it with
lean modules in place of plain ones (same parameters, same names, same results), each one
switchable. The models themselves never ask whether a pass ran.

    pack_qkv(model)                       attention.py: Q, K, V as one product, packed once
    fuse_feed_forward(model)              feed_forward.py: Linear -> GELU -> Linear as one node
    block_attention(model, block_from)    attention.py: no (L, L) arrays kept from block_from keys
    gradient_checkpointing(model)         recompute.py: layers run again in backward
    autocast(model)                       float16 products inside the forward (minisft.engine.amp)
    peft.get_peft_model, peft.freeze      peft.py: LoRA adapters and freezing, in peft's layout

    model = lean.apply(BertModel.from_pretrained(path))   # the defaults: minisft train's
    model = lean.apply(model, checkpointing=True, block_attention_from=None)
    lean.remove(model)                                     # plain again
"""
from minisft.engine import amp
from minisft.lean.attention import LeanAttention, block_attention, pack_qkv
from minisft.lean.feed_forward import fuse_feed_forward, lean_activations
from minisft.lean.recompute import gradient_checkpointing
from minisft.lean.swap import mix_in, plain_class

__all__ = ["apply", "remove", "pack_qkv", "fuse_feed_forward", "block_attention", "gradient_checkpointing",
           "autocast", "lean_activations", "BLOCK_ATTENTION_FROM"]

BLOCK_ATTENTION_FROM = 128  # keys from which attention goes by blocks, by default


class Autocast:
    """A model whose forward runs under amp.autocast: float16 products, float32 elsewhere."""

    def forward(self, *args, **kwargs):
        with amp.autocast():
            return super().forward(*args, **kwargs)


def autocast(model):
    """`model` with its forward in mixed precision (minisft.engine.amp.autocast)."""
    return mix_in(model, Autocast)


def apply(model, *, pack=True, fuse=True, block_attention_from=BLOCK_ATTENTION_FROM,
          checkpointing=False, mixed_precision=False):
    """`model` with the passes asked for (the defaults: what minisft train and the Auto
    classes apply); block_attention_from None: whole attention at every length."""
    if pack:
        pack_qkv(model)
    if fuse:
        fuse_feed_forward(model)
    if block_attention_from is not None:
        block_attention(model, block_attention_from)
    if checkpointing:
        gradient_checkpointing(model)
    if mixed_precision:
        autocast(model)
    return model


def remove(model):
    """`model` plain again: every module back in its model's class, no attention option
    left set (the packed weights stay views of one array: plain code reads them alike)."""
    for module in model.modules():
        if isinstance(module, LeanAttention):
            module.packed = module.block_from = None
        module.__class__ = plain_class(type(module))
    return model
