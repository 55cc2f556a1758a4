"""Each op alone, forward plus backward, minisft against torch on the same arrays in one run,
at all-MiniLM-L6-v2's and BERT-base's shapes (32 x 128 tokens; hidden 384 and 768,
intermediate 1536 and 3072, 12 heads), and each library's accuracy against float64 math.

Accuracy is the largest error over the output and the first input's gradient in float32 ulps
of the exact value: |out - exact| / spacing(float32(exact)). The exact values are torch's
float64 op on the float64 inputs, but for GELU below x = -5, where float64's 1 + erf(x / sqrt 2)
cancels too: there they are x erfc(-x / sqrt 2) / 2 and its derivative, by math.erfc. Ops with
dropout have no exact value to compare (the two libraries draw different masks) and report
time only.
"""
import math

import numpy

from benchmarks.common import Figure, alternate

TOKENS = 32 * 128
SHAPES = {"MiniLM": {"hidden": 384, "intermediate": 1536, "heads": 12},
          "BERT-base": {"hidden": 768, "intermediate": 3072, "heads": 12}}
NER_LABELS = 13      # WNUT-16's tag set: token classification's logits
DROPOUT = 0.1
VOCAB = 30522


def ulps(out, exact):
    """Largest |out - exact| in float32 ulps of exact."""
    out, exact = numpy.asarray(out, dtype=numpy.float64), numpy.asarray(exact, dtype=numpy.float64)
    spacing = numpy.spacing(numpy.abs(exact).astype(numpy.float32)).astype(numpy.float64)
    return float(numpy.max(numpy.abs(out - exact) / spacing))


class Op:
    """One op: `ours` and `theirs` build it on the leaves made from the float32 arrays
    `inputs`; `exact`: whether it has exact values, or a function that mends torch's float64
    ones, (x, out, grads, upstream) -> (out, grads)."""

    def __init__(self, name, inputs, ours, theirs, exact=True, grads=None):
        self.name, self.inputs, self.ours, self.theirs, self.exact, self.grads = name, inputs, ours, theirs, exact, grads


def _minisft_run(forward, grads):
    """forward(*leaves) -> Tensor, run with a fixed upstream gradient; -> (out, leaf grads)."""
    import minisft

    def run(xs, upstream):
        leaves = [minisft.tensor(x, requires_grad=g) if g is not None else x for x, g in zip(xs, grads)]
        out = forward(*leaves)
        out.backward(upstream if out.data.ndim else None)
        return out.numpy(), [leaf.grad for leaf, g in zip(leaves, grads) if g]
    return run


def _gelu_tail(x, out, grads, upstream):
    """x Phi(x) and its slope below x = -5 by math.erfc (float64's 1 + erf cancels there)."""
    tail = numpy.flatnonzero(x.ravel() < -5)
    v = x.ravel()[tail].astype(numpy.float64)
    cdf = numpy.array([math.erfc(-a / math.sqrt(2)) / 2 for a in v])
    out.ravel()[tail] = v * cdf
    grads[0].ravel()[tail] = upstream.ravel()[tail] * (cdf + v * numpy.exp(-v * v / 2) / math.sqrt(2 * math.pi))
    return out, grads


def _torch_run(forward, grads, dtype=None):
    import torch

    def run(xs, upstream):
        leaves = [torch.tensor(x, dtype=dtype, requires_grad=bool(g)) if g is not None else x for x, g in zip(xs, grads)]
        out = forward(*leaves)
        out.backward(torch.tensor(upstream, dtype=out.dtype) if out.ndim else None)
        return out.detach().numpy(), [leaf.grad.numpy() for leaf, g in zip(leaves, grads) if g]
    return run


def _ops(shape, rng):
    import torch

    import minisft
    import minisft.functional as F

    hidden, intermediate, heads = shape["hidden"], shape["intermediate"], shape["heads"]
    normal = lambda *s: rng.standard_normal(s).astype(numpy.float32)  # noqa: E731
    scale = (hidden // heads) ** -0.5
    mask = numpy.zeros((32, 1, 1, 128), dtype=numpy.float32)
    mask[::2, ..., 100:] = numpy.finfo(numpy.float32).min  # half the rows padded after 100 tokens
    ids = rng.integers(0, VOCAB, (32, 128))
    labels = rng.integers(0, NER_LABELS, TOKENS)
    T = torch.nn.functional
    return [
        Op(f"GELU exact ({TOKENS}, {intermediate})", [2 * normal(TOKENS, intermediate)],
           lambda x: F.gelu(x), lambda x: T.gelu(x), exact=_gelu_tail),
        Op(f"GELU tanh ({TOKENS}, {intermediate})", [2 * normal(TOKENS, intermediate)],
           lambda x: F.gelu(x, approximate="tanh"), lambda x: T.gelu(x, approximate="tanh")),
        Op(f"softmax(scores * scale + mask) (32, {heads}, 128, 128)", [3 * normal(32, heads, 128, 128), mask],
           lambda s, m: F.softmax(s * scale + minisft.tensor(m)), lambda s, m: torch.softmax(s * scale + torch.tensor(m), -1),
           grads=(True, None)),
        Op(f"dropout(softmax(scores * scale + mask)) (32, {heads}, 128, 128)", [3 * normal(32, heads, 128, 128), mask],
           lambda s, m: F.dropout(F.softmax(s * scale + minisft.tensor(m)), DROPOUT),
           lambda s, m: T.dropout(torch.softmax(s * scale + torch.tensor(m), -1), DROPOUT),
           exact=False, grads=(True, None)),
        Op(f"attention (SDPA, mask, dropout) (32, {heads}, 128, {hidden // heads})",
           [normal(32, heads, 128, hidden // heads) for _ in range(3)] + [mask],
           lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=DROPOUT),
           lambda q, k, v, m: T.scaled_dot_product_attention(q, k, v, attn_mask=torch.tensor(m), dropout_p=DROPOUT),
           exact=False, grads=(True, True, True, None)),
        Op(f"LayerNorm ({TOKENS}, {hidden})", [normal(TOKENS, hidden), 1 + 0.1 * normal(hidden), 0.1 * normal(hidden)],
           lambda x, w, b: F.layer_norm(x, (hidden,), w, b, eps=1e-12),
           lambda x, w, b: T.layer_norm(x, (hidden,), w, b, eps=1e-12)),
        Op(f"dropout ({TOKENS}, {intermediate})", [normal(TOKENS, intermediate)],
           lambda x: F.dropout(x, DROPOUT), lambda x: T.dropout(x, DROPOUT), exact=False),
        Op(f"cross-entropy ({TOKENS}, {NER_LABELS})", [normal(TOKENS, NER_LABELS), labels],
           lambda x, y: F.cross_entropy(x, y), lambda x, y: T.cross_entropy(x, torch.tensor(y)), grads=(True, None)),
        Op(f"embedding ({VOCAB}, {hidden}) at (32, 128) ids", [ids, 0.02 * normal(VOCAB, hidden)],
           lambda i, w: F.embedding(i, w), lambda i, w: T.embedding(torch.tensor(i), w), grads=(None, True)),
        Op(f"residual add ({TOKENS}, {hidden})", [normal(TOKENS, hidden), normal(TOKENS, hidden)],
           lambda a, b: a + b, lambda a, b: a + b, grads=(True, True)),
    ]


def _op_figures(label, op, rng, repeats):
    import torch

    grads = op.grads or (True,) * len(op.inputs)
    ours, theirs = _minisft_run(op.ours, grads), _torch_run(op.theirs, grads)
    with torch.no_grad():
        shape = op.theirs(*(torch.tensor(x) if g else x for x, g in zip(op.inputs, grads))).shape
    upstream = rng.standard_normal(tuple(shape)).astype(numpy.float32) if len(shape) else None
    times = alternate({"minisft": lambda: ours(op.inputs, upstream), "torch": lambda: theirs(op.inputs, upstream)},
                      repeats=repeats)
    figures = [Figure(f"{label}: {op.name}, forward + backward", "ms", [1e3 * t for t in times["minisft"]],
                      [1e3 * t for t in times["torch"]])]
    if op.exact:
        exact = _torch_run(op.theirs, grads, dtype=torch.float64)(op.inputs, upstream)
        if callable(op.exact):
            exact = op.exact(op.inputs[0], *exact, upstream)
        results = [run(op.inputs, upstream) for run in (ours, theirs, lambda *_: exact)]
        for what, pick in (("output", lambda r: r[0]), ("input gradient", lambda r: r[1][0])):
            mine, torch_s, truth = (pick(r) for r in results)
            figures.append(Figure(f"{label}: {op.name}, {what} error", "ulps", [ulps(mine, truth)], [ulps(torch_s, truth)],
                                  note="largest over the elements, against float64 math"))
    return figures


def _adam_figures(label, env, repeats):
    """One AdamW update over every parameter of the model (MiniLM's own; BERT-base skipped:
    its weights are not fetched)."""
    import torch

    from minisft.models.bert import BertModel
    from minisft.optim import AdamW

    model = BertModel.from_pretrained(env.model_dir)
    params = list(model.parameters())
    rng = numpy.random.default_rng(1)
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(numpy.float32) * 1e-3
    ours = AdamW(params, lr=2e-5, weight_decay=0.01)
    theirs_params = [torch.nn.Parameter(torch.tensor(p.numpy())) for p in params]
    for p, q in zip(theirs_params, params):
        p.grad = torch.tensor(q.grad)
    theirs = torch.optim.AdamW(theirs_params, lr=2e-5, weight_decay=0.01)
    times = alternate({"minisft": ours.step, "torch": theirs.step}, repeats=repeats)
    count = sum(p.data.size for p in params)
    return [Figure(f"{label}: AdamW update, {count / 1e6:.1f}M parameters", "ms", [1e3 * t for t in times["minisft"]],
                   [1e3 * t for t in times["torch"]], note="torch.optim.AdamW with its defaults")]


def _product_figures(label, shape, repeats):
    """The matrix products of a step at these sizes, as minisft runs them (fixed tiles of
    GEMM_TILE rows on minisft's threads, the BLAS on one thread) against one call with the
    BLAS on its own threads (the reference column): forward x W^T, backward g W and g^T x."""
    from minisft.kernels import fast

    rng = numpy.random.default_rng(2)
    hidden, intermediate = shape["hidden"], shape["intermediate"]
    figures = []
    for n_in, n_out in ((hidden, hidden), (hidden, intermediate), (intermediate, hidden)):
        x = rng.standard_normal((TOKENS, n_in)).astype(numpy.float32)
        w = rng.standard_normal((n_out, n_in)).astype(numpy.float32)
        g = rng.standard_normal((TOKENS, n_out)).astype(numpy.float32)
        for what, tiled, whole in (
                (f"x W^T ({TOKENS}, {n_in}) x ({n_in}, {n_out})", lambda: fast.linear_forward(x, w, None), lambda: x @ w.T),
                (f"g W and g^T x, out {n_out}, in {n_in}", lambda: fast.linear_backward(g, x, w, (True, True, False)),
                 lambda: (g @ w, g.T @ x))):
            times = alternate({"tiles": tiled, "blas": whole}, repeats=repeats)
            figures.append(Figure(f"{label}: product {what}", "ms", [1e3 * s for s in times["tiles"]],
                                  [1e3 * s for s in times["blas"]],
                                  note=f"tiles of {fast.GEMM_TILE} rows on minisft's threads / the BLAS's own threads"))
    return figures


def run(env, quick):
    if not env.reference:
        return []
    repeats = 3 if quick else 7
    rng = numpy.random.default_rng(0)
    figures = []
    for label, shape in SHAPES.items():
        for op in _ops(shape, rng):
            figures += _op_figures(label, op, rng, repeats)
        figures += _product_figures(label, shape, repeats)
    figures += _adam_figures("MiniLM", env, repeats)
    return figures
