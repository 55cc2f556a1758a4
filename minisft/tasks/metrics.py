"""Evaluation metrics, computed as scikit-learn, scipy, seqeval and the official SQuAD
evaluation scripts compute them.

Inputs are sequences of labels (any hashable) or numbers; outputs are floats.
"""
import math
import re
import string
from collections import Counter

import numpy


def sigmoid(x):
    """1 / (1 + exp(-x)) of a number or an array, without overflow, in float64."""
    return 0.5 * (1 + numpy.tanh(0.5 * numpy.asarray(x, dtype=numpy.float64)))


def accuracy(y_true, y_pred):
    _check(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def precision_recall_f1(y_true, y_pred, labels=None):
    """Per class {label: (precision, recall, f1, support)} and the macro averages."""
    _check(y_true, y_pred)
    labels = sorted(set(y_true) | set(y_pred), key=str) if labels is None else list(labels)
    true_counts, pred_counts = Counter(y_true), Counter(y_pred)
    hits = Counter(t for t, p in zip(y_true, y_pred) if t == p)
    per_class = {}
    for label in labels:
        precision = _ratio(hits[label], pred_counts[label])
        recall = _ratio(hits[label], true_counts[label])
        per_class[label] = (precision, recall, _f1(precision, recall), true_counts[label])
    macro = tuple(sum(v[i] for v in per_class.values()) / len(per_class) for i in range(3))
    return per_class, macro


def matthews_corrcoef(y_true, y_pred):
    """Matthews correlation, multiclass form (Gorodkin's R_K); 0 when undefined."""
    _check(y_true, y_pred)
    labels = sorted(set(y_true) | set(y_pred), key=str)
    t, p = Counter(y_true), Counter(y_pred)
    correct = sum(a == b for a, b in zip(y_true, y_pred))
    n = len(y_true)
    covariance = correct * n - sum(t[k] * p[k] for k in labels)
    denominator = math.sqrt((n * n - sum(p[k] ** 2 for k in labels)) * (n * n - sum(t[k] ** 2 for k in labels)))
    return covariance / denominator if denominator else 0.0


def pearson(x, y):
    _check(x, y)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else float("nan")


def _ranks(values):
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y):
    return pearson(_ranks(list(x)), _ranks(list(y)))


def _split_tag(tag):
    """"B-PER" -> ("B", "PER"); "O" -> ("O", "")."""
    if tag in ("O", ""):
        return "O", ""
    if len(tag) > 1 and tag[1] in "-_":
        return tag[0], tag[2:]
    return tag[0], ""


def get_entities(tags):
    """(type, start, end inclusive) chunks of a BIO(ES) tag sequence, by seqeval's rules:
    an I- tag after O or after another type starts a new entity."""
    entities, start, previous_tag, previous_type = [], None, "O", ""
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, kind = _split_tag(tag)
        if start is not None and _chunk_ends(previous_tag, prefix, previous_type, kind):
            entities.append((previous_type, start, i - 1))
            start = None
        if _chunk_starts(previous_tag, prefix, previous_type, kind):
            start = i
        previous_tag, previous_type = prefix, kind
    return entities


def _chunk_ends(prev, tag, prev_type, kind):
    return (prev in "ES" or (prev in "BI" and tag in "BSO") or (prev != "O" and prev_type != kind))


def _chunk_starts(prev, tag, prev_type, kind):
    return (tag in "BS" or (prev in "ESO" and tag in "EI") or (tag != "O" and prev_type != kind))


def entity_f1(true_sequences, pred_sequences):
    """Entity-level micro precision, recall and F1 over sentences of tags (seqeval's
    default), and per entity type {type: (precision, recall, f1, support)}."""
    if len(true_sequences) != len(pred_sequences):
        raise ValueError("entity_f1: different numbers of true and predicted sentences")
    true_entities, pred_entities = set(), set()
    for n, (t, p) in enumerate(zip(true_sequences, pred_sequences)):
        if len(t) != len(p):
            raise ValueError(f"entity_f1: sentence {n} has {len(t)} true and {len(p)} predicted tags")
        true_entities |= {(n, *e) for e in get_entities(t)}
        pred_entities |= {(n, *e) for e in get_entities(p)}
    correct = true_entities & pred_entities
    precision, recall = _ratio(len(correct), len(pred_entities)), _ratio(len(correct), len(true_entities))
    per_type = {}
    for kind in sorted({e[1] for e in true_entities | pred_entities}):
        t = {e for e in true_entities if e[1] == kind}
        p = {e for e in pred_entities if e[1] == kind}
        c = len(t & p)
        pt, rt = _ratio(c, len(p)), _ratio(c, len(t))
        per_type[kind] = (pt, rt, _f1(pt, rt), len(t))
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall)}, per_type


def squad_normalize(text):
    """SQuAD's answer normalisation: lower-case, drop punctuation, then the articles a, an
    and the, then collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


_PUNCTUATION = set(string.punctuation)


def squad_f1(prediction, gold, version="1.1"):
    """Token-overlap F1 of normalised answers. v2: an empty answer (no answer) scores 1
    against an empty one and 0 against any other; v1.1 scores every answer without a
    shared token 0."""
    predicted, expected = squad_normalize(prediction).split(), squad_normalize(gold).split()
    if version != "1.1" and (not predicted or not expected):
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    return _f1(shared / len(predicted), shared / len(expected))


def squad(predictions, answers, version="1.1"):
    """{"exact_match", "f1"} in percent, over every question of `answers` ({id: gold answer
    texts}; v2: none for an unanswerable question), each the best over its gold answers. As
    the official scripts: v1.1 scores a question without a prediction 0, v2.0 leaves it out."""
    exact = f1 = 0.0
    for question, golds in answers.items():
        if question not in predictions:
            continue
        if version != "1.1":
            golds = [g for g in golds if squad_normalize(g)] or [""]
        prediction = predictions[question]
        exact += max(float(squad_normalize(prediction) == squad_normalize(g)) for g in golds)
        f1 += max(squad_f1(prediction, g, version) for g in golds)
    total = len(answers) if version == "1.1" else sum(q in predictions for q in answers)
    return {"exact_match": 100.0 * exact / max(total, 1), "f1": 100.0 * f1 / max(total, 1)}


def retrieval_metrics(queries, corpus, relevant, cutoffs=(1, 5, 10), mrr_at=10):
    """Recall@k and MRR@mrr_at of each query's relevant document (index into corpus) when
    the corpus is ranked by cosine similarity: queries (Q, H), corpus (D, H)."""
    queries = queries / numpy.linalg.norm(queries, axis=1, keepdims=True)
    corpus = corpus / numpy.linalg.norm(corpus, axis=1, keepdims=True)
    scores = queries @ corpus.T
    relevant = numpy.asarray(relevant)
    rank = (scores > scores[numpy.arange(len(relevant)), relevant][:, None]).sum(axis=1) + 1  # 1 = first
    metrics = {f"recall@{k}": float((rank <= k).mean()) for k in cutoffs}
    metrics[f"mrr@{mrr_at}"] = float(numpy.where(rank <= mrr_at, 1.0 / rank, 0.0).mean())
    return metrics


def _ratio(a, b):
    return a / b if b else 0.0


def _f1(precision, recall):
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _check(a, b):
    if len(a) != len(b):
        raise ValueError(f"metrics: {len(a)} true values but {len(b)} predictions")
    if not a:
        raise ValueError("metrics: no examples")
