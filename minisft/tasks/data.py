"""Labeled data: readers for CSV, TSV, JSON lines and CoNLL files, checks that name the rows
at fault, label vocabularies, word labels aligned to sub-tokens, and length-grouped,
dynamically padded, seeded batches. What differs between tasks (which columns, which
checks, how examples are encoded) is in minisft.tasks, which uses these pieces.
"""
import csv
import io
import json
import math
import pathlib
import random
from dataclasses import dataclass

import numpy

from minisft.engine.errors import UserError

TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "premise")
PAIR_COLUMNS = ("text_pair", "sentence2", "question2", "hypothesis")
LABEL_COLUMNS = ("label", "labels", "score")
ANCHOR_COLUMNS = ("anchor", "query", "question", "sentence1", "text")
POSITIVE_COLUMNS = ("positive", "passage", "context", "document", "sentence2", "text_pair")
TOKEN_COLUMNS = ("tokens", "words")
TAG_COLUMNS = ("tags", "ner_tags", "labels", "label")
IGNORE_INDEX = -100


class DataError(UserError, ValueError):
    """A data file that cannot be used; the message names the file (and line) and the fix."""


@dataclass
class Example:
    text: object                 # a string, or a list of words for token classification
    text_pair: str = None
    label: object = None         # a class name, a float, a list of tags, or answers [(text, start)]
    line: int = 0                # where it came from, for error messages (a question's id)
    group: int = None            # the article a question belongs to (SQuAD), for subsets
    negatives: tuple = ()        # an embedding row's hard negatives (texts)


# --- reading -------------------------------------------------------------------------------
def read_text(path):
    """A UTF-8 text file's text; DataError naming the file (and line) when missing, not UTF-8 or empty."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); "
                        "re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def read_json(path, expected):
    """A whole JSON file (e.g. SQuAD's); `expected` describes its layout for the error."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); expected {expected}") from None


def read_records(path):
    """(line number, {column: value}) from a CSV, TSV or JSON lines file."""
    path = pathlib.Path(path)
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number}: expected a JSON object per line")
            records.append((number, record))
        return records
    if suffix not in (".csv", ".tsv"):
        what = ("texts a line without labels, which predict and embed take" if suffix == ".txt"
                else f"an unknown file type {suffix!r}")
        raise DataError(f"{path}: {what}; labeled data is .csv, .tsv, .jsonl or .conll")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
    if reader.fieldnames is None:
        raise DataError(f"{path}: the file is empty")
    records = [(reader.line_num, row) for row in reader]
    if not records:
        raise DataError(f"{path}: a header but no rows")
    return records


def pick_columns(path, columns, *wanted):
    """A column for each `wanted` (requested, candidates, what, flag): the one requested
    (--text-column etc.), else the first of `candidates` present. One DataError names every
    column missing, with the file's columns."""
    found, missing = [], []
    for requested, candidates, what, flag in wanted:
        if requested:
            name = requested if requested in columns else None
            why = f"no column {requested!r} for the {what} ({flag})"
        else:
            name = next((c for c in candidates if c in columns), None)
            why = f"no {what} column (looked for {', '.join(candidates)}; name it with {flag})"
        found.append(name)
        if name is None:
            missing.append(why)
    if missing:
        raise DataError(f"{path}: {', '.join(missing)}; its columns: {', '.join(columns)}")
    return found


def pick_column(path, columns, requested, candidates, what, flag):
    """pick_columns for one column."""
    return pick_columns(path, columns, (requested, candidates, what, flag))[0]


def read_conll(path):
    """Sentences from a CoNLL file: `token<TAB>tag` per line (or space-separated), a blank
    line between sentences."""
    text = read_text(path)
    examples, words, tags, start = [], [], [], 1
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if words:
                examples.append(Example(words, label=tags, line=start))
            words, tags, start = [], [], number + 1
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        if len(fields) != 2 or not all(fields):
            raise DataError(f"{path} line {number}: expected 2 fields (token and tag), found "
                            f"{len(fields)}: {line!r}")
        words.append(fields[0])
        tags.append(fields[1])
    if words:
        examples.append(Example(words, label=tags, line=start))
    if not examples:
        raise DataError(f"{path}: no sentences")
    return examples


def _is_number(value):
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def rows_error(path, lines, what, fix, shown=5):
    """A DataError that counts the rows affected and names the first few line numbers."""
    first = ", ".join(str(line) for line in lines[:shown]) + (", ..." if len(lines) > shown else "")
    if len(lines) == 1:
        return DataError(f"{path}: 1 row {what.replace('have ', 'has ', 1)} (line {first}); {fix}")
    return DataError(f"{path}: {len(lines)} rows {what} (lines {first}); {fix}")


def check_label_types(path, examples, numeric):
    """Labels must be all numbers (numeric: made floats) or all of one kind (made strings)."""
    missing = next((e for e in examples if e.label is None or e.label == ""), None)
    if missing is not None:
        raise DataError(f"{path} line {missing.line}: missing label")
    is_number = [_is_number(e.label) for e in examples]
    if numeric:
        if not all(is_number):
            bad = examples[is_number.index(False)]
            raise DataError(f"{path} line {bad.line}: regression label {bad.label!r} is not a number")
        for e in examples:
            e.label = float(e.label)
        return
    if any(is_number) and not all(is_number):
        number = examples[is_number.index(True)]
        text = examples[is_number.index(False)]
        raise DataError(f"{path}: the label column mixes numbers and names (line {number.line}: "
                        f"{number.label!r}, line {text.line}: {text.label!r}); fix the labels")
    kinds = {type(e.label) for e in examples}
    if len(kinds) > 1:  # JSON: 1 and 1.0 and "1"
        raise DataError(f"{path}: the label column mixes types {sorted(k.__name__ for k in kinds)}")
    for e in examples:
        e.label = str(e.label)


# --- labels ----------------------------------------------------------------------------------
class LabelVocab:
    """Class names <-> ids, built from the training labels (sorted) and then fixed."""

    def __init__(self, names):
        self.names = list(names)
        self.ids = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def of_names(cls, names):
        """The vocabulary of a set of class names, sorted; numeric names sort as numbers
        ("2" before "10")."""
        return cls(sorted(names, key=lambda n: (0, float(n), n) if _is_number(n) else (1, 0, n)))

    def check(self, examples, source, tags):
        """Every label of `examples` (evaluation or test data; tags(example) lists them) is
        known from training."""
        unknown = [e for e in examples if e.label is not None and any(t not in self.ids for t in tags(e))]
        if unknown:
            names = sorted({t for e in unknown for t in tags(e) if t not in self.ids})
            raise rows_error(source, [e.line for e in unknown],
                             f"have labels not seen in training ({', '.join(map(repr, names[:5]))})",
                             f"training knows {', '.join(self.names)}")

    def encode(self, label, source, line):
        try:
            return self.ids[label]
        except KeyError:
            raise DataError(f"{source} line {line}: label {label!r} was not seen in training "
                            f"(known: {', '.join(self.names)})") from None

    def __len__(self):
        return len(self.names)


# --- encoding ----------------------------------------------------------------------------------
def align_labels(word_ids, word_labels, label_all_tokens=False):
    """Per-token labels: a word's first sub-token gets its label, the other sub-tokens
    -100 (or the same label with label_all_tokens), special tokens -100."""
    aligned, previous = [], None
    for word in word_ids:
        if word is None:
            aligned.append(IGNORE_INDEX)
        elif word != previous or label_all_tokens:
            aligned.append(word_labels[word])
        else:
            aligned.append(IGNORE_INDEX)
        previous = word
    return aligned


# --- batching --------------------------------------------------------------------------------
def collate(features, pad_token_id=0):
    """Pad a list of features to their longest into (B, L) int64 arrays (labels too); features
    of C rows each (multiple choice: a question beside each choice) into (B, C, L) arrays."""
    if features and features[0]["input_ids"] and isinstance(features[0]["input_ids"][0], list):
        rows = [{"input_ids": ids, "token_type_ids": types} for f in features
                for ids, types in zip(f["input_ids"], f["token_type_ids"])]
        batch = {key: value.reshape(len(features), -1, value.shape[-1])
                 for key, value in collate(rows, pad_token_id).items()}
        if "label" in features[0]:
            batch["labels"] = numpy.array([f["label"] for f in features], dtype=numpy.int64)
        return batch
    length = max(len(f["input_ids"]) for f in features)
    batch_size = len(features)
    input_ids = numpy.full((batch_size, length), pad_token_id, dtype=numpy.int64)
    token_type_ids = numpy.zeros((batch_size, length), dtype=numpy.int64)
    attention_mask = numpy.zeros((batch_size, length), dtype=numpy.int64)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = f["input_ids"]
        token_type_ids[i, :n] = f["token_type_ids"]
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
    if features and "label" in features[0]:
        first = features[0]["label"]
        if isinstance(first, numpy.ndarray):  # multi-label: a multi-hot float32 row per feature
            labels = numpy.stack([f["label"] for f in features])
        elif isinstance(first, list):
            labels = numpy.full((batch_size, length), IGNORE_INDEX, dtype=numpy.int64)
            for i, f in enumerate(features):
                labels[i, :len(f["label"])] = f["label"]
        else:
            labels = numpy.array([f["label"] for f in features],
                                 dtype=numpy.float32 if isinstance(first, float) else numpy.int64)
        batch["labels"] = labels
    return batch


def train_order(features, batch_size, seed, epoch, group_by_length=True):
    """The batches of one training epoch as lists of feature indices.

    A seeded shuffle (seed + epoch); when grouping by length, mega-batches of 50 batches are
    each sorted by length and cut into batches (little padding), and the batches are then
    shuffled again, except that the one with the longest example goes first (a memory
    error shows at once, not hours in).
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(features)))
    rng.shuffle(order)
    if not group_by_length:
        return _cut(order, batch_size)
    mega = 50 * batch_size
    length = lambda j: len(features[j]["input_ids"])  # noqa: E731
    order = [i for start in range(0, len(order), mega)
             for i in sorted(order[start:start + mega], key=length, reverse=True)]
    batches = _cut(order, batch_size)
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(map(length, batches[b])))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def _cut(order, batch_size):
    """Consecutive batches of `batch_size` indices (the last may be shorter)."""
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def eval_order(features, batch_size):
    """Batches for evaluation: sorted by length (little padding); predictions are put back
    in file order by index."""
    order = sorted(range(len(features)), key=lambda j: len(features[j]["input_ids"]))
    return _cut(order, batch_size)


def steps_per_epoch(num_features, batch_size, accumulation=1):
    return math.ceil(math.ceil(num_features / batch_size) / accumulation)
