"""minisft/kernels: the fast set (and, on a GPU, the cuda set) equals the reference set on
BERT-sized inputs, a whole fine-tuning step is the same with either, and the set is chosen as
documented."""
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import minisft
from minisft import kernels
from minisft.kernels import cuda, fast, reference
from minisft.models.bert import BertForSequenceClassification
from minisft.optim import AdamW, clip_grad_norm_
from conftest import FIXTURES, ROOT

B, L, H, I, HEADS = 32, 128, 384, 1536, 12  # all-MiniLM-L6-v2 at batch 32 x 128


def assert_same(fast_out, ref_out, what, tolerance=1e-6):
    """Every array within `tolerance` of the reference, relative to its largest entry (or to
    1e-6 for arrays that are zero up to rounding, such as attention's key-bias gradient)."""
    fast_out = fast_out if isinstance(fast_out, (tuple, list)) else (fast_out,)
    ref_out = ref_out if isinstance(ref_out, (tuple, list)) else (ref_out,)
    assert len(fast_out) == len(ref_out), what
    for i, (a, b) in enumerate(zip(fast_out, ref_out)):
        if b is None:
            assert a is None, f"{what}[{i}]"
            continue
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}[{i}]: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        error = np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-6)
        assert error <= tolerance, f"{what}[{i}]: relative error {error:.3g} > {tolerance}"


def run_both(name, make_args):
    """kernel `name` of each set on fresh copies of the same arguments (kernels may work in
    place): (fast result, reference result, fast's arguments, reference's arguments)."""
    fast_args, ref_args = make_args(), make_args()
    return getattr(fast, name)(*fast_args), getattr(reference, name)(*ref_args), fast_args, ref_args


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def normal(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_elementwise_kernels_agree_on_bert_sized_inputs(rng):
    x = normal(rng, B, L, I, scale=3)
    for name in ("gelu_forward", "gelu_tanh_forward"):
        assert_same(getattr(fast, name)(x), getattr(reference, name)(x), name)
        assert_same(getattr(fast, name)(x, slope=True), getattr(reference, name)(x, slope=True), name + " slope")
    keep = rng.random((B, L, H)) >= 0.1
    h = normal(rng, B, L, H)
    assert_same(fast.dropout(h, keep, 1 / 0.9), reference.dropout(h, keep, 1 / 0.9), "dropout")
    assert_same(fast.erf(x), reference.erf(x), "erf")


def test_softmax_kernels_agree(rng):
    x, g = normal(rng, B, HEADS, L, L, scale=4), normal(rng, B, HEADS, L, L)
    y = fast.softmax_forward(x)
    assert_same(y, reference.softmax_forward(x), "softmax_forward")
    assert_same(fast.softmax_backward(y, g), reference.softmax_backward(y, g), "softmax_backward")
    logits, g = normal(rng, B * L, 30, scale=4), normal(rng, B * L, 30)
    y = fast.log_softmax_forward(logits)
    assert_same(y, reference.log_softmax_forward(logits), "log_softmax_forward")
    assert_same(fast.log_softmax_backward(y, g), reference.log_softmax_backward(y, g), "log_softmax_backward")


def test_linear_and_layer_norm_kernels_agree(rng):
    x, w, b = normal(rng, B * L, H), normal(rng, I, H, scale=0.05), normal(rng, I)
    g = normal(rng, B * L, I)
    assert_same(fast.linear_forward(x, w, b), reference.linear_forward(x, w, b), "linear_forward")
    assert_same(fast.linear_backward(g, x, w, (True, True, True)),
                reference.linear_backward(g, x, w, (True, True, True)), "linear_backward")
    assert fast.linear_backward(g, x, w, (True, False, False))[1:] == (None, None)
    h, weight, bias = normal(rng, B * L, H, scale=2) + 1, normal(rng, H) + 1, normal(rng, H)
    y, xhat, rstd = fast.layer_norm_forward(h, weight, bias, 1e-12)
    assert_same((y, xhat, rstd), reference.layer_norm_forward(h, weight, bias, 1e-12), "layer_norm_forward")
    gh = normal(rng, B * L, H)
    assert_same(fast.layer_norm_backward(gh, xhat, rstd, weight, True),
                reference.layer_norm_backward(gh, xhat, rstd, weight, True), "layer_norm_backward")


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_attention_kernels_agree(rng, dropout_p):
    qkv = normal(rng, B, L, 3, HEADS, H // HEADS)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # strided views, as BERT's
    bias = np.where(rng.random((B, 1, 1, L)) < 0.1, np.finfo(np.float32).min, 0).astype(np.float32)
    bias = np.broadcast_to(bias, (B, HEADS, L, L))
    keep = rng.random((B, HEADS, L, L)) >= dropout_p if dropout_p else None
    scale, dropout_scale = 1 / math.sqrt(H // HEADS), 1 / (1 - dropout_p)
    outs = [np.empty((B, HEADS, L, H // HEADS), np.float32) for _ in range(2)]
    saved = [kernel.attention_forward(q, k, v, bias, keep, scale, dropout_scale, out)
             for kernel, out in zip((fast, reference), outs)]
    assert_same(outs[0], outs[1], "attention context")
    assert_same(saved[0][-1], saved[1][-1], "attention probabilities")
    g = normal(rng, B, HEADS, L, H // HEADS)
    grads = [[np.empty(a.shape, np.float32) for a in (q, k, v)] + [np.empty((B, HEADS, L, L), np.float32)]
             for _ in range(2)]
    for kernel, kept, grad in zip((fast, reference), saved, grads):
        kernel.attention_backward(g, kept, keep, scale, dropout_scale, *grad)
    assert_same(grads[0], grads[1], "attention gradients (q, k, v, bias)")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_embedding_and_adam_kernels_agree(rng, label_smoothing):
    logits, target = normal(rng, B * L, 9, scale=3), rng.integers(0, 9, B * L)
    valid = rng.random(B * L) > 0.2
    loss, logp = fast.cross_entropy_forward(logits, target, valid, label_smoothing)
    assert_same((loss, logp), reference.cross_entropy_forward(logits, target, valid, label_smoothing),
                "cross_entropy_forward")
    g = normal(rng, B * L)
    assert_same(fast.cross_entropy_backward(logp, target, valid, g, label_smoothing),
                reference.cross_entropy_backward(logp, target, valid, g, label_smoothing), "cross_entropy_backward")
    ids, g = rng.integers(0, 30522, B * L), normal(rng, B * L, H)
    assert_same(fast.embedding_backward(ids, g, 30522, 0), reference.embedding_backward(ids, g, 30522, 0),
                "embedding_backward")
    hyper = dict(decay=1 - 1e-3 * 0.01, beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3 / (1 - 0.9 ** 3),
                 bias_correction2=math.sqrt(1 - 0.999 ** 3))
    state = [normal(rng, I, H), normal(rng, I, H), normal(rng, I, H) * 0.1, np.abs(normal(rng, I, H)) * 0.01]
    copies = [[a.copy() for a in state] for _ in range(2)]
    fast.adam_update(*copies[0], **hyper)
    reference.adam_update(*copies[1], **hyper)
    assert_same(copies[0], copies[1], "adam_update (param, grad, exp_avg, exp_avg_sq)")


def _fine_tuning_step(kernel_set):
    """Loss, every gradient and every weight after one AdamW step of the tiny BERT with dropout."""
    minisft.set_kernels(kernel_set)
    minisft.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(FIXTURES / "tiny-bert", num_labels=3).train()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (6, 17))
    mask = np.ones_like(ids)
    mask[2, 11:] = 0
    out = model(ids, attention_mask=mask, labels=rng.integers(0, 3, 6))
    out.loss.backward()
    grads = [p.grad.copy() for p in model.parameters()]
    clip_grad_norm_(model.parameters(), 1.0)
    AdamW(model.parameters(), lr=1e-3).step()
    return [out.loss.numpy()] + grads + [p.numpy() for p in model.parameters()]


def test_a_fine_tuning_step_is_the_same_with_either_set():
    before = minisft.get_kernels()
    try:
        steps = [_fine_tuning_step(name) for name in ("fast", "reference")]
    finally:
        minisft.set_kernels(before)
    for i, (a, b) in enumerate(zip(*steps)):
        assert_same(a, b, f"step array {i}", tolerance=1e-5)


def test_the_set_is_chosen_by_set_kernels_or_the_environment(monkeypatch):
    monkeypatch.setattr(kernels, "_chosen", kernels._chosen)  # the choice before, restored after the test
    minisft.set_kernels(None)
    assert kernels.for_array(np.zeros(1)) is fast
    minisft.set_kernels("reference")
    assert kernels.for_array(np.zeros(1)) is reference
    with pytest.raises(ValueError, match="unknown kernel set 'slow'"):
        minisft.set_kernels("slow")
    monkeypatch.setattr(kernels, "_chosen", kernels._UNSET)
    monkeypatch.setenv("MINISFT_KERNELS", "reference")
    assert minisft.get_kernels() == "reference"
    monkeypatch.setattr(kernels, "_chosen", kernels._UNSET)
    monkeypatch.setenv("MINISFT_KERNELS", "quick")
    with pytest.raises(ValueError, match="MINISFT_KERNELS='quick'"):
        minisft.get_kernels()


def test_both_sets_have_the_same_kernels_with_the_same_signatures():
    import inspect

    def public(module):
        return {name for name, value in vars(module).items()
                if callable(value) and not name.startswith("_") and getattr(value, "__module__", "").startswith("minisft.kernels")}
    assert public(fast) == public(reference)
    for name in public(reference):
        ref = inspect.signature(getattr(reference, name))
        fst = inspect.signature(getattr(fast, name))
        assert list(ref.parameters)[:1] == list(fst.parameters)[:1], name
        if not any(p.kind == p.VAR_KEYWORD for p in fst.parameters.values()):
            assert list(ref.parameters) == list(fst.parameters), name


def test_the_cuda_set_has_every_reference_kernel_with_its_signature():
    """Importing it needs no CuPy (it compiles on first use); what it does not fuse is the
    reference's own function."""
    import inspect

    for name, value in vars(reference).items():
        if callable(value) and not name.startswith("_") and value.__module__ == reference.__name__:
            ours = getattr(cuda, name)
            assert list(inspect.signature(ours).parameters)[:1] == list(inspect.signature(value).parameters)[:1], name
    assert cuda.erf is reference.erf and cuda.gelu_forward is not reference.gelu_forward


needs_gpu = pytest.mark.skipif(not minisft.cuda_available(), reason="the cuda kernel set needs CuPy and a GPU")


def _on_gpu(*arrays):
    import cupy

    return [None if a is None else cupy.asarray(a) for a in arrays]


def _from_gpu(result):
    if isinstance(result, (tuple, list)):
        return [_from_gpu(r) for r in result]
    return None if result is None else minisft.Device("cpu").put(result)


@needs_gpu
def test_cuda_gelu_softmax_and_layer_norm_agree_with_the_reference(rng):
    x = normal(rng, B, L, I, scale=3)
    assert_same(_from_gpu(cuda.gelu_forward(*_on_gpu(x), slope=True)), reference.gelu_forward(x, slope=True),
                "gelu_forward", tolerance=2e-6)
    s, g = normal(rng, B, HEADS, L, L, scale=4), normal(rng, B, HEADS, L, L)
    y = reference.softmax_forward(s)
    assert_same(_from_gpu(cuda.softmax_forward(*_on_gpu(s))), y, "softmax_forward", tolerance=2e-6)
    assert_same(_from_gpu(cuda.softmax_backward(*_on_gpu(y, g))), reference.softmax_backward(y, g),
                "softmax_backward", tolerance=2e-6)
    h, weight, bias = normal(rng, B * L, H, scale=2) + 1, normal(rng, H) + 1, normal(rng, H)
    expected = reference.layer_norm_forward(h, weight, bias, 1e-12)
    assert_same(_from_gpu(cuda.layer_norm_forward(*_on_gpu(h, weight, bias), 1e-12)), expected,
                "layer_norm_forward", tolerance=2e-6)
    gh = normal(rng, B * L, H)
    assert_same(_from_gpu(cuda.layer_norm_backward(*_on_gpu(gh, expected[1], expected[2], weight), True)),
                reference.layer_norm_backward(gh, expected[1], expected[2], weight, True), "layer_norm_backward",
                tolerance=2e-6)


@needs_gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cuda_attention_agrees_with_the_reference(rng, dropout_p):
    import cupy

    qkv = normal(rng, B, L, 3, HEADS, H // HEADS)
    bias = np.where(rng.random((B, 1, 1, L)) < 0.1, np.finfo(np.float32).min, 0).astype(np.float32)
    keep = rng.random((B, HEADS, L, L)) >= dropout_p if dropout_p else None
    scale, dropout_scale = 1 / math.sqrt(H // HEADS), 1 / (1 - dropout_p)
    g = normal(rng, B, HEADS, L, H // HEADS)
    results = []
    for kernel, xp in ((cuda, cupy), (reference, np)):
        packed = xp.asarray(qkv)
        q, k, v = (packed[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        b = xp.broadcast_to(xp.asarray(bias), (B, HEADS, L, L))
        kept = None if keep is None else xp.asarray(keep)
        out = xp.empty((B, HEADS, L, H // HEADS), np.float32)
        saved = kernel.attention_forward(q, k, v, b, kept, scale, dropout_scale, out)
        grads = [xp.empty(a.shape, np.float32) for a in (q, k, v)] + [xp.empty((B, HEADS, L, L), np.float32)]
        kernel.attention_backward(xp.asarray(g), saved, kept, scale, dropout_scale, *grads)
        results.append(_from_gpu([out, saved[-1], *grads]))
    assert_same(results[0], results[1], "attention (context, probabilities, dq, dk, dv, dbias)", tolerance=1e-5)


@needs_gpu
def test_cuda_adam_updates_every_tensor_in_one_launch_as_the_reference(rng):
    shapes = [(I, H), (H,), (7,)]
    hypers = [dict(decay=1 - 1e-3 * 0.01, beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3 / (1 - 0.9 ** 3),
                   bias_correction2=math.sqrt(1 - 0.999 ** 3)),
              dict(decay=None, beta1=0.8, beta2=0.99, eps=1e-6, step_size=2e-3, bias_correction2=0.5),
              dict(decay=None, beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, bias_correction2=1.0)]
    states = [[normal(rng, *shape), normal(rng, *shape), normal(rng, *shape) * 0.1,
               np.abs(normal(rng, *shape)) * 0.01] for shape in shapes]
    on_gpu = [_on_gpu(*state) for state in states]
    cuda.adam_update_many(*(list(column) for column in zip(*on_gpu)), hypers)
    for state, gpu, hyper in zip(states, on_gpu, hypers):
        reference.adam_update(*state, **hyper)
        assert_same(_from_gpu(gpu), state, "adam_update_many", tolerance=2e-6)


def test_the_erf_table_is_what_its_script_fits(tmp_path):
    """tools/fit_erf.py reproduces the committed coefficients (nothing is fitted at run time),
    up to the last bits, which the platform's least squares and Chebyshev fit round by its
    vector width: far below what either approximation's error lets through (4e-15 in float64,
    the float32 ulp for the rational one)."""
    import runpy

    script = (ROOT / "tools" / "fit_erf.py").read_text(encoding="utf-8")
    target = tmp_path / "erf_coefficients.py"
    code = f"import pathlib, runpy\nmodule = runpy.run_path({str(ROOT / 'tools' / 'fit_erf.py')!r}, run_name='fit')\n" \
           f"module['main'].__globals__['TARGET'] = pathlib.Path({str(target)!r})\nmodule['main']()\n"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert "TARGET" in script
    fitted = runpy.run_path(str(target))
    committed = runpy.run_path(str(ROOT / "minisft" / "kernels" / "erf_coefficients.py"))
    assert set(fitted) - {"__builtins__"} == set(committed) - {"__builtins__"}
    for name, tolerance in (("SMALL", 1e-15), ("LARGE", 1e-15), ("RATIONAL_P", 1e-10), ("RATIONAL_Q", 1e-10),
                            ("TAIL", 1e-10)):
        np.testing.assert_allclose(fitted[name], committed[name], rtol=0, atol=tolerance, err_msg=name)
    for name in ("SMALL_RANGE", "LARGE_RANGE", "RATIONAL_CLIP", "TAIL_P"):
        assert fitted[name] == committed[name], name


def test_the_float32_erf_is_within_two_ulps_of_the_exact_one():
    x = np.linspace(-5, 5, 200001).astype(np.float32)
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    for module in (fast, reference):
        ulps = np.abs(module.erf(x) - exact) / np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
        assert ulps[x != 0].max() <= 2, module.__name__


def test_the_fast_gelu_its_slope_and_the_normal_cdf_keep_their_relative_accuracy_into_the_tail():
    """Float32 GELU and Phi by the erfc tail of tools/fit_erf.py (relative error 3.2e-8), against
    x erfc(-x / sqrt 2) / 2 by math.erfc. The bound, in float32 ulps: x^2 / 2 (exp(-x^2 / 2)
    takes x^2 rounded to half its ulp, a relative error of 2^-24 of the exponent) plus 12 (the
    fit and about a dozen roundings of one op each). The slope Phi + x phi is a sum that
    crosses zero near x = -0.75: its bound is relative to the size of its two terms. Where
    1 + erf(x / sqrt 2) is used instead, as torch does, the error below x = -4 is the value
    itself (16.7 million ulps)."""
    x = np.linspace(-13, 13, 260001).astype(np.float32)
    x64 = x.astype(np.float64)
    cdf = np.array([math.erfc(-v / math.sqrt(2)) / 2 for v in x64])
    density_term = x64 * np.exp(-x64 * x64 / 2) / math.sqrt(2 * math.pi)
    y, slope = fast.gelu_forward(x, slope=True)
    assert (fast.gelu_forward(x) == y).all() and y.dtype == slope.dtype == np.float32
    bound = x64 * x64 / 2 + 12
    exact = x64 * cdf
    assert (np.abs(y - exact) <= bound * np.spacing(np.abs(exact).astype(np.float32))).all()
    scale = np.spacing((cdf + np.abs(density_term)).astype(np.float32)).astype(np.float64)
    assert (np.abs(slope - (cdf + density_term)) <= bound * scale).all()
    assert (np.abs(fast.normal_cdf(x) - cdf) <= bound * np.spacing(cdf.astype(np.float32))).all()


def test_reference_kernels_have_no_threads_chunks_or_scratch():
    text = pathlib.Path(reference.__file__).read_text(encoding="utf-8")
    for word in ("by_rows", "runtime", "thread", "chunk", "out=", "empty("):
        assert word not in text, word
