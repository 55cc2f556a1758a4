"""Metrics against scikit-learn, scipy and seqeval values stored by make_training_fixtures.py."""
import json
import math

import numpy as np
import pytest

from minisft.tasks import metrics as M
from conftest import FIXTURES

REF = json.loads((FIXTURES / "metrics_reference.json").read_text())


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_classification_metrics_equal_sklearn():
    y_true, y_pred = REF["y_true"], REF["y_pred"]
    assert close(M.accuracy(y_true, y_pred), REF["accuracy"])
    _, (precision, recall, f1) = M.precision_recall_f1(y_true, y_pred)
    assert close(precision, REF["macro_precision"]) and close(recall, REF["macro_recall"])
    assert close(f1, REF["macro_f1"])
    assert close(M.matthews_corrcoef(y_true, y_pred), REF["mcc"])


def test_correlations_equal_scipy_with_ties():
    assert close(M.pearson(REF["x"], REF["y"]), REF["pearson"])
    assert close(M.spearman(REF["x"], REF["y"]), REF["spearman"])


def test_entity_f1_equals_seqeval():
    scores, per_type = M.entity_f1(REF["true_tags"], REF["pred_tags"])
    assert close(scores["precision"], REF["entity_precision"])
    assert close(scores["recall"], REF["entity_recall"])
    assert close(scores["f1"], REF["entity_f1"])
    assert set(per_type) == {"PER", "LOC", "ORG"}


def test_entity_chunking_rules():
    assert M.get_entities(["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG"]) == [
        ("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5), ("ORG", 6, 6)]


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 true values but 1 predictions"):
        M.accuracy([1, 2], [1])


def test_squad_metric_equals_the_official_v1_1_script():
    """200 dev questions (tests/fixtures/make_squad_fixtures.py): per question and in total,
    with articles, punctuation, case, spacing, partial spans, several gold answers and
    unanswered questions."""
    fixture = json.loads((FIXTURES / "squad_metric_cases.json").read_text(encoding="utf-8"))
    answers = {case["id"]: case["answers"] for case in fixture["cases"]}
    predictions = {case["id"]: case["prediction"] for case in fixture["cases"] if case["prediction"] is not None}
    for case in fixture["cases"]:
        if case["prediction"] is not None:
            normalized = M.squad_normalize(case["prediction"])
            exact = max(float(normalized == M.squad_normalize(gold)) for gold in case["answers"])
            f1 = max(M.squad_f1(case["prediction"], gold) for gold in case["answers"])
            assert (exact, f1) == (case["exact_match"], case["f1"]), case
    assert M.squad(predictions, answers) == fixture["total"]


def test_squad_v2_scores_no_answer_against_unanswerable_questions():
    answers = {"a": [], "b": ["the cat"], "c": ["a dog", "dogs"]}
    predictions = {"a": "", "b": "", "c": "the dog"}
    # a: no answer for an unanswerable question: 1; b: none for an answerable one: 0;
    # c: "dog" against "dog" (articles dropped): exact
    assert M.squad(predictions, answers, version="2.0") == {"exact_match": 200 / 3, "f1": 200 / 3}
    assert M.squad({"a": "something"}, answers, version="2.0") == {"exact_match": 0.0, "f1": 0.0}  # b, c left out


def test_retrieval_metrics_rank_each_query_s_document():
    corpus = np.eye(4)
    queries = np.array([[1.0, 0.1, 0, 0], [0.9, 1.0, 0, 0], [0.5, 0.2, 0.1, 0], [0, 0, 0.2, 1.0]])
    # query 0 -> doc 0 first; query 1 -> doc 1 first; query 2 -> doc 2 third; query 3 -> doc 2 second
    metrics = M.retrieval_metrics(queries, corpus, [0, 1, 2, 2], cutoffs=(1, 2), mrr_at=2)
    assert metrics == {"recall@1": 0.5, "recall@2": 0.75, "mrr@2": (1 + 1 + 0 + 0.5) / 4}
