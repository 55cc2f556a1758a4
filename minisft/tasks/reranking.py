"""Reranking with a cross-encoder, as sentence-transformers' CrossEncoder trains it by default:
a query and a passage on one input ([CLS] query [SEP] passage [SEP]), one logit, BCE with
logits against a 0/1 label or a graded score in [0, 1]; the score is the logit's sigmoid.
Evaluated by MRR@10 and NDCG@10 over each query's candidates; saved as a checkpoint that
transformers and sentence-transformers' CrossEncoder load."""
import math

import numpy

from minisft.tasks import metrics as M
from minisft.tasks.base import Task
from minisft.tasks.data import DataError, LabelVocab, check_label_types, rows_error

POSITIVE = 0.5  # a candidate whose label reaches this is relevant (for MRR; NDCG weighs the label itself)
CROSS_ENCODER = {"activation_fn": "torch.nn.modules.activation.Sigmoid"}  # config.json's marker for CrossEncoder
CUTOFF = 10


class Reranking(Task):
    name, description = "reranking", "(query, passage) -> a relevance score (cross-encoder)"
    metrics = ("mrr@10", "ndcg@10")
    pair = True
    text_columns = ("query", "question", "anchor", "text", "sentence1")
    pair_columns = ("passage", "document", "positive", "context", "response", "text_pair", "sentence2")

    def read_labels(self, path, examples):
        check_label_types(path, examples, numeric=True)
        outside = [e.line for e in examples if not 0 <= e.label <= 1]
        if outside:
            raise rows_error(path, outside, "have a label outside [0, 1]",
                             "give 1 (relevant) or 0, or graded scores scaled into [0, 1]")

    def check_training_examples(self, path, examples):
        if not _queries_with_both(examples):
            raise DataError(f"{path}: no query has both a relevant passage (label >= {POSITIVE}) and an irrelevant one "
                            f"among its {len(examples)} rows; give each query its passages, relevant and not "
                            "(`minisft mine-hard-negatives` finds irrelevant ones)")

    def label_vocab(self, examples):
        return LabelVocab([])

    def check_labels(self, examples, labels, source):
        """Any score in [0, 1] is a label (read_labels checked it)."""

    def encode(self, examples, tokenizer, labels, max_length=128, label_all_tokens=False, source="data",
               doc_stride=128):
        features = super().encode(examples, tokenizer, labels, max_length, label_all_tokens, source, doc_stride)
        for feature, example in zip(features, examples):
            feature["query"] = example.text
        return features

    def encode_label(self, example, labels, source):
        return numpy.array([example.label], dtype=numpy.float32)  # (1,): the one logit's target

    def model(self, directory, labels, **overrides):
        from minisft.models.auto import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=1, problem_type="multi_label_classification",
            sentence_transformers=CROSS_ENCODER, **overrides)

    def evaluate(self, features, outputs, label_names):
        scores = numpy.asarray(outputs).reshape(-1)
        groups = {}
        for feature, score in zip(features, scores):
            groups.setdefault(feature["query"], []).append((float(score), float(feature["label"][0])))
        ranked = [[label for _, label in sorted(group, key=lambda c: -c[0])] for group in groups.values()
                  if any(label >= POSITIVE for _, label in group)]
        if not ranked:
            raise DataError(f"the evaluation data: none of its {len(groups)} queries has a relevant passage "
                            f"(label >= {POSITIVE}); MRR and NDCG need one")
        return {"mrr@10": sum(_reciprocal_rank(r) for r in ranked) / len(ranked),
                "ndcg@10": sum(_ndcg(r) for r in ranked) / len(ranked)}

    def prediction(self, example, feature, logits, label_names):
        return {"query": example.text, "passage": example.text_pair, "score": round(float(M.sigmoid(logits[0])), 6)}

    def rankings(self, examples, scores):
        """{query: [(passage, score, label), ...] best first}, for `minisft rerank`."""
        order = {}
        for example, score in zip(examples, scores):
            order.setdefault(example.text, []).append((example.text_pair, score, example.label))
        return {query: sorted(candidates, key=lambda c: -c[1]) for query, candidates in order.items()}


def _queries_with_both(examples):
    kinds = {}
    for e in examples:
        kinds.setdefault(e.text, set()).add(e.label >= POSITIVE)
    return [query for query, seen in kinds.items() if len(seen) == 2]


def _reciprocal_rank(labels):
    """1 / the rank of the first relevant candidate within the first 10 (0 past them)."""
    return next((1 / rank for rank, label in enumerate(labels[:CUTOFF], 1) if label >= POSITIVE), 0.0)


def _ndcg(labels):
    """NDCG@10 with the labels as linear gains, as scikit-learn's ndcg_score(k=10)."""
    def dcg(gains):
        return sum(g / math.log2(rank + 1) for rank, g in enumerate(gains[:CUTOFF], 1))
    ideal = dcg(sorted(labels, reverse=True))
    return dcg(labels) / ideal if ideal else 0.0
