"""The multiple-choice task: JSON lines and SWAG columns read and checked, a question beside
each choice batched as (B, C, L), and the command line end to end on the tiny BERT (the
head itself is checked against transformers in tests/test_families.py)."""
import json

import numpy as np
import pytest

from minisft import cli, tasks
from minisft.tasks.data import DataError, collate
from minisft.tokenizer import BertTokenizer
from conftest import FIXTURES
from helpers import NEGATIVE, POSITIVE

TINY = FIXTURES / "tiny-bert"
MC = tasks.get("multiple-choice")


def choices_file(path, count, seed):
    """JSON lines: "the film was good" and three choices, the right one the word of the same
    sentiment."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(count):
        positive = rng.random() < 0.5
        right = str(rng.choice(POSITIVE if positive else NEGATIVE))
        wrong = [str(w) for w in rng.choice(NEGATIVE if positive else POSITIVE, 2)]
        label = int(rng.integers(0, 3))
        choices = wrong[:label] + [f"it was {right}"] + wrong[label:]
        choices = [c if c.startswith("it was") else f"it was {c}" for c in choices]
        question = f"the film was {rng.choice(POSITIVE if positive else NEGATIVE)}"
        lines.append(json.dumps({"question": question, "choices": choices, "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_swag_columns_make_each_choice_of_sent2_and_an_ending(tmp_path):
    path = tmp_path / "swag.csv"
    path.write_text("sent1,sent2,ending0,ending1,ending2,ending3,label\n"
                    "john visited paris,he,was good,was bad,was dull,was long,1\n")
    (example,) = MC.read(path)
    assert example.text == "john visited paris" and example.label == 1
    assert example.text_pair == ["he was good", "he was bad", "he was dull", "he was long"]


@pytest.mark.parametrize("line, message", [
    ({"question": "q", "choices": ["a", "b"], "label": 2}, r"line 2: label 2 is out of range for its 2 choices"),
    ({"question": "q", "choices": ["a"], "label": 0}, r"line 2: expected a question .* at least 2 choices"),
    ({"question": "q", "choices": ["a", "b", "c"], "label": 0}, r"line 2: 3 choices, but line 1 has 2"),
])
def test_bad_records_are_named(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "label": 0}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message):
        MC.read(path)


def test_each_question_is_batched_beside_every_choice(tmp_path):
    examples = MC.read(choices_file(tmp_path / "mc.jsonl", 3, seed=0))
    features = MC.encode(examples, BertTokenizer.from_pretrained(TINY), MC.label_vocab(examples))
    batch = collate(features)
    assert batch["input_ids"].shape[:2] == (3, 3) and batch["labels"].tolist() == [e.label for e in examples]
    assert batch["attention_mask"].shape == batch["input_ids"].shape


def test_the_command_line_trains_evaluates_and_predicts(tmp_path, capsys):
    train, dev = choices_file(tmp_path / "train.jsonl", 48, seed=1), choices_file(tmp_path / "dev.jsonl", 12, seed=2)
    output = tmp_path / "out"
    assert cli.main(["train", "--model", str(TINY), "--train", str(train), "--eval", str(dev), "--task",
                     "multiple-choice", "--output", str(output), "--batch-size", "8", "--learning-rate", "1e-3",
                     "--epochs", "2"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"eval_accuracy"}
    assert json.loads((output / "config.json").read_text())["architectures"] == ["BertForMultipleChoice"]
    assert cli.main(["evaluate", "--model", str(output), "--data", str(dev)]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"accuracy"}
    assert cli.main(["predict", "--model", str(output), "--data", str(dev)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 12 and len(records[0]["probabilities"]) == 3 and 0 <= records[0]["label"] < 3


def test_a_family_without_a_multiple_choice_head_says_which_have_one():
    from minisft.models.auto import AutoModelForMultipleChoice

    with pytest.raises(ValueError, match=r"no multiple-choice head for electra checkpoints; use one of bert, "
                                         r"deberta-v2, distilbert, modernbert, mpnet, roberta, xlm-roberta"):
        AutoModelForMultipleChoice.from_pretrained(FIXTURES / "tiny-electra")
