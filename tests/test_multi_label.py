"""Multi-label classification: reading label lists, the BCE head against transformers', the
metrics, and `minisft train/evaluate/predict --task multi-label-classification`."""
import json

import numpy as np
import pytest

from minisft import cli, tasks
from minisft.models.auto import AutoModelForSequenceClassification
from minisft.tasks.data import DataError
from conftest import FIXTURES, assert_close
from helpers import NEGATIVE, POSITIVE, assert_layers_and_gradients_match

TASK = tasks.get("multi-label-classification")
TINY = FIXTURES / "tiny-bert"


def test_labels_are_json_lists_or_separated_cells(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "a", "labels": ["joy", "anger"]}\n{"text": "b", "labels": []}\n'
                     '{"text": "c", "labels": "joy"}\n')
    assert [e.label for e in TASK.read(jsonl)] == [["anger", "joy"], [], ["joy"]]
    csv = tmp_path / "a.csv"
    csv.write_text('text,label\nx,"joy; fear;joy"\ny,\nz,fear\n')
    assert [e.label for e in TASK.read(csv)] == [["fear", "joy"], [], ["fear"]]
    assert [e.label for e in TASK.read(csv, label_separator="|")] == [["joy; fear;joy"], [], ["fear"]]
    piped = tmp_path / "b.tsv"
    piped.write_text("text\tlabel\nx\tjoy|fear\n")
    assert [e.label for e in TASK.read(piped, label_separator="|")] == [["fear", "joy"]]


def test_a_label_that_is_not_a_list_names_the_row(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a", "labels": ["joy"]}\n{"text": "b", "labels": {"joy": 1}}\n')
    with pytest.raises(DataError, match=r"a.jsonl line 2: the label \{'joy': 1\} is not a list of class names"):
        TASK.read(path)


def test_targets_are_multi_hot_rows_in_the_vocabulary_order(tmp_path):
    from minisft.models.auto import AutoTokenizer
    from minisft.tasks.data import Example, collate

    examples = [Example("good", label=["b", "a"]), Example("bad", label=[]), Example("fun", label=["c"])]
    labels = TASK.label_vocab(examples)
    features = TASK.encode(examples, AutoTokenizer.from_pretrained(TINY), labels)
    batch = collate(features)
    assert labels.names == ["a", "b", "c"] and batch["labels"].dtype == np.float32
    assert batch["labels"].tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]


def test_the_head_and_its_bce_loss_match_transformers(device):
    """Logits, loss, every layer and gradient against make_head_fixtures.py's
    BertForSequenceClassification(problem_type="multi_label_classification")."""
    ref = np.load(FIXTURES / "tiny_bert_multilabel_outputs.npz")
    model = AutoModelForSequenceClassification.from_pretrained(TINY, num_labels=4,
                                                               problem_type="multi_label_classification")
    model.load_state_dict({**model.state_dict(), "classifier.weight": ref["classifier.weight"],
                           "classifier.bias": ref["classifier.bias"]})
    model = model.eval().to(device)
    out = model(ref["input_ids"], attention_mask=ref["attention_mask"], labels=ref["labels"],
                output_hidden_states=True, output_attentions=True)
    assert_close(out.logits, ref["logits"], atol=1e-5, rtol=0, what="logits")
    assert_close(out.loss, ref["loss"], atol=1e-5, rtol=0, what="loss")
    assert_layers_and_gradients_match(model, out, out.loss, ref)


def test_metrics_are_scikit_learns_on_multi_hot_rows():
    # logits > 0 <=> sigmoid > 0.5; rows: predicted {a, b}, {}, {b, c}, {a}; true {a}, {}, {b, c}, {c}
    logits = np.array([[3, 2, -1], [-2, -2, -2], [-1, 1, 4], [2, -3, -3]], dtype=np.float32)
    true = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=np.float32)
    scores = TASK.compute_metrics(logits, true, ["a", "b", "c"])
    # hits a 1, b 1, c 1; predicted a 2, b 2, c 1; true a 1, b 1, c 2
    assert scores["micro_f1"] == pytest.approx(2 * 3 / (5 + 4))
    assert scores["f1/a"] == pytest.approx(2 / 3) and scores["f1/b"] == pytest.approx(2 / 3)
    assert scores["f1/c"] == pytest.approx(2 / 3)
    assert scores["macro_f1"] == pytest.approx(2 / 3)
    assert scores["subset_accuracy"] == pytest.approx(2 / 4)
    strict = TASK.compute_metrics(logits, true, ["a", "b", "c"], threshold=0.95)  # sigmoid(3) = 0.9526: 3 and 4 only
    assert (strict["f1/a"], strict["f1/b"], strict["f1/c"]) == (1.0, 0.0, pytest.approx(2 / 3))


def _write_topics(path, count, rng):
    """Reviews whose labels are the kinds of words they hold: 'praise', 'complaint', both or none."""
    lines = ["text,labels"]
    for _ in range(count):
        words = list(rng.choice(POSITIVE + NEGATIVE + ["film"], 3))
        kinds = sorted({"praise" for w in words if w in POSITIVE} | {"complaint" for w in words if w in NEGATIVE})
        lines.append(f"the {' and '.join(words)},{';'.join(kinds)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def topics(tmp_path):
    rng = np.random.default_rng(0)
    return _write_topics(tmp_path / "train.csv", 48, rng), _write_topics(tmp_path / "dev.csv", 16, rng)


def test_train_evaluate_and_predict(tmp_path, topics, capsys):
    output = tmp_path / "out"
    code = cli.main(["train", "--model", str(TINY), "--task", "multi-label-classification", "--train", str(topics[0]),
                     "--eval", str(topics[1]), "--output", str(output), "--batch-size", "8", "--learning-rate", "1e-3",
                     "--epochs", "2", "--threshold", "0.4"])
    assert code == 0
    final = json.loads(capsys.readouterr().out)
    assert {"eval_micro_f1", "eval_macro_f1", "eval_subset_accuracy", "eval_f1/praise", "eval_f1/complaint"} <= set(final)
    config = json.loads((output / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {"0": "complaint", "1": "praise"}
    assert json.loads((output / "training_args.json").read_text())["threshold"] == 0.4
    assert cli.main(["evaluate", "--model", str(output), "--data", str(topics[1])]) == 0
    assert json.loads(capsys.readouterr().out)["micro_f1"] == final["eval_micro_f1"]
    assert cli.main(["predict", "--model", str(output), "--data", str(topics[1]), "--threshold", "0.9"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 16 and set(records[0]["probabilities"]) == {"complaint", "praise"}
    for record in records:
        assert record["labels"] == [n for n, p in record["probabilities"].items() if p >= 0.9]


def test_transformers_loads_the_model_and_predicts_the_same(tmp_path, topics):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    output = tmp_path / "out"
    assert cli.main(["train", "--model", str(TINY), "--task", "multi-label-classification", "--train", str(topics[0]),
                     "--output", str(output), "--batch-size", "8", "--max-steps", "3"]) == 0
    ours = AutoModelForSequenceClassification.from_pretrained(output).eval()
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(output).eval()
    assert theirs.config.problem_type == "multi_label_classification"
    ids = np.array([[2, 10, 11, 12, 3], [2, 13, 3, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        expected = theirs(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert_close(ours(ids, attention_mask=mask).logits, expected, atol=1e-4, rtol=0, what="logits")


@pytest.mark.parametrize("extra, message", [
    (("--task", "classification", "--threshold", "0.3"),
     "--threshold 0.3: applies to multi-label-classification only, not classification"),
    (("--label-separator", "|"), "--label-separator '|': applies to multi-label-classification only"),
])
def test_options_of_multi_label_are_refused_elsewhere(tmp_path, topics, capsys, extra, message):
    code = cli.main(["train", "--model", str(TINY), "--train", str(topics[0]), "--output", str(tmp_path / "out"),
                     *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_an_unknown_label_at_evaluation_is_one_line_and_exit_2(tmp_path, topics, capsys):
    dev = tmp_path / "odd.csv"
    dev.write_text("text,labels\nthe good film,praise;surprise\n")
    code = cli.main(["train", "--model", str(TINY), "--task", "multi-label-classification", "--train", str(topics[0]),
                     "--eval", str(dev), "--output", str(tmp_path / "out"), "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "odd.csv: 1 row has labels not seen in training ('surprise')" in err[-1]


def test_metrics_equal_scikit_learns_on_the_reference_rows():
    """tests/fixtures/make_training_fixtures.py: f1_score(average="micro" / "macro" / None)
    and accuracy_score on 80 rows of 5 classes, one of them never true."""
    ref = json.loads((FIXTURES / "metrics_reference.json").read_text())
    names = list("abcde")
    scores = TASK.compute_metrics(np.array(ref["multi_label_logits"], dtype=np.float32),
                                  np.array(ref["multi_label_true"]), names)
    assert scores["micro_f1"] == pytest.approx(ref["multi_label_micro_f1"], rel=1e-12)
    assert scores["macro_f1"] == pytest.approx(ref["multi_label_macro_f1"], rel=1e-12)
    assert scores["subset_accuracy"] == pytest.approx(ref["multi_label_subset_accuracy"], rel=1e-12)
    assert [scores[f"f1/{n}"] for n in names] == pytest.approx(ref["multi_label_per_class_f1"], rel=1e-12)
