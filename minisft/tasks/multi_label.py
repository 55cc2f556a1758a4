"""Multi-label classification: each text has any number of the classes at once (topics,
emotions, toxicity types), as transformers' problem_type="multi_label_classification": one
logit per class, BCE with logits against a multi-hot target, a class predicted where its
sigmoid reaches the threshold."""
import numpy

from minisft.tasks import metrics as M
from minisft.tasks.base import Task
from minisft.tasks.data import DataError, LabelVocab


class MultiLabelClassification(Task):
    name, description = "multi-label-classification", "text -> any number of classes (topics, emotions)"
    metrics = ("micro_f1", "macro_f1", "subset_accuracy")
    own_options = ("label_separator", "threshold")

    def read_options(self, args):
        return {"label_separator": args.label_separator}

    def output_options(self, args):
        return {"threshold": args.threshold}

    def read_labels(self, path, examples, label_separator=";"):
        """Each label a list of class names: a JSON list, or a cell of names joined by
        label_separator (CSV/TSV; an empty cell: no class)."""
        for example in examples:
            value = example.label
            if isinstance(value, str):
                value = [name.strip() for name in value.split(label_separator)]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(n, (str, int, float)) and not isinstance(n, bool)
                                                      for n in value):
                raise DataError(f"{path} line {example.line}: the label {example.label!r} is not a list of class "
                                f"names; give a JSON list or names joined by {label_separator!r} "
                                "(--label-separator)")
            example.label = sorted({str(n) for n in value if str(n)})

    def check_training_examples(self, path, examples):
        if not any(e.label for e in examples):
            raise DataError(f"{path}: none of the {len(examples)} rows has a label; check --label-column and "
                            "--label-separator")

    def label_vocab(self, examples):
        return LabelVocab.of_names({name for e in examples for name in e.label})

    def check_labels(self, examples, labels, source):
        labels.check(examples, source, lambda e: e.label)

    def encode_label(self, example, labels, source):
        target = numpy.zeros(len(labels), dtype=numpy.float32)
        target[[labels.ids[name] for name in example.label]] = 1
        return target

    def model(self, directory, labels, **overrides):
        from minisft.models.auto import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            directory, id2label=dict(enumerate(labels.names)), problem_type="multi_label_classification", **overrides)

    def evaluate(self, features, outputs, label_names, threshold=0.5):
        return self.compute_metrics(outputs, numpy.stack([f["label"] for f in features]), label_names, threshold)

    def compute_metrics(self, logits, labels, label_names, threshold=0.5):
        """micro and macro F1 over the classes, subset accuracy (every class right), and each
        class's F1 (f1/NAME), as scikit-learn's f1_score(average=...) and accuracy_score on
        multi-hot rows; a class never true nor predicted has F1 0 (its zero_division)."""
        predicted = M.sigmoid(logits) >= threshold
        true = numpy.asarray(labels) > 0.5
        hits, predicted_counts, true_counts = ((predicted & true).sum(0), predicted.sum(0), true.sum(0))
        per_class = [_f1(h, p, t) for h, p, t in zip(hits, predicted_counts, true_counts)]
        scores = {"micro_f1": _f1(hits.sum(), predicted_counts.sum(), true_counts.sum()),
                  "macro_f1": sum(per_class) / len(per_class),
                  "subset_accuracy": float((predicted == true).all(1).mean())}
        return {**scores, **{f"f1/{name}": f1 for name, f1 in zip(label_names, per_class)}}

    def predictions(self, examples, features, outputs, label_names, threshold=0.5):
        for example, logits in zip(examples, outputs):
            probabilities = M.sigmoid(logits)
            record = {"text": example.text}
            if example.text_pair is not None:
                record["text_pair"] = example.text_pair
            yield {**record, "labels": [n for n, p in zip(label_names, probabilities) if p >= threshold],
                   "probabilities": {n: round(float(p), 6) for n, p in zip(label_names, probabilities)}}


def _f1(hits, predicted, true):
    """2 hits / (predicted + true): F1 from counts; 0 when there is nothing to count."""
    return float(2 * hits / (predicted + true)) if predicted + true else 0.0

