"""Token classification (NER): word labels aligned to sub-tokens."""

from minisft.engine import functional as F
from minisft.tasks import metrics as M
from minisft.tasks.data import (IGNORE_INDEX, TAG_COLUMNS, TOKEN_COLUMNS, DataError, Example, LabelVocab, align_labels,
                          pick_columns, read_conll, read_records, rows_error)
from minisft.tasks.base import Task


class TokenClassification(Task):
    name, description = "token-classification", "words -> one tag each (named entities)"
    file_suffixes = (".conll",)
    metrics = ("f1", "precision", "recall", "accuracy")
    class_weighted = True
    own_options = ("label_all_tokens",)

    def read(self, path, text_column=None, text_pair_column=None, label_column=None, require_labels=True,
             skip_misaligned=False):
        """Sentences from CoNLL (`token<TAB>tag` lines), or JSON lines/CSV with tokens and tags
        lists."""
        if str(path).lower().endswith((".jsonl", ".json", ".csv", ".tsv")):
            records = read_records(path)
            columns = list(records[0][1])
            words, tags = pick_columns(path, columns, (text_column, TOKEN_COLUMNS, "tokens", "--text-column"),
                                       (label_column, TAG_COLUMNS, "tags", "--label-column"))
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

    def loss_terms(self, feature, class_weights=None):
        if class_weights is None:
            return len(self.loss_classes(feature))  # the loss averages over labeled tokens
        return super().loss_terms(feature, class_weights)

    def loss_classes(self, feature):
        return [label for label in feature["label"] if label != IGNORE_INDEX]

    def weighted_loss(self, logits, labels, class_weights):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), weight=class_weights)

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
