"""Reranking (a cross-encoder): the head, its scores and BCE loss against sentence-transformers'
CrossEncoder (tests/fixtures/make_sentence_fixtures.py), MRR@10 and NDCG@10, `minisft train
--task reranking` and `minisft rerank`, and the directory CrossEncoder loads."""
import json
import math

import numpy as np
import pytest

from minisft import cli, tasks
from minisft.engine.tensor import no_grad
from minisft.models.auto import AutoTokenizer
from minisft.tasks.data import Example, collate
from minisft.tasks.metrics import sigmoid
from conftest import FIXTURES, assert_close
from helpers import NEGATIVE, POSITIVE

TASK = tasks.get("reranking")
TINY = FIXTURES / "tiny-bert"


def test_scores_loss_and_gradients_equal_the_cross_encoders():
    ref = np.load(FIXTURES / "tiny_bert_cross_encoder_outputs.npz")
    model = TASK.model(TINY, None)
    model.load_state_dict({**model.state_dict(), "classifier.weight": ref["classifier.weight"],
                           "classifier.bias": ref["classifier.bias"]})
    model.eval()
    examples = [Example(str(q), str(p), float(y)) for q, p, y in zip(ref["queries"], ref["passages"], ref["labels"])]
    batch = collate(TASK.encode(examples, AutoTokenizer.from_pretrained(TINY), None))
    loss = TASK.training_loss(model, batch, None)
    assert_close(loss, ref["loss"], atol=1e-5, rtol=0, what="BCE loss")
    with no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).logits.numpy()
    assert_close(np.array([sigmoid(float(x)) for x in logits[:, 0]]), ref["scores"], atol=1e-6, rtol=0, what="scores")
    loss.backward()
    for name, param in model.named_parameters():
        assert_close(param.grad, ref[f"grad/{name}"], atol=1e-5, rtol=0, what=f"grad of {name}")


def test_mrr_and_ndcg_at_10_over_each_querys_candidates():
    features = [{"query": q, "label": np.array([y], np.float32)} for q, y in
                [("a", 0.0), ("a", 1.0), ("a", 0.0), ("b", 1.0), ("b", 0.5), ("b", 0.0), ("c", 0.0)]]
    scores = np.array([[3.0], [2.0], [1.0], [0.5], [2.0], [-1.0], [9.0]])  # a: relevant 2nd; b: 1.0 2nd, 0.5 1st
    metrics = TASK.evaluate(features, scores, [])
    # c has no relevant passage and is left out; b's first relevant (>= 0.5) candidate is its first
    assert metrics["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    ndcg_a = (1 / math.log2(3)) / 1
    ndcg_b = (0.5 + 1 / math.log2(3)) / (1 + 0.5 / math.log2(3))
    assert metrics["ndcg@10"] == pytest.approx((ndcg_a + ndcg_b) / 2)


def _write_candidates(path, queries, rng):
    """For each query, 4 passages: those with the query's kind of word are relevant (1), one
    mixed is graded (0.5), the rest 0."""
    lines = ["query,passage,label"]
    for i in range(queries):
        same, other = (POSITIVE, NEGATIVE) if i % 2 else (NEGATIVE, POSITIVE)
        query = f"was the film {rng.choice(same)} {i}"
        for words, label in (((same, same), 1), ((same, other), 0.5), ((other, other), 0), ((other, other), 0)):
            lines.append(f"{query},it was {rng.choice(words[0])} and {rng.choice(words[1])},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def candidates(tmp_path):
    rng = np.random.default_rng(0)
    return _write_candidates(tmp_path / "train.csv", 12, rng), _write_candidates(tmp_path / "dev.csv", 4, rng)


def test_train_rerank_and_predict(tmp_path, candidates, capsys):
    output = tmp_path / "out"
    assert cli.main(["train", "--model", str(TINY), "--task", "reranking", "--train", str(candidates[0]),
                     "--eval", str(candidates[1]), "--output", str(output), "--batch-size", "8",
                     "--learning-rate", "1e-3", "--epochs", "2"]) == 0
    final = json.loads(capsys.readouterr().out)
    assert set(final) == {"eval_mrr@10", "eval_ndcg@10"} and 0 < final["eval_ndcg@10"] <= 1
    config = json.loads((output / "config.json").read_text())
    assert len(config["id2label"]) == 1 and config["problem_type"] == "multi_label_classification"
    assert config["sentence_transformers"]["activation_fn"] == "torch.nn.modules.activation.Sigmoid"
    assert cli.main(["rerank", "--model", str(output), "--data", str(candidates[1])]) == 0
    rankings = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rankings) == 4 and all(len(r["ranking"]) == 4 for r in rankings)
    for ranking in rankings:
        scores = [c["score"] for c in ranking["ranking"]]
        assert scores == sorted(scores, reverse=True) and {"passage", "score", "label"} <= set(ranking["ranking"][0])
    assert cli.main(["predict", "--model", str(output), "--data", str(candidates[1])]) == 0
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(predicted) == 16 and set(predicted[0]) == {"query", "passage", "score"}
    by_pair = {(c["passage"], r["query"]): c["score"] for r in rankings for c in r["ranking"]}
    assert all(by_pair[(p["passage"], p["query"])] == p["score"] for p in predicted)


def test_cross_encoder_loads_the_directory_and_gives_the_same_scores(tmp_path, candidates, capsys):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    output = tmp_path / "out"
    assert cli.main(["train", "--model", str(TINY), "--task", "reranking", "--train", str(candidates[0]),
                     "--output", str(output), "--batch-size", "8", "--learning-rate", "1e-3", "--max-steps", "4"]) == 0
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(output), "--data", str(candidates[1])]) == 0
    ours = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    theirs = sentence_transformers.CrossEncoder(str(output), device="cpu").predict(
        [(r["query"], r["passage"]) for r in ours])
    np.testing.assert_allclose([r["score"] for r in ours], theirs, atol=1e-4)  # ours rounded to 6 places


@pytest.mark.parametrize("rows, message", [
    ("q1,p1,1\nq1,p2,1\nq2,p3,0\n", "no query has both a relevant passage (label >= 0.5) and an irrelevant one"),
    ("q1,p1,1\nq1,p2,2\n", "1 row has a label outside [0, 1] (line 3); give 1 (relevant) or 0, or graded scores"),
])
def test_bad_reranking_files_are_one_line_and_exit_2(tmp_path, capsys, rows, message):
    path = tmp_path / "bad.csv"
    path.write_text("query,passage,label\n" + rows)
    code = cli.main(["train", "--model", str(TINY), "--task", "reranking", "--train", str(path), "--output",
                     str(tmp_path / "out"), "--batch-size", "2", "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1]


def test_rerank_refuses_a_model_of_another_task(tmp_path, candidates, capsys):
    from helpers import write_reviews

    train = write_reviews(tmp_path / "reviews.csv", 8, np.random.default_rng(0))
    assert cli.main(["train", "--model", str(TINY), "--train", str(train), "--output", str(tmp_path / "cls"),
                     "--batch-size", "4", "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["rerank", "--model", str(tmp_path / "cls"), "--data", str(candidates[1])]) == 2
    assert "a classification model, not a reranker" in capsys.readouterr().err
