"""Multiple choice (SWAG): each question beside each of its choices."""
import json

import numpy

from minisft.tasks import metrics as M
from minisft.tasks.data import (DataError, Example, read_records)
from minisft.tasks.base import PositionTask


class MultipleChoice(PositionTask):
    """A question (or context) and C choices -> the right choice: each choice beside the
    question is a row of its own, and the model scores each (its ForMultipleChoice head)."""
    name, description = "multiple-choice", "question, choices -> the right choice (SWAG)"
    choices_axis = True
    metrics = ("accuracy",)

    def read(self, path, text_column=None, text_pair_column=None, label_column=None, require_labels=True,
             skip_misaligned=False):
        """JSON lines (or CSV) of {"question" or "context", "choices": [...], "label": index},
        or SWAG's columns: sent1, sent2, ending0..endingN, label (each choice: sent2 + ending)."""
        records = read_records(path)
        examples = []
        for number, record in records:
            endings = sorted((k for k in record if k.startswith("ending") and k[6:].isdigit()), key=lambda k: int(k[6:]))
            if endings:
                question = record.get("sent1") or record.get("startphrase", "")
                choices = [f"{record.get('sent2', '')} {record[k]}".strip() for k in endings]
            else:
                question = record.get(text_column or "question", record.get("context"))
                choices = record.get("choices")
                if isinstance(choices, str):
                    choices = json.loads(choices)
            if not isinstance(question, str) or not isinstance(choices, list) or len(choices) < 2:
                raise DataError(f"{path} line {number}: expected a question (or context) and a list of at least 2 "
                                "choices, or SWAG's sent1, sent2 and ending0.. columns")
            label = record.get(label_column or "label")
            if label in ("", None):
                if require_labels:
                    raise DataError(f"{path} line {number}: no label (the index of the right choice)")
                label = None
            else:
                try:
                    label = int(label)
                except (TypeError, ValueError):
                    raise DataError(f"{path} line {number}: label {label!r} is not a choice's index") from None
                if not 0 <= label < len(choices):
                    raise DataError(f"{path} line {number}: label {label} is out of range for its {len(choices)} "
                                    f"choices (0 to {len(choices) - 1})")
            examples.append(Example(question, [str(c) for c in choices], label, number))
        counts = {len(e.text_pair) for e in examples}
        if len(counts) > 1:
            odd = next(e for e in examples if len(e.text_pair) != len(examples[0].text_pair))
            raise DataError(f"{path} line {odd.line}: {len(odd.text_pair)} choices, but line {examples[0].line} has "
                            f"{len(examples[0].text_pair)}; give every question the same number of choices")
        return examples

    stdin_keys = ("question", "choices")

    def stdin_record(self, record, number):
        return Example(record["question"], [str(c) for c in record["choices"]], line=number)

    def encode(self, examples, tokenizer, labels, max_length=128, label_all_tokens=False, source="data",
               doc_stride=128):
        """One feature per question: input_ids and token_type_ids of C rows (the question beside
        each choice), and the right choice's index."""
        features = []
        for example in examples:
            rows = tokenizer([example.text] * len(example.text_pair), example.text_pair, truncation=True,
                             max_length=max_length, return_tensors=None)
            feature = {"input_ids": rows["input_ids"], "token_type_ids": rows["token_type_ids"]}
            if example.label is not None:
                feature["label"] = example.label
            features.append(feature)
        return features

    def model(self, directory, labels, **overrides):
        from minisft.models.auto import AutoModelForMultipleChoice

        return AutoModelForMultipleChoice.from_pretrained(directory, **overrides)

    def gather(self, outputs):
        return outputs  # (C,) scores per question: C may differ between questions

    def compute_metrics(self, logits, labels, label_names):
        predictions = [int(numpy.argmax(row)) for row in logits]
        return {"accuracy": M.accuracy(list(labels), predictions)}

    def prediction(self, example, feature, logits, label_names):
        shifted = numpy.exp(logits - logits.max())
        probabilities = shifted / shifted.sum()
        return {"question": example.text, "choices": example.text_pair, "label": int(probabilities.argmax()),
                "probabilities": [round(float(p), 6) for p in probabilities]}
