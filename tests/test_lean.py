"""The lean passes (minisft.lean) against the plain model they rewrite: the same logits and
every parameter gradient, dropout on with the same masks, each pass alone and the defaults
together; and the plain models know nothing of them."""
import io
import re
import tokenize
import weakref

import numpy as np
import pytest

import minisft
from minisft import lean, nn, peft
from minisft.engine.tensor import Function
from minisft.lean import attention, recompute
from minisft.models.auto import AutoModelForSequenceClassification
from conftest import FIXTURES, ROOT, assert_close

FAMILIES = ["bert", "distilbert", "electra", "roberta"]
EPS32 = np.finfo(np.float32).eps


def _model(name, **overrides):
    minisft.manual_seed(1)  # the new classifier's initial weights
    return AutoModelForSequenceClassification.from_pretrained(FIXTURES / f"tiny-{name}", num_labels=3, lean=False,
                                                              **overrides).train()


def _step(model, seed=0, length=12):
    """(logits, {name: gradient}) of one training forward and backward, the dropout masks
    drawn from seed 0; padding in the second row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 60, (2, length))
    mask = np.ones_like(ids)
    mask[1, length - 3:] = 0
    minisft.manual_seed(0)
    out = model(ids, attention_mask=mask, labels=np.array([0, 2]))
    model.zero_grad()
    out.loss.backward()
    return out.logits.numpy(), {name: p.grad.copy() for name, p in model.named_parameters() if p.grad is not None}


QUERY_KEY = {".query.": ".value.", ".key.": ".value.", ".q_lin.": ".v_lin.", ".k_lin.": ".v_lin."}


def _scale(name, grads):
    """The size a gradient's rounding is measured against: its largest element; for the
    query and key projections, at least the value projection's weight gradient's largest.
    Their gradients come through dS = P (dP - rowsum(dP P)), a difference of terms the size
    of dP, which cancel (wholly, for the key bias: softmax ignores a constant per row), so
    their float32 error is that of the terms, which dV = P^T g shares without cancelling."""
    scale = np.abs(grads[name]).max()
    for own, value in QUERY_KEY.items():
        if own in name:
            scale = max(scale, np.abs(grads[name.replace(own, value).replace(".bias", ".weight")]).max())
    return scale


def _agree(lean_step, plain_step, exact):
    """Bit for bit where `exact`, else within 1e-6 of each tensor's scale (_scale): a few
    float32 roundings (eps 1.2e-7) apart, through a 2-layer model whose products are
    blocked another way (one (3H, H) product where there were three of (H, H))."""
    (logits, grads), (plain_logits, plain_grads) = lean_step, plain_step
    assert grads.keys() == plain_grads.keys()
    plain_grads = {**plain_grads, "logits": plain_logits}
    for name, actual in [("logits", logits)] + list(grads.items()):
        expected = plain_grads[name]
        if exact:
            assert np.array_equal(actual, expected), name
        else:
            assert np.abs(actual - expected).max() <= 1e-6 * _scale(name, plain_grads), name


PASSES = {  # name: (pass, bit for bit with the fast kernels?)
    "pack_qkv": (lean.pack_qkv, False),  # one product of 3H columns: another blocking of its sums
    "fuse_feed_forward": (lean.fuse_feed_forward, True),  # the same products, by construction
    "block_attention": (lambda m: lean.block_attention(m, 4), True),  # the kernels on rows of the same scores
    "gradient_checkpointing": (lean.gradient_checkpointing, True),  # the same forward again, the same masks
    "defaults": (lean.apply, False),
    "everything": (lambda m: lean.apply(m, block_attention_from=4, checkpointing=True), False),
}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("which", PASSES)
def test_each_pass_gives_the_plain_model_s_logits_and_gradients(name, which):
    """Dropout on (hidden and attention, p = 0.1). Block attention draws its masks block by
    block, not as one (B, nh, L, L) draw: where it runs, attention dropout is off."""
    apply, exact = PASSES[which]
    blocks = which in ("block_attention", "everything")
    overrides = {"attention_probs_dropout_prob": 0.0} if blocks else {}
    overrides["dropout" if name == "distilbert" else "hidden_dropout_prob"] = 0.1
    if not blocks:
        overrides["attention_dropout" if name == "distilbert" else "attention_probs_dropout_prob"] = 0.1
    plain = _step(_model(name, **overrides))
    model = apply(_model(name, **overrides))
    assert any(type(m).__module__.startswith("minisft.lean") for m in model.modules())
    _agree(_step(model), plain, exact and minisft.get_kernels() == "fast")
    _agree(_step(lean.remove(model)), plain, True)  # plain again: the same arrays, the same results


def test_lora_after_packing_adds_its_updates_into_the_packed_product():
    plain = peft.get_peft_model(_model("bert"), peft.LoraConfig(r=2, lora_alpha=4))
    packed = peft.get_peft_model(lean.apply(_model("bert")), peft.LoraConfig(r=2, lora_alpha=4))
    for model in (plain, packed):
        for _, adapter in model.adapters():
            adapter.lora_B.weight.data[...] = 0.01  # non-zero updates
    _agree(_step(packed), _step(plain), False)


def test_packing_survives_loading_and_moving_and_refuses_replaced_weights():
    model = lean.pack_qkv(_model("bert"))
    reference = _step(model)
    model.load_state_dict({k: v.copy() for k, v in model.state_dict().items()})  # written in place
    model.to("cpu")  # new arrays: packed again (after_move)
    _agree(_step(model), reference, True)
    query = model.bert.encoder.layer[0].attention.self.query
    query.weight.data = query.weight.data.copy()
    with pytest.raises(RuntimeError, match="pack_qkv"):
        _step(model)


def test_pack_rows_makes_the_parameters_views_of_one_array(device):
    """After packing, an in-place update shows in the packed array, and CatView's backward
    splits the gradient into the parameters' blocks."""
    from minisft.engine.ops import CatView
    rng = np.random.default_rng(0)
    params = [nn.Parameter(minisft.Device(device).put(rng.standard_normal(shape).astype(np.float32)))
              for shape in ((2, 3), (4, 3), (1, 3))]
    expected = np.concatenate([p.numpy() for p in params])
    whole = attention.pack_rows(params)
    assert_close(whole, expected)
    params[1].data *= 2  # as an optimiser's in-place step
    assert_close(whole, np.concatenate([expected[:2], expected[2:6] * 2, expected[6:]]))
    (CatView.apply(*params, whole=whole) * minisft.Device(device).put(np.arange(7, dtype=np.float32)[:, None])
     ).sum().backward()
    assert_close(params[1].grad, np.repeat(np.arange(2, 6, dtype=np.float32)[:, None], 3, axis=1))


def test_a_recomputed_block_goes_without_its_output_and_hands_freed_memory_back(monkeypatch):
    outputs, alive_in_backward, released = [], [], []

    class Probe(Function):  # the block's last op: its backward runs first in the recomputation
        def forward(self, x):
            return x * 2

        def backward(self, g):
            alive_in_backward.append(outputs[-1]() is not None)
            return (g * 2,)

    def block(x):
        out = Probe.apply(layer(x))
        outputs.append(weakref.ref(out.data))
        return out

    monkeypatch.setattr(recompute, "release_free_memory", lambda: released.append(True))
    layer = nn.Linear(3, 3)
    x = minisft.Tensor(np.random.default_rng(0).standard_normal((2, 3), dtype=np.float32), requires_grad=True)
    recompute.recomputed(block, x, layer.parameters()).sum().backward()
    assert len(outputs) == 2 and alive_in_backward == [False]  # the recomputed output was let go
    assert len(released) == 2  # as the forward ended, and as the recomputation's backward ended
    recomputed = x.grad
    x.grad = None
    block(x).sum().backward()
    assert np.array_equal(x.grad, recomputed)


LEAN_WORD = re.compile(r"(lora|deltas?|pack(ed|ing|s)?|blocks?|blocked|chunks?|checkpointing|recompute\w*|autocast|amp"
                       r"|profil\w*|lean|fused)")


def _lean_words(path):
    """The words of identifiers (split at underscores) and strings that name a lean pass."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    words = [word for t in tokens if t.type in (tokenize.NAME, tokenize.STRING)
             for word in re.split(r"[^a-z0-9]+", t.string.lower())]
    return [word for word in words if LEAN_WORD.fullmatch(word)]


@pytest.mark.parametrize("path", sorted((ROOT / "minisft" / "models").glob("*.py")), ids=lambda p: p.name)
def test_the_models_know_nothing_of_the_passes(path):
    """No identifier or string in models/ names LoRA, deltas, packing, blocks, chunks,
    checkpointing, autocast or profiling, and no hasattr asks about another module (auto.py,
    the registry, names the lean passes it applies by default)."""
    if path.name == "auto.py":
        return
    found = _lean_words(path)
    assert not found, f"{path.name}: {found}"
    text = path.read_text(encoding="utf-8")
    assert "hasattr(self," in text or "hasattr(" not in text.replace("hasattr(ids,", "").replace(
        "hasattr(labels,", ""), f"{path.name} asks hasattr of a module"


def test_passes_run_in_any_order_and_remove_leaves_no_option_set():
    """Fusing after gradient checkpointing keeps the recomputation; after lean.remove, a new
    pack_qkv alone does not take up an earlier block_attention's threshold."""
    model = lean.fuse_feed_forward(lean.gradient_checkpointing(_model("bert")))
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer, lean.feed_forward.FusedBertLayer) and isinstance(layer, recompute.RecomputedLayer)
    lean.remove(lean.block_attention(model, 4))
    lean.pack_qkv(model)
    assert model.bert.encoder.layer[0].attention.self.block_from is None
