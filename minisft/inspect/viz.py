"""Pictures of what happens inside: the autograd graph as Graphviz DOT, attention as heat maps,
training curves from metrics.jsonl. Drawing needs the `viz` extra (matplotlib, graphviz),
imported only when a picture is drawn.

    dot = to_dot(loss, model, grad_norms=True)      # after loss.backward()
    draw_attention(probabilities[0], tokens, "attention.png")
    draw_curves(["runs/a", "runs/b"], "runs/a/curves.png")
"""
import json
import math
import pathlib

from minisft.engine.errors import MissingFile, UsageError
from minisft.engine.errors import MissingExtra
from minisft.engine.tensor import Tensor
from minisft.files.atomic import write_bytes_atomic

VIZ_EXTRA = "pip install -e '.[viz]'"
EVALUATION_PREFIXES = ("eval_", "test_")  # metrics.jsonl keys of the dev and test sets' scores


def _require(module):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise MissingExtra(f"drawing needs {module.split('.')[0]}, which the viz extra installs: {VIZ_EXTRA}") from None


# --- the autograd graph --------------------------------------------------------------------
def _shape(shape):
    return "(" + ", ".join(map(str, shape)) + ")"


def _quote(text):
    """A DOT string literal; line breaks as DOT's \\n."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(tensor, model=None, grad_norms=False):
    """Graphviz DOT source for the graph that computed `tensor`: a box per op with its output
    shape, an ellipse per leaf tensor (a parameter is named by its path in `model`), and an
    arrow from each input to the op that used it, pointing towards the result. With
    grad_norms, each leaf also shows the L2 norm of its .grad (call after backward)."""
    names = {id(p): name for name, p in model.named_parameters()} if model is not None else {}
    ids, lines, edges = {}, [], []

    def node(obj):
        if id(obj) in ids:
            return ids[id(obj)], False
        ids[id(obj)] = f"n{len(ids)}"
        return ids[id(obj)], True

    root, _ = node(tensor)
    lines.append(f"  {root} [label={_quote('output ' + _shape(tensor.shape))}, shape=doubleoctagon];")
    stack = [(tensor._ctx if tensor._ctx is not None else tensor, root)]
    while stack:
        obj, child = stack.pop()
        name, new = node(obj)
        edges.append(f"  {name} -> {child};")
        if not new:
            continue
        if isinstance(obj, Tensor):  # a leaf: a parameter or an input that wants a gradient
            label = names.get(id(obj), "tensor") + "\n" + _shape(obj.shape)
            if grad_norms and obj.grad is not None:
                label += f"\ngrad norm {float((obj.grad.astype('float64') ** 2).sum()) ** 0.5:.3g}"
            lines.append(f"  {name} [label={_quote(label)}, shape=ellipse, style=filled, fillcolor=lightblue];")
            continue
        if obj.parents is None:
            raise ValueError("the graph behind this tensor was freed by backward; draw it before calling "
                             "backward, or call backward on a new forward pass")
        label = type(obj).__name__.lstrip("_") + "\n" + _shape(obj.output_shape)
        lines.append(f"  {name} [label={_quote(label)}, shape=box];")
        stack.extend((parent, name) for parent in obj.parents if parent is not None)
    header = ["digraph minisft {", "  rankdir=BT;", "  graph [nodesep=0.15, ranksep=0.3];",
              '  node [fontname="Helvetica", fontsize=10];']
    return "\n".join(header + lines + edges + ["}"]) + "\n"


def render_dot(dot, path):
    """Draw `dot` into `path` with Graphviz, in the format its suffix names (.svg, .png,
    .pdf); without Graphviz (the viz extra and its `dot` program), write
    path.with_suffix(".dot") instead. Returns (written path, note or None)."""
    path = pathlib.Path(path)
    try:
        graphviz = _require("graphviz")
        kind = path.suffix.lstrip(".") or "svg"
        if kind == "png":  # a screen's resolution: the graph is large
            dot = dot.replace("{\n", "{\n  graph [dpi=52];\n", 1)
        drawing = graphviz.Source(dot).pipe(format=kind)
    except (MissingExtra, OSError, RuntimeError) as exc:  # graphviz.ExecutableNotFound is a RuntimeError
        fallback = path.with_suffix(".dot")
        _write_bytes(dot.encode("utf-8"), fallback)
        return fallback, (f"wrote the DOT source instead of {path.name} ({exc}); install the viz extra ({VIZ_EXTRA}) "
                          "and Graphviz's dot program (e.g. apt install graphviz), or render it with "
                          f"`dot -Tsvg {fallback} -o {path}`")
    _write_bytes(drawing, path)
    return path, None


def _write_bytes(data, path):
    """Write into `path` (its directory made if needed) through a temporary file and a
    rename, so that no half-written picture is left."""
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(data, path)


def _save_figure(figure, path):
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format=pathlib.Path(path).suffix.lstrip(".") or "png", dpi=100)
    _write_bytes(buffer.getvalue(), path)


def require_drawing():
    """Raise MissingExtra now, before any work, when matplotlib is not installed."""
    _require("matplotlib")


def _pyplot():
    matplotlib = _require("matplotlib")
    matplotlib.use("Agg")  # files only, no window
    return _require("matplotlib.pyplot")


# --- attention ------------------------------------------------------------------------------
def draw_attention(probabilities, tokens, path, heads=None, title=""):
    """Heat maps of attention probabilities (heads, L, L) over the word pieces `tokens`: one
    panel per head in `heads` (default all), query tokens down, key tokens across."""
    plt = _pyplot()
    heads = list(range(probabilities.shape[0])) if heads is None else list(heads)
    columns = min(4, len(heads))
    rows = math.ceil(len(heads) / columns)
    size = max(2.5, 0.22 * len(tokens) + 0.8)
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns + 2.2, size * rows + 1.2), squeeze=False,
                                layout="constrained")
    for ax in axes.flat[len(heads):]:
        ax.axis("off")
    for index, (ax, head) in enumerate(zip(axes.flat, heads)):
        image = ax.imshow(probabilities[head], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {head}", fontsize=10)
        first_column, bottom_row = index % columns == 0, index // columns == rows - 1 or index + columns >= len(heads)
        ax.set_xticks(range(len(tokens)), tokens if bottom_row else [], rotation=90, fontsize=8)
        ax.set_yticks(range(len(tokens)), tokens if first_column else [], fontsize=8)
        if bottom_row:
            ax.set_xlabel("key (attended to)", fontsize=9)
        if first_column:
            ax.set_ylabel("query (attending)", fontsize=9)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention probability")
    figure.suptitle(title, fontsize=11)
    _save_figure(figure, path)
    plt.close(figure)


# --- training curves ------------------------------------------------------------------------
def read_metrics(run_directory):
    """(training records, evaluation records) of a run's metrics.jsonl, each sorted by step; a
    step logged twice (a run resumed from a checkpoint before it) keeps its last record, so
    that an interrupted and resumed run reads as one run."""
    path = pathlib.Path(run_directory) / "metrics.jsonl"
    if not path.is_file():
        raise MissingFile(f"{path} does not exist: give a run directory that `minisft train --output` "
                                "wrote (it holds metrics.jsonl)")
    training, evaluation = {}, {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{path}: line {number} is not a metrics record with a step; "
                             "it was not written by minisft train") from None
        if "loss" in record:
            training[step] = record
        scores = {k: v for k, v in record.items() if k.startswith(EVALUATION_PREFIXES)}
        if scores:
            evaluation.setdefault(step, {"step": step}).update(scores)
    return [training[s] for s in sorted(training)], [evaluation[s] for s in sorted(evaluation)]


def smoothed(values, weight=0.6):
    """Exponential moving average with bias correction (as TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def draw_curves(run_directories, path):
    """One PNG: training loss (raw and smoothed), learning rate and each evaluation metric
    against step, one colour per run. Returns what was drawn: {run name: {curve: (steps,
    values)}}, the curves being "loss", "learning_rate" and "eval_NAME"/"test_NAME"."""
    plt = _pyplot()
    runs = [(pathlib.Path(d).resolve().name, *read_metrics(d)) for d in run_directories]
    metrics = sorted({k.split("_", 1)[1] for _, _, evaluation in runs for r in evaluation for k in r
                      if k != "step" and "/" not in k})  # per-class scores (f1/NAME) stay in the file
    panels = ["loss", "learning rate", *metrics]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = {}
    for index, (name, training, evaluation) in enumerate(runs):
        colour = colours[index % len(colours)]
        steps = [r["step"] for r in training]
        loss = [r["loss"] for r in training]
        curves = drawn.setdefault(name, {"loss": (steps, loss),
                                         "learning_rate": (steps, [r["learning_rate"] for r in training])})
        ax = axes.flat[0]
        ax.plot(steps, loss, color=colour, alpha=0.35, linewidth=0.8, label=f"{name} (raw)")
        ax.plot(steps, smoothed(loss), color=colour, linewidth=1.6, label=f"{name} (smoothed)")
        axes.flat[1].plot(*curves["learning_rate"], color=colour, label=name)
        for ax, metric in zip(axes.flat[2:], metrics):
            for prefix, style, split in (("eval_", "o-", "dev"), ("test_", "*", "test")):
                points = [(r["step"], r[prefix + metric]) for r in evaluation if prefix + metric in r]
                if points:
                    curves[prefix + metric] = tuple(map(list, zip(*points)))
                    ax.plot(*zip(*points), style, color=colour, markersize=8 if split == "test" else 5,
                            label=f"{name} ({split})")
    last = max((r["step"] for _, training, evaluation in runs for r in training + evaluation), default=1)
    for ax, title in zip(axes.flat, panels):
        ax.set_title(title, fontsize=11)
        ax.set_xlim(0, last * 1.04)
        ax.xaxis.set_major_locator(_require("matplotlib.ticker").MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes.flat[0].set_ylabel("training loss")
    axes.flat[1].set_ylabel("learning rate")
    axes.flat[1].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return drawn
