"""The task registry: one record per fine-tuning task, holding everything that differs
between tasks: how its examples are read, checked and encoded, which head it builds, its
metrics and default metric, and how a prediction is printed.

Adding a task is one class here (and its head under models/), registered in TASKS; the
data readers, the trainer, the workflows and the command line ask the registry.
"""
import json
import math
import pathlib
import random
import sys

import numpy

from minisft import metrics as M
from minisft import spans
from minisft.data import (ANCHOR_COLUMNS, IGNORE_INDEX, LABEL_COLUMNS, PAIR_COLUMNS, POSITIVE_COLUMNS, TAG_COLUMNS,
                          TEXT_COLUMNS, TOKEN_COLUMNS,
                          DataError, Example, LabelVocab, align_labels, check_label_types, pick_column, read_conll,
                          read_json, read_records, rows_error)


class Task:
    """A text task on one (or two) strings per example, with a sequence-level head."""
    name = description = None
    metrics = ()           # what compute_metrics reports, the first being the default metric
    pair = False           # a second text is required
    numeric_labels = False  # labels are numbers (made floats), not class names
    file_suffixes = ()     # data files whose format implies this task (see for_file)
    default_max_length = None  # the task's --max-length when none is given (else TrainingArguments')

    @property
    def default_metric(self):
        return self.metrics[0]

    # --- reading and checking ----------------------------------------------------------
    def read(self, path, text_column=None, text_pair_column=None, label_column=None, require_labels=True,
             skip_misaligned=False):
        """Examples from a labeled file (CSV, TSV, JSON lines); columns default to the usual
        names (text/sentence/sentence1, text_pair/sentence2, label). skip_misaligned: see
        QuestionAnswering."""
        records = read_records(path)
        columns = list(records[0][1])
        text = pick_column(path, columns, text_column, TEXT_COLUMNS, "text", "--text-column")
        pair = None
        if self.pair or text_pair_column:
            pair = pick_column(path, columns, text_pair_column, PAIR_COLUMNS, "text pair", "--text-pair-column")
        label = None
        if require_labels or label_column or any(c in columns for c in LABEL_COLUMNS):
            try:
                label = pick_column(path, columns, label_column, LABEL_COLUMNS, "label", "--label-column")
            except DataError:
                if require_labels:
                    raise

        def blank(value):
            return not isinstance(value, str) or not value.strip()
        empty = [number for number, record in records if blank(record.get(text)) or (pair and blank(record.get(pair)))]
        if empty:
            raise rows_error(path, empty, "have an empty or missing text (column " + repr(text)
                             + (f" or {pair!r})" if pair else ")"), "fill them in or remove them")
        examples = [Example(record[text], record[pair] if pair else None, record.get(label) if label else None,
                            number) for number, record in records]
        if label:
            check_label_types(path, examples, numeric=self.numeric_labels)
        return examples

    def check_training_examples(self, path, examples):
        """What makes fine-tuning on these examples meaningless, before any work."""

    def subset(self, examples, count, seed):
        """The first `count` examples (--max-train-examples, --max-eval-examples), as
        run_glue's max_train_samples takes them."""
        return examples[:count]

    def stdin_example(self, line, number):
        """An example from one line of standard input (predict --data -): a text, or a text
        and its pair separated by a tab."""
        text, _, pair = line.partition("\t")
        return Example(text, pair or None, line=number)

    # --- labels and encoding -----------------------------------------------------------
    def label_vocab(self, examples):
        """The label vocabulary built from the training examples."""
        return LabelVocab.of_names({e.label for e in examples})

    def encode(self, examples, tokenizer, labels, max_length=128, label_all_tokens=False, source="data",
               doc_stride=128):
        """Features: dicts of input_ids, token_type_ids and label (a class id or a float)."""
        self.check_labels(examples, labels, source)
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples] if examples and examples[0].text_pair is not None else None
        batch = tokenizer(texts, pairs, truncation=True, max_length=max_length, return_tensors=None)
        features = []
        for i, example in enumerate(examples):
            feature = {"input_ids": batch["input_ids"][i], "token_type_ids": batch["token_type_ids"][i]}
            if example.label is not None:
                feature["label"] = self.encode_label(example, labels, source)
            features.append(feature)
        return features

    def check_labels(self, examples, labels, source):
        """Every label of evaluation or test examples is one training knows."""
        labels.check(examples, source, lambda e: [e.label])

    def encode_label(self, example, labels, source):
        return labels.encode(example.label, source, example.line)

    def loss_terms(self, feature):
        """How many terms of the loss's mean a training feature brings: data-parallel training
        weighs each rank's mean loss by its share of a batch's terms."""
        return 1

    # --- the model, its outputs and metrics ------------------------------------------------
    def model(self, directory, labels, **overrides):
        """The task's model from a pretrained or fine-tuned checkpoint directory."""
        from minisft.models.auto import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            directory, id2label=dict(enumerate(labels.names)), problem_type="single_label_classification", **overrides)

    def gather(self, outputs):
        """The model's per-example outputs (in order) as the metrics take them."""
        return numpy.stack(outputs)

    def evaluate(self, features, outputs, label_names):
        """Metrics of the gathered outputs of labeled features."""
        return self.compute_metrics(outputs, [f["label"] for f in features], label_names)

    def predictions(self, examples, features, outputs, label_names):
        """predict's JSON records, one per example."""
        for example, feature, logits in zip(examples, features, outputs):
            yield self.prediction(example, feature, logits, label_names)

    def compute_metrics(self, logits, labels, label_names):
        predictions = [int(i) for i in numpy.asarray(logits).argmax(-1)]
        _, (precision, recall, f1) = M.precision_recall_f1(list(labels), predictions)
        return {"accuracy": M.accuracy(list(labels), predictions), "f1": f1, "precision": precision,
                "recall": recall, "mcc": M.matthews_corrcoef(list(labels), predictions)}

    def prediction(self, example, feature, logits, label_names):
        """One JSON record for predict: the text(s), the label and every class's probability."""
        shifted = numpy.exp(logits - logits.max())
        probabilities = shifted / shifted.sum()
        record = {"text": example.text}
        if example.text_pair is not None:
            record["text_pair"] = example.text_pair
        return {**record, "label": label_names[int(probabilities.argmax())],
                "probabilities": {name: round(float(p), 6) for name, p in zip(label_names, probabilities)}}


class Classification(Task):
    name, description = "classification", "text -> class (sentiment, topic, spam)"
    metrics = ("accuracy", "f1", "precision", "recall", "mcc")

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


class TokenClassification(Task):
    name, description = "token-classification", "words -> one tag each (named entities)"
    file_suffixes = (".conll",)
    metrics = ("f1", "precision", "recall", "accuracy")

    def read(self, path, text_column=None, text_pair_column=None, label_column=None, require_labels=True,
             skip_misaligned=False):
        """Sentences from CoNLL (`token<TAB>tag` lines), or JSON lines/CSV with tokens and tags
        lists."""
        if str(path).lower().endswith((".jsonl", ".json", ".csv", ".tsv")):
            records = read_records(path)
            columns = list(records[0][1])
            words = pick_column(path, columns, text_column, TOKEN_COLUMNS, "tokens", "--text-column")
            tags = pick_column(path, columns, label_column, TAG_COLUMNS, "tags", "--label-column")
            return [Example(record[words], label=record.get(tags), line=number) for number, record in records]
        return read_conll(path)

    def check_training_examples(self, path, examples):
        bad = [e.line for e in examples if not e.text]
        if bad:
            raise rows_error(path, bad, "have no tokens", "remove them")

    def stdin_example(self, line, number):
        return Example(line.split(), line=number)

    def label_vocab(self, examples):
        return LabelVocab.of_names({tag for e in examples for tag in e.label})

    def encode(self, examples, tokenizer, labels, max_length=128, label_all_tokens=False, source="data",
               doc_stride=128):
        """Features with per-token labels: a word's tag on its first sub-token, -100 elsewhere
        (or on every sub-token with label_all_tokens); word_ids kept for predictions."""
        labels.check(examples, source, lambda e: e.label)
        batch = tokenizer([e.text for e in examples], is_split_into_words=True, truncation=True,
                          max_length=max_length, return_tensors=None)
        features = []
        for i, example in enumerate(examples):
            word_ids = batch.word_ids(i)
            feature = {"input_ids": batch["input_ids"][i], "token_type_ids": batch["token_type_ids"][i],
                       "word_ids": word_ids}
            if example.label is not None:
                if len(example.label) != len(example.text):
                    raise DataError(f"{source} line {example.line}: {len(example.text)} tokens but "
                                    f"{len(example.label)} tags")
                tag_ids = [labels.encode(tag, source, example.line) for tag in example.label]
                feature["label"] = align_labels(word_ids, tag_ids, label_all_tokens)
            features.append(feature)
        return features

    def loss_terms(self, feature):
        return sum(label != IGNORE_INDEX for label in feature["label"])  # the loss averages over labeled tokens

    def model(self, directory, labels, **overrides):
        from minisft.models.auto import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(directory, id2label=dict(enumerate(labels.names)),
                                                               **overrides)

    def gather(self, outputs):
        return outputs  # (L_i, num_labels) per sentence: lengths differ

    def compute_metrics(self, logits, labels, label_names):
        true_tags, pred_tags = [], []
        for row_logits, row_labels in zip(logits, labels):
            kept = [i for i, label in enumerate(row_labels) if label != IGNORE_INDEX]
            predicted = row_logits.argmax(-1)
            true_tags.append([label_names[row_labels[i]] for i in kept])
            pred_tags.append([label_names[int(predicted[i])] for i in kept])
        scores, _ = M.entity_f1(true_tags, pred_tags)
        flat_true = [t for s in true_tags for t in s]
        flat_pred = [t for s in pred_tags for t in s]
        return {**scores, "accuracy": M.accuracy(flat_true, flat_pred)}

    def prediction(self, example, feature, logits, label_names):
        predicted, tags, previous = logits.argmax(-1), [], None
        for position, word in enumerate(feature["word_ids"]):
            if word is not None and word != previous:
                tags.append(label_names[int(predicted[position])])
            previous = word
        return {"tokens": example.text, "labels": tags + ["O"] * (len(example.text) - len(tags))}


class _PositionTask(Task):
    """A task whose labels are positions (of an answer, of the right choice), not class
    names, and whose standard-input lines are JSON objects with `stdin_keys`."""
    stdin_keys = ()

    def stdin_example(self, line, number):
        try:
            return self.stdin_record(json.loads(line), number)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise DataError(f"standard input line {number}: expected a JSON object with "
                            + " and ".join(f'"{key}"' for key in self.stdin_keys)) from None

    def label_vocab(self, examples):
        return LabelVocab([])

    def check_labels(self, examples, labels, source):
        pass


class QuestionAnswering(_PositionTask):
    """Extractive question answering (SQuAD): the answer is a span of the context. Long
    contexts go in windows of --max-length tokens (default 384) that overlap by --doc-stride
    (default 128) beside the question; the best span over the windows answers (minisft.spans);
    exact match and F1 as the official SQuAD scripts (v2.0 rules when some questions have no
    answer). Labels are (start, end) token positions, [CLS] twice for a window without the
    answer."""
    name, description = "question-answering", "question, context -> the answer's span in the context (SQuAD)"
    metrics = ("f1", "exact_match")
    pair = True
    default_max_length = 384

    def read(self, path, text_column=None, text_pair_column=None, label_column=None, require_labels=True,
             skip_misaligned=False):
        """Questions from SQuAD JSON (v1.1, or v2.0 with unanswerable ones), or JSON lines of
        {"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}.
        An answer whose text is not at its answer_start is an error naming the question, or
        with skip_misaligned its question is dropped and counted."""
        examples = [Example(question.lstrip(), context, answers, line=str(qid), group=group)
                    for qid, question, context, answers, group in _squad_records(path)]
        if require_labels and all(e.label is None for e in examples):
            raise DataError(f"{path}: no question has answers; give a labeled SQuAD file")
        misaligned = [e for e in examples if any(e.text_pair[start:start + len(text)] != text
                                                 for text, start in e.label or ())]
        if misaligned and not skip_misaligned:
            e = misaligned[0]
            text, start = next((t, s) for t, s in e.label if e.text_pair[s:s + len(t)] != t)
            raise DataError(f"{path}: question {e.line}: the answer {text!r} is not at answer_start {start} of its "
                            f"context (found {e.text_pair[start:start + len(text)]!r}); {len(misaligned)} question(s) "
                            "are so; fix them, or pass --skip-misaligned to leave them out")
        if misaligned:
            print(f"{path}: left out {len(misaligned)} question(s) whose answer is not at its answer_start "
                  "(--skip-misaligned)", file=sys.stderr)
            dropped = {id(e) for e in misaligned}
            examples = [e for e in examples if id(e) not in dropped]
        return examples

    def check_training_examples(self, path, examples):
        if not any(e.label for e in examples):
            raise DataError(f"{path}: no question has an answer; SQuAD v2.0 training needs answerable questions too")

    def subset(self, examples, count, seed):
        """The first `count` questions after a seeded shuffle of the articles (run_qa's
        max_train_samples after a shuffle)."""
        groups = sorted({e.group for e in examples}, key=lambda g: (g is None, g))
        random.Random(seed).shuffle(groups)
        rank = {group: i for i, group in enumerate(groups)}
        return sorted(examples, key=lambda e: rank[e.group])[:count]

    stdin_keys = ("question", "context")

    def stdin_record(self, record, number):
        return Example(record["question"].lstrip(), record["context"], line=str(record.get("id", number)))

    def encode(self, examples, tokenizer, labels, max_length=384, label_all_tokens=False, source="data",
               doc_stride=128):
        """One feature per window: input_ids, token_type_ids, label (start, end), and for the
        answer the window's context offsets (None elsewhere) and its question's id, context
        and gold answers."""
        features = []
        for example in examples:
            try:
                windows = tokenizer([example.text], [example.text_pair], truncation="only_second",
                                    max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                                    return_offsets_mapping=True, return_tensors=None)
            except ValueError as exc:
                raise DataError(f"{source}: question {example.line}: its context does not fit in windows of "
                                f"--max-length {max_length} tokens beside the question at --doc-stride {doc_stride} "
                                f"({exc}); use a --doc-stride smaller than the room the question leaves, or a "
                                "larger --max-length") from None
            answers = example.label or []
            for i, ids in enumerate(windows["input_ids"]):
                sequence_ids = windows.sequence_ids(i)
                offsets = [tuple(o) if s == 1 else None for o, s in zip(windows["offset_mapping"][i], sequence_ids)]
                if answers:
                    text, start = answers[0]
                    label = spans.answer_positions(windows["offset_mapping"][i], sequence_ids, start,
                                                   start + len(text))
                else:
                    label = (0, 0)
                features.append({"input_ids": ids, "token_type_ids": windows["token_type_ids"][i], "label": label,
                                 "offsets": offsets, "example_id": example.line, "context": example.text_pair,
                                 "answers": [t for t, _ in answers] if example.label is not None else None})
        return features

    def model(self, directory, labels, **overrides):
        from minisft.models.auto import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering.from_pretrained(directory, num_labels=2, **overrides)

    def gather(self, outputs):
        return outputs  # (L_i, 2) start and end logits per window

    def answers(self, features, outputs):
        """{question id: (best span record or None, null score)} over each question's windows."""
        windows = {}
        for feature, logits in zip(features, outputs):
            windows.setdefault(feature["example_id"], (feature["context"], []))[1].append((logits, feature["offsets"]))
        return {qid: spans.best_span(parts, context) for qid, (context, parts) in windows.items()}

    def evaluate(self, features, outputs, label_names):
        gold = {f["example_id"]: f["answers"] for f in features}
        version = "2.0" if any(not answers for answers in gold.values()) else "1.1"
        predicted = {qid: _answer_text(best, null, version) for qid, (best, null) in
                     self.answers(features, outputs).items()}
        return M.squad(predicted, gold, version)

    def predictions(self, examples, features, outputs, label_names):
        found = self.answers(features, outputs)
        for example in examples:
            best, null = found[example.line]
            text = _answer_text(best, null, "2.0" if best is None else "1.1")
            yield {"id": example.line, "answer": text, "score": None if best is None else round(best["score"], 6),
                   "start": None if not text else best["start"], "end": None if not text else best["end"]}


class MultipleChoice(_PositionTask):
    """A question (or context) and C choices -> the right choice: each choice beside the
    question is a row of its own, and the model scores each (MultipleChoiceHead)."""
    name, description = "multiple-choice", "question, choices -> the right choice (SWAG)"
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


class Embedding(_PositionTask):
    """Retrieval embeddings: a bi-encoder (minisft.sentence: mean pooling, normalised) trained
    on (anchor, positive) pairs with in-batch negatives (MultipleNegativesRankingLoss, scale
    20); evaluated by Recall@1/5/10 and MRR@10 of each anchor's positive among all the
    evaluation positives, by cosine similarity; saved as a sentence-transformers directory."""
    name, description = "embedding", "(anchor, positive) pairs -> sentence embeddings for retrieval"
    metrics = ("mrr@10", "recall@1", "recall@5", "recall@10")
    stdin_keys = ("anchor",)

    def read(self, path, text_column=None, text_pair_column=None, label_column=None, require_labels=True,
             skip_misaligned=False):
        """Pairs from CSV/TSV/JSON lines (anchor and positive columns: anchor/query/question,
        positive/passage/context), or from SQuAD JSON as (question, its paragraph)."""
        if str(path).lower().endswith(".json"):
            return [Example(question, context, line=qid)
                    for qid, question, context, _, _ in _squad_records(path)]
        records = read_records(path)
        columns = list(records[0][1])
        anchor = pick_column(path, columns, text_column, ANCHOR_COLUMNS, "anchor", "--text-column")
        try:
            positive = pick_column(path, columns, text_pair_column, POSITIVE_COLUMNS, "positive",
                                   "--text-pair-column")
        except DataError:
            raise DataError(f"{path}: no positive column ({', '.join(POSITIVE_COLUMNS)}; columns: "
                            f"{', '.join(columns)}); an embedding pair needs one, or name it with --text-pair-column")
        bad = [n for n, r in records if not str(r.get(anchor) or "").strip() or not str(r.get(positive) or "").strip()]
        if bad:
            raise rows_error(path, bad, f"have an empty {anchor!r} or {positive!r}", "fill them in or remove them")
        return [Example(str(r[anchor]), str(r[positive]), line=n) for n, r in records]

    def stdin_record(self, record, number):
        return Example(record["anchor"], record.get("positive"), line=number)

    def encode(self, examples, tokenizer, labels, max_length=128, label_all_tokens=False, source="data",
               doc_stride=128):
        """One feature per pair: the anchor and the positive as two rows, each tokenised alone."""
        anchors = tokenizer([e.text for e in examples], truncation=True, max_length=max_length, return_tensors=None)
        positives = tokenizer([e.text_pair or "" for e in examples], truncation=True, max_length=max_length,
                              return_tensors=None)
        return [{"input_ids": [anchors["input_ids"][i], positives["input_ids"][i]],
                 "token_type_ids": [anchors["token_type_ids"][i], positives["token_type_ids"][i]],
                 "label": 1, "positive": e.text_pair} for i, e in enumerate(examples)]

    def model(self, directory, labels, **overrides):
        from minisft.sentence import SentenceEmbedder

        return SentenceEmbedder.from_pretrained(directory, **overrides)

    def gather(self, outputs):
        return outputs  # (2, H): the anchor's and the positive's embeddings

    def evaluate(self, features, outputs, label_names):
        from minisft.sentence import retrieval_metrics

        corpus = {}
        for feature, pair in zip(features, outputs):
            corpus.setdefault(feature["positive"], pair[1])
        index = {text: i for i, text in enumerate(corpus)}
        return retrieval_metrics(numpy.stack([pair[0] for pair in outputs]), numpy.stack(list(corpus.values())),
                                 [index[f["positive"]] for f in features])

    def prediction(self, example, feature, logits, label_names):
        anchor, positive = logits
        return {"anchor": example.text, "positive": example.text_pair,
                "similarity": round(float(anchor @ positive / numpy.linalg.norm(anchor) / numpy.linalg.norm(positive)), 6)}


def embedding_record(vector):
    """The JSON record `minisft embed` prints for one text's embedding."""
    return {"embedding": [round(float(v), 7) for v in vector]}


def _answer_text(best, null, version):
    """The predicted answer: the best span, or "" (no answer) when none is valid or, under
    SQuAD v2.0's rules, when the null score beats it (threshold 0)."""
    if best is None or (version != "1.1" and null > best["score"]):
        return ""
    return best["text"]


def _squad_records(path):
    """(id, question, context, answers [(text, start)] or None, article index) per question of
    a SQuAD JSON file, or of JSON lines in the datasets layout."""
    if str(path).lower().endswith(".jsonl"):
        for number, record in read_records(path):
            if not isinstance(record.get("question"), str) or not isinstance(record.get("context"), str):
                raise DataError(f"{path} line {number}: expected a question and a context (strings)")
            answers = record.get("answers")
            pairs = None if answers is None else list(zip(answers.get("text", []), answers.get("answer_start", [])))
            yield str(record.get("id", number)), record["question"], record["context"], pairs, number
        return
    layout = '{"data": [{"paragraphs": [{"context": ..., "qas": [...]}]}]} (SQuAD), or .jsonl records'
    squad = read_json(path, layout)
    try:
        for article_index, article in enumerate(squad["data"]):
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = [(a["text"], a["answer_start"]) for a in qa.get("answers", [])]
                    yield str(qa["id"]), qa["question"], paragraph["context"], answers, article_index
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path}: not SQuAD's layout (missing {exc}); expected {layout}") from None


TASKS = {task.name: task for task in (Classification(), PairClassification(), Regression(), TokenClassification(),
                                      QuestionAnswering(), MultipleChoice(), Embedding())}
DEFAULT = "classification"  # for data whose file format names no task


def for_file(path):
    """The task a data file's format implies (a .conll file: token classification), else the
    default one."""
    suffix = pathlib.Path(path).suffix.lower()
    return next((task for task in TASKS.values() if suffix in task.file_suffixes), TASKS[DEFAULT])


def get(name):
    """The registered task called `name`."""
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
