"""--class-weights: how a spec becomes weights, the trainer's weighted loss on both tasks
(the op itself is held to torch's CrossEntropyLoss(weight=...) in tests/op_cases.py), and
the errors that name the fix."""
import json

import numpy as np
import pytest

from minisft import cli, tasks
from minisft.models.auto import AutoTokenizer
from minisft.engine.tensor import no_grad
from minisft.tasks.data import IGNORE_INDEX, Example, collate
from minisft.training import class_weights
from minisft.training.options import OptionError
from minisft.training.trainer import Trainer, TrainingArguments
from conftest import FIXTURES
from helpers import NEGATIVE, POSITIVE, write_reviews

TINY = FIXTURES / "tiny-bert"


def test_balanced_is_scikit_learns_formula_over_the_labels_the_loss_sees():
    features = [{"label": 0}, {"label": 0}, {"label": 0}, {"label": 1}]
    assert class_weights.resolve("balanced", "classification", ["a", "b"], features).tolist() == \
        pytest.approx([4 / (2 * 3), 4 / (2 * 1)])
    tokens = [{"label": [IGNORE_INDEX, 0, 1, IGNORE_INDEX]}, {"label": [1, 1, IGNORE_INDEX]}]
    assert class_weights.resolve("balanced", "token-classification", ["O", "B"], tokens).tolist() == \
        pytest.approx([4 / (2 * 1), 4 / (2 * 3)])


def test_named_weights_leave_the_other_classes_at_one():
    weights = class_weights.resolve("pos=2.5, a=b=0.5", "classification", ["neg", "pos", "a=b"], [{"label": 0}])
    assert weights.dtype == np.float32 and weights.tolist() == [1.0, 2.5, 0.5]


@pytest.mark.parametrize("spec, task, message", [
    ("happy=2", "classification", r"no label 'happy' in the training data \(labels: neg, pos\)"),
    ("pos=0", "classification", r"the weight of 'pos' is '0', not a positive number"),
    ("pos=-1", "classification", r"not a positive number"),
    ("pos=nan", "classification", r"not a positive number"),
    ("pos", "classification", r"'pos' is not LABEL=WEIGHT"),
    ("balanced", "regression", r"regression has no classes to weigh"),
    ("balanced", "classification", r"class 'pos' has no labeled example"),
])
def test_bad_specs_name_the_option_and_the_fix(spec, task, message):
    with pytest.raises(OptionError, match=r"^--class-weights .*" + message):
        class_weights.resolve(spec, task, ["neg", "pos"], [{"label": 0}])


def _weighted_loss_by_hand(logits, labels, weights):
    """sum_i w[y_i] (-log softmax(logits_i)[y_i]) / sum_i w[y_i] over labeled rows, in float64."""
    logits, labels = logits.reshape(-1, logits.shape[-1]).astype(np.float64), labels.reshape(-1)
    kept = labels != IGNORE_INDEX
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    w = weights[labels[kept]].astype(np.float64)
    return float((w * -logp[kept, labels[kept]]).sum() / w.sum())


def _tagged_examples(rng, count):
    examples = []
    for line in range(count):
        words = ["the", "film", "was"] + list(rng.choice(POSITIVE + NEGATIVE, rng.integers(1, 5)))
        tags = ["B-POS" if w in POSITIVE else "B-NEG" if w in NEGATIVE else "O" for w in words]
        examples.append(Example(words, label=tags, line=line + 1))
    return examples


@pytest.mark.parametrize("task_name, spec", [("classification", "positive=3"), ("token-classification", "balanced")])
def test_the_trainers_loss_is_the_weighted_cross_entropy_of_the_heads_logits(tmp_path, task_name, spec):
    task, tokenizer, rng = tasks.get(task_name), AutoTokenizer.from_pretrained(TINY), np.random.default_rng(0)
    if task_name == "classification":
        examples = task.read(write_reviews(tmp_path / "train.csv", 12, rng))
    else:
        examples = _tagged_examples(rng, 12)
    labels = task.label_vocab(examples)
    features = task.encode(examples, tokenizer, labels)
    model = task.model(TINY, labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), task=task_name, class_weights=spec)
    trainer = Trainer(model, args, features, label_names=labels.names, tokenizer=tokenizer, log=lambda message: None)
    assert len(set(trainer.class_weights.tolist())) > 1
    loss = trainer._local_loss(list(range(12)), 1.0)
    batch = collate(features, tokenizer.pad_token_id)
    with no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).logits.numpy()
    # float32 logits and a float32 sum over 12 sentences' (or ~70 tokens') terms, in another order
    assert loss == pytest.approx(_weighted_loss_by_hand(logits, batch["labels"], trainer.class_weights), rel=1e-5)
    unweighted = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"], labels=batch["labels"]).loss.item()
    assert abs(loss - unweighted) > 1e-3  # the weights took effect


def test_train_records_the_spec_and_says_the_weights(tmp_path, capsys):
    rng = np.random.default_rng(0)
    train, dev = write_reviews(tmp_path / "train.csv", 16, rng), write_reviews(tmp_path / "dev.csv", 8, rng)
    code = cli.main(["train", "--model", str(TINY), "--train", str(train), "--eval", str(dev), "--output",
                     str(tmp_path / "out"), "--batch-size", "4", "--max-steps", "2", "--class-weights", "positive=3"])
    assert code == 0
    assert "class weights: negative=1, positive=3" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "training_args.json").read_text())["class_weights"] == "positive=3"


def test_a_weight_for_an_unknown_label_is_one_line_and_exit_2(tmp_path, capsys):
    rng = np.random.default_rng(0)
    train = write_reviews(tmp_path / "train.csv", 16, rng)
    code = cli.main(["train", "--model", str(TINY), "--train", str(train), "--output", str(tmp_path / "out"),
                     "--batch-size", "4", "--max-steps", "2", "--class-weights", "neutral=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("minisft train: error: --class-weights 'neutral=2': no label 'neutral'")


def test_weights_make_the_loss_terms_of_data_parallel_shares():
    task, weights = tasks.get("token-classification"), np.array([0.5, 2.0], dtype=np.float32)
    feature = {"label": [IGNORE_INDEX, 0, 1, 1, IGNORE_INDEX]}
    assert task.loss_terms(feature) == 3 and task.loss_terms(feature, weights) == 4.5
    assert tasks.get("classification").loss_terms({"label": 1}, weights) == 2.0

