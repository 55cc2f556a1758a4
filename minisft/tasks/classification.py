"""Sequence classification, sentence-pair classification and regression."""
import math

import numpy

from minisft.engine import functional as F
from minisft.tasks import metrics as M
from minisft.tasks.data import (DataError, LabelVocab, rows_error)
from minisft.tasks.base import Task


class Classification(Task):
    name, description = "classification", "text -> class (sentiment, topic, spam)"
    metrics = ("accuracy", "f1", "precision", "recall", "mcc")
    class_weighted = True

    def loss_classes(self, feature):
        return [feature["label"]]

    def weighted_loss(self, logits, labels, class_weights):
        return F.cross_entropy(logits, labels.reshape(-1), weight=class_weights)

    def check_training_examples(self, path, examples):
        classes = sorted({e.label for e in examples})
        if len(classes) < 2:
            raise DataError(f"{path}: every one of the {len(examples)} rows has the label {classes[0]!r}: "
                            "a classifier needs at least 2 classes; check --label-column and the file")


class PairClassification(Classification):
    name, description = "pair-classification", "text, text pair -> class (paraphrase, entailment)"
    pair = True


class Regression(Task):
    name, description = "regression", "text [, text pair] -> a number (similarity)"
    metrics = ("pearson", "spearman", "mse")
    numeric_labels = True

    def check_training_examples(self, path, examples):
        bad = [e.line for e in examples if not math.isfinite(e.label)]
        if bad:
            raise rows_error(path, bad, "have a regression label that is not finite (nan or inf)",
                             "fix or remove them")

    def label_vocab(self, examples):
        return LabelVocab([])

    def check_labels(self, examples, labels, source):
        """Any number is a regression target."""

    def encode_label(self, example, labels, source):
        return example.label

    def model(self, directory, labels, **overrides):
        from minisft.models.auto import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, problem_type="regression",
                                                                  **overrides)

    def compute_metrics(self, logits, labels, label_names):
        predictions = [float(x) for x in numpy.asarray(logits).reshape(-1)]
        labels = [float(x) for x in labels]
        return {"pearson": M.pearson(labels, predictions), "spearman": M.spearman(labels, predictions),
                "mse": sum((a - b) ** 2 for a, b in zip(labels, predictions)) / len(labels)}

    def prediction(self, example, feature, logits, label_names):
        return {"text": example.text, "score": float(logits[0])}
