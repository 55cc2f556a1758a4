"""Looking inside: the graph as DOT, attention heat maps, training curves, the model summary,
and their commands, on the tiny BERT (drawing needs the viz extra; those tests skip without)."""
import json
import shutil
import struct
import sys

import numpy as np
import pytest

from minisft import cli, viz
from minisft.cli import inside
from minisft.inspect import summary
from minisft.lean.feed_forward import feed_forward
from minisft.models.auto import AutoModelForSequenceClassification, AutoTokenizer
from conftest import FIXTURES

TINY = FIXTURES / "tiny-bert"


def png_size(path):
    """(width, height) from a PNG's header."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _step(layers=1):
    model, tokenizer = inside._model(TINY, layers)
    out = model(**inside._inputs(tokenizer(["the film was good"])), labels=np.array([1]))
    return model, out.loss


def test_the_graph_names_every_parameter_with_its_shape_and_gradient_norm():
    model, loss = _step(layers=1)
    loss.backward(retain_graph=True)
    dot = viz.to_dot(loss, model, grad_norms=True)
    assert dot.startswith("digraph minisft {") and dot.rstrip().endswith("}")
    for name, parameter in model.named_parameters():
        shape = "(" + ", ".join(map(str, parameter.shape)) + ")"
        assert f"{name}\\n{shape}\\ngrad norm" in dot, name
    assert "encoder.layer.1." not in dot  # one layer kept
    for op in ("Linear\\n(1, 6, 96)", "PackedAttention", "LayerNorm", "CrossEntropy", "FeedForward\\n(1, 6, 32)"):
        assert op in dot


def test_a_graph_freed_by_backward_is_named():
    model, loss = _step()
    loss.backward()
    with pytest.raises(ValueError, match="freed by backward"):
        viz.to_dot(loss, model)


def test_the_graph_command_writes_svg_with_graphviz_else_the_dot_source(tmp_path, capsys, monkeypatch):
    if shutil.which("dot") and pytest.importorskip("graphviz"):
        assert cli.main(["graph", "--model", str(TINY), "--output", str(tmp_path / "graph.svg")]) == 0
        assert "<svg" in (tmp_path / "graph.svg").read_text() and "classifier.weight" in (tmp_path / "graph.svg").read_text()
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot program
    assert cli.main(["graph", "--model", str(TINY), "--output", str(tmp_path / "g2.svg")]) == 0
    assert "digraph" in (tmp_path / "g2.dot").read_text() and not (tmp_path / "g2.svg").exists()
    assert "pip install -e '.[viz]'" in capsys.readouterr().err


def test_attention_heat_map_data_are_the_attention_probabilities(tmp_path):
    pytest.importorskip("matplotlib")
    path, probabilities = inside.attention(TINY, "the film was good", tmp_path / "a.png", layer=1)
    model = AutoModelForSequenceClassification.from_pretrained(TINY, strict=False).eval()
    batch = AutoTokenizer.from_pretrained(TINY)(["the film was good"])
    expected = model(**inside._inputs(batch), output_attentions=True).attentions[1].numpy()[0]
    np.testing.assert_array_equal(probabilities, expected)
    width, height = png_size(path)
    assert width > 600 and height > 300  # 4 heads side by side
    one, _ = inside.attention(TINY, "the film was good", tmp_path / "h.png", layer=0, head=2)
    assert png_size(one)[0] < width


@pytest.mark.parametrize("argv, message", [
    (["--layer", "2"], r"--layer 2: .* has layers 0 to 1"),
    (["--head", "4"], r"--head 4: layer 1 has heads 0 to 3"),
])
def test_attention_indices_out_of_range_name_the_valid_range(argv, message, capsys):
    assert cli.main(["attention", "--model", str(TINY), "a film", *argv]) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


def test_empty_sentences_and_non_checkpoints_are_refused(tmp_path, capsys):
    assert cli.main(["attention", "--model", str(TINY), "  "]) == 2
    assert "it is empty" in capsys.readouterr().err
    for command in (["attention", "--model", str(tmp_path), "a film"], ["summary", "--model", str(tmp_path)],
                    ["graph", "--model", str(tmp_path)]):
        assert cli.main(command) == 2
        assert "is not a checkpoint directory (it has no config.json)" in capsys.readouterr().err


def _metrics(directory, lines):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


def test_curves_are_metrics_jsonl_and_a_resumed_run_is_one_curve(tmp_path):
    pytest.importorskip("matplotlib")
    first = [{"step": s, "epoch": 0, "loss": 1.0 / s, "learning_rate": 1e-4 * (1 - s / 40)} for s in (10, 20, 30)]
    resumed = [{"step": s, "epoch": 0, "loss": 0.5 / s, "learning_rate": 1e-4 * (1 - s / 40)} for s in (30, 40)]
    evaluation = [{"step": 20, "epoch": 0, "eval_accuracy": 0.7, "eval_f1": 0.6},
                  {"step": 40, "epoch": 1, "eval_accuracy": 0.8, "eval_f1": 0.75}, {"step": 40, "test_accuracy": 0.79}]
    run = _metrics(tmp_path / "run", first[:2] + [evaluation[0]] + first[2:] + resumed + evaluation[1:])
    other = _metrics(tmp_path / "other", first)
    drawn = viz.draw_curves([run, other], tmp_path / "curves.png")
    assert drawn["run"]["loss"] == ([10, 20, 30, 40], [0.1, 0.05, 0.5 / 30, 0.5 / 40])  # step 30: the resumed record
    assert drawn["run"]["eval_accuracy"] == ([20, 40], [0.7, 0.8]) and drawn["run"]["test_accuracy"] == ([40], [0.79])
    assert drawn["other"]["learning_rate"][1] == [r["learning_rate"] for r in first]
    assert png_size(tmp_path / "curves.png") == (1500, 720)  # 3 x 2 panels: loss, lr, accuracy, f1


def test_plot_needs_metrics_jsonl(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist: give a run directory" in capsys.readouterr().err


def test_train_plot_draws_the_curves_at_each_evaluation(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [f"the film was {w},{label}" for w, label in (("good", "pos"), ("bad", "neg"), ("great", "pos"))] * 4
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    output = tmp_path / "run"
    assert cli.main(["train", "--model", str(TINY), "--train", str(tmp_path / "train.csv"), "--eval",
                     str(tmp_path / "train.csv"), "--output", str(output), "--max-steps", "4", "--batch-size", "4",
                     "--eval-steps", "2", "--logging-steps", "1", "--plot"]) == 0
    assert png_size(output / "curves.png")[0] > 0


def test_without_the_viz_extra_the_commands_name_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    run = _metrics(tmp_path / "run", [{"step": 1, "loss": 1.0, "learning_rate": 1e-5}])
    for command in (["plot", str(run)], ["attention", "--model", str(TINY), "a film"],
                    ["train", "--model", str(TINY), "--train", "x.csv", "--output", str(tmp_path / "o"), "--plot"]):
        assert cli.main(command) == 2, command
        assert "the viz extra installs: pip install -e '.[viz]'" in capsys.readouterr().err


def test_summary_counts_parameters_flops_and_saved_arrays():
    model = AutoModelForSequenceClassification.from_pretrained(TINY, strict=False, lean=False).train()
    ids = np.arange(5, 5 + 2 * 7).reshape(2, 7)
    rows = {row.path: row for row in summary.summarize(model, {"input_ids": ids, "labels": np.array([0, 1])})}
    root = rows[type(model).__name__]
    assert root.parameters == sum(p.data.size for p in model.parameters())
    dense = rows["bert.encoder.layer.0.intermediate.dense"]  # 32 -> 37 on 14 tokens
    assert dense.output_shape == (2, 7, 37) and dense.forward_flops == 2 * 14 * 32 * 37
    assert dense.backward_flops == 2 * dense.forward_flops
    attention = rows["bert.encoder.layer.0.attention.self"]  # q, k, v 32 -> 96, then 4 B L L H
    assert attention.forward_flops == 2 * 14 * 32 * 96 + 4 * 2 * 7 * 7 * 32
    layers = [rows[f"bert.encoder.layer.{i}"] for i in range(2)]
    assert rows["bert.encoder"].forward_flops == sum(r.forward_flops for r in layers)
    assert rows["bert.encoder.layer.0.intermediate"].activation_bytes >= 2 * 7 * 37 * 4  # GELU keeps its input
    assert model.bert.encoder.layer[0].__dict__.get("forward") is None  # the wrappers are removed


def test_the_feed_forward_node_counts_its_products():
    """lean's feed_forward's FLOPs: two products forward; backward, dW2, the gradient at the
    pre-activation and dW1 and dx, each as its input needs."""
    import minisft

    rng = np.random.default_rng(0)
    x, w1, b1, w2, b2 = (minisft.tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=grad)
                         for shape, grad in (((2, 7, 4), True), ((9, 4), False), ((9,), False), ((3, 9), True),
                                             ((3,), True)))
    node = feed_forward(x, w1, b1, w2, b2)._ctx
    first, second = 2 * 14 * 9 * 4, 2 * 14 * 9 * 3
    shapes = [a.shape for a in (x, w1, b1, w2, b2)]
    assert summary.matmul_flops(node, shapes) == (first + second, 2 * second + first)


def test_the_summary_command_prints_the_tree_and_profile(capsys):
    assert cli.main(["summary", "--model", str(TINY), "--batch", "2", "--length", "8", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "intermediate (BertIntermediate)" in out and "fwd ms" in out and "fwd peak" in out
    assert "parameters: " in out and "matrix-product FLOPs: forward" in out
    assert cli.main(["summary", "--model", str(TINY), "--length", "41"]) == 2
    assert "--length 41: " in capsys.readouterr().err
