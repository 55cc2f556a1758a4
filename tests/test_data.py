"""Readers (through the task registry), label vocabularies, label alignment and batching;
bad input named clearly."""
import numpy as np
import pytest

from minisft import tasks
from minisft.tasks.data import DataError, LabelVocab, align_labels, collate, eval_order, read_conll, train_order


def read_examples(path, task):
    return tasks.get(task).read(path)


def write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_csv_tsv_jsonl_with_default_columns(tmp_path):
    csv_path = write(tmp_path, "a.csv", 'text,label\n"Hello, world",pos\nbye,neg\n')
    tsv_path = write(tmp_path, "a.tsv", "sentence1\tsentence2\tlabel\nA man.\tA person.\tentailment\n")
    jsonl_path = write(tmp_path, "a.jsonl", '{"text": "x", "label": 1.5}\n\n{"text": "y", "label": 2}\n')
    examples = read_examples(csv_path, "classification")
    assert [(e.text, e.label, e.line) for e in examples] == [("Hello, world", "pos", 2), ("bye", "neg", 3)]
    pair = read_examples(tsv_path, "pair-classification")[0]
    assert (pair.text, pair.text_pair, pair.label) == ("A man.", "A person.", "entailment")
    assert [e.label for e in read_examples(jsonl_path, "regression")] == [1.5, 2.0]


def test_conll_and_label_vocab_with_alignment(tmp_path):
    path = write(tmp_path, "a.conll", "John\tB-PER\nworks\tO\n\nParis\tB-LOC\n")
    examples = read_conll(path)
    assert [e.text for e in examples] == [["John", "works"], ["Paris"]]
    labels = tasks.get("token-classification").label_vocab(examples)
    assert labels.names == ["B-LOC", "B-PER", "O"]
    assert align_labels([None, 0, 0, 1, None], [5, 7]) == [-100, 5, -100, 7, -100]
    assert align_labels([None, 0, 0, 1, None], [5, 7], label_all_tokens=True) == [-100, 5, 5, 7, -100]


def test_batches_are_seeded_grouped_and_cover_everything():
    features = [{"input_ids": [1] * n, "token_type_ids": [0] * n, "label": n % 2} for n in range(1, 101)]
    first = train_order(features, 8, seed=42, epoch=0)
    assert first == train_order(features, 8, seed=42, epoch=0)
    assert first != train_order(features, 8, seed=42, epoch=1)
    assert sorted(i for b in first for i in b) == list(range(100))
    assert len(features[first[0][0]]["input_ids"]) == 100  # the longest batch goes first
    batch = collate([features[i] for i in first[1]])
    assert batch["input_ids"].dtype == np.int64 and batch["labels"].dtype == np.int64
    assert (batch["attention_mask"].sum(1) == [len(features[i]["input_ids"]) for i in first[1]]).all()
    assert sorted(i for b in eval_order(features, 16) for i in b) == list(range(100))


@pytest.mark.parametrize("name, content, task, message", [
    ("a.csv", "sentence,other\nx,1\n", "classification", r"a.csv: no label column .*--label-column\); its columns: sentence, other$"),
    ("a.csv", "words,label\nx,1\n", "classification", r"a.csv: no text column \(looked for text, sentence"),
    ("a.csv", "words,other\nx,1\n", "classification", r"a.csv: no text column \(looked for text, sentence.*--text-column\), "
                                                         r"no label column \(looked for label.*--label-column\); its columns: words, other$"),
    ("a.jsonl", '{"text": 1}\n', "token-classification", r"a.jsonl: no tokens column .*, no tags column .*; its columns: text$"),
    ("a.csv", "", "classification", r"a.csv: the file is empty"),
    ("a.csv", "text,label\n", "classification", r"a.csv: a header but no rows"),
    ("a.csv", "text,label\na,1\nb,positive\n", "classification", r"a.csv: the label column mixes numbers and names \(line 2: '1', line 3: 'positive'\)"),
    ("a.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "1"}\n', "classification", r"mixes types"),
    ("a.csv", "text,label\na,1\nb,high\n", "regression", r"a.csv line 3: regression label 'high' is not a number"),
    ("a.csv", "text,label\na,\n", "classification", r"a.csv line 2: missing label"),
    ("a.jsonl", '{"text": "a", "label": 1}\nnot json\n', "classification", r"a.jsonl line 2: not valid JSON"),
    ("a.conll", "John\tB-PER\nworks\tO\textra\n", "token-classification", r"a.conll line 2: expected 2 fields \(token and tag\), found 3"),
    ("a.txt", "x", "classification", r"a.txt: texts a line without labels, which predict and embed take; labeled "
                                     r"data is .csv, .tsv, .jsonl or .conll"),
    ("a.xlsx", "x", "classification", r"a.xlsx: an unknown file type '.xlsx'"),
])
def test_bad_files_are_named_with_line_and_fix(tmp_path, name, content, task, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=message):
        read_examples(path, task)


def test_non_utf8_file_names_the_line(tmp_path):
    path = write(tmp_path, "a.csv", b"text,label\nok,1\ncaf\xe9,0\n", mode="wb")
    with pytest.raises(DataError, match=r"a.csv line 3: not UTF-8 \(byte 0xe9\); re-save the file as UTF-8"):
        read_examples(path, "classification")


def test_unknown_label_at_eval_time(tmp_path):
    labels = LabelVocab(["negative", "positive"])
    with pytest.raises(DataError, match=r"dev.csv line 7: label 'neutral' was not seen in training \(known: negative, positive\)"):
        labels.encode("neutral", "dev.csv", 7)


def test_numeric_labels_sort_as_numbers():
    from minisft.tasks.data import Example
    labels = tasks.get("classification").label_vocab([Example("a", label=v) for v in ("10", "2", "1")])
    assert labels.names == ["1", "2", "10"]
