"""Extractive question answering: SQuAD files read and checked (misaligned answers named or
skipped), answer spans in windows of a long context, the best span over windows, subsets,
and the command line end to end on the tiny BERT with SQuAD v1.1 and v2.0 files written for
the purpose."""
import json

import numpy as np
import pytest

from minisft import cli, tasks
from minisft.tasks import spans
from minisft.tasks.data import DataError
from minisft.tokenizer import BertTokenizer
from conftest import FIXTURES

TINY = FIXTURES / "tiny-bert"
QA = tasks.get("question-answering")
WORDS = ["the", "film", "was", "good", "great", "bad", "dull", "long", "very", "not", "in", "paris", "london",
         "john", "mary", "visited", "works", "for", "google", "it", "is", "story", "plot"]


def squad_file(path, count, seed, unanswerable=0, misaligned=0):
    """A SQuAD-layout file: `count` questions "who visited CITY ?" over contexts of 20 to 80
    words in which "NAME visited CITY" occurs once; the last `unanswerable` have no answer
    (v2.0), the first `misaligned` a wrong answer_start."""
    rng = np.random.default_rng(seed)
    articles = []
    for index in range(count):
        name, city = rng.choice(["john", "mary"]), rng.choice(["paris", "london"])
        filler = [str(w) for w in rng.choice(WORDS[:10], rng.integers(20, 80))]
        cut = int(rng.integers(0, len(filler)))
        context = " ".join(filler[:cut] + [name, "visited", city] + filler[cut:])
        start = context.index(f"{name} visited")
        answers = [] if index >= count - unanswerable else [{"text": name, "answer_start": start + (index < misaligned)}]
        qa = {"id": f"q{index}", "question": f" who visited {city} ?", "answers": answers}
        if unanswerable:
            qa["is_impossible"] = not answers
        articles.append({"title": f"a{index // 4}", "paragraphs": [{"context": context, "qas": [qa]}]})
    path.write_text(json.dumps({"version": "v2.0" if unanswerable else "1.1", "data": articles}))
    return path


def test_squad_files_are_read_with_their_answers_and_articles(tmp_path):
    examples = QA.read(squad_file(tmp_path / "train.json", 6, seed=0))
    assert [e.line for e in examples] == [f"q{i}" for i in range(6)]
    assert examples[0].text.startswith("who visited")  # the question, left-stripped as run_qa does
    text, start = examples[0].label[0]
    assert examples[0].text_pair[start:start + len(text)] == text
    assert [e.group for e in examples] == [0, 1, 2, 3, 4, 5]


def test_a_misaligned_answer_names_its_question_or_is_skipped(tmp_path, capsys):
    path = squad_file(tmp_path / "train.json", 6, seed=0, misaligned=2)
    with pytest.raises(DataError, match=r"train.json: question q0: the answer .* is not at answer_start .*"
                                        r"2 question\(s\) are so.*--skip-misaligned"):
        QA.read(path)
    examples = QA.read(path, skip_misaligned=True)
    assert [e.line for e in examples] == ["q2", "q3", "q4", "q5"]
    assert "left out 2 question(s)" in capsys.readouterr().err


def test_answer_positions_in_a_window():
    # [CLS] q [SEP] c0 c1 c2 [SEP]: context tokens at characters 0-4, 5-9, 10-14
    offsets = [(0, 0), (0, 3), (0, 0), (0, 4), (5, 9), (10, 14), (0, 0)]
    sequence_ids = [None, 0, None, 1, 1, 1, None]
    assert spans.answer_positions(offsets, sequence_ids, 5, 14) == (4, 5)
    assert spans.answer_positions(offsets, sequence_ids, 6, 8) == (4, 4)  # inside one token
    assert spans.answer_positions(offsets, sequence_ids, 10, 20) == (0, 0)  # runs past the window
    assert spans.answer_positions(offsets[:4] + [(0, 0)], sequence_ids[:4] + [None], 5, 9) == (0, 0)


def test_the_best_span_over_windows_skips_invalid_ones():
    context = "john visited paris and mary visited london"
    offsets = [None, None, (0, 4), (5, 12), (13, 18), None]
    logits = np.full((6, 2), -5.0)
    logits[0] = [1.0, 1.0]  # [CLS]: the null score 2
    logits[1] = [9.0, 9.0]  # the question: not a span of the context
    logits[4, 0] = 8.0  # a start after every good end: (4, 3) is not a span
    logits[2, 0], logits[3, 1] = 3.0, 2.0  # "john visited"
    second = np.full((6, 2), -5.0)
    second[0] = [0.5, 0.5]
    best, null = spans.best_span([(logits, offsets), (second, [None, None, (23, 27), (28, 35), (36, 42), None])],
                                 context)
    assert best["text"] == "john visited" and best["score"] == 5.0 and (best["start"], best["end"]) == (0, 12)
    assert null == 1.0
    long = spans.best_span([(logits, offsets)], context, max_answer_length=1)[0]
    assert long["text"] != "john visited"


def test_long_contexts_go_in_overlapping_windows_with_their_labels(tmp_path):
    examples = QA.read(squad_file(tmp_path / "train.json", 20, seed=1))
    tokenizer = BertTokenizer.from_pretrained(TINY)
    features = QA.encode(examples, tokenizer, QA.label_vocab(examples), max_length=32, doc_stride=8)
    assert len(features) > len(examples)  # contexts of up to 83 words in windows of 32 tokens
    for feature in features:
        start, end = feature["label"]
        assert len(feature["input_ids"]) <= 32
        if (start, end) != (0, 0):
            context = feature["context"]
            name = context[feature["offsets"][start][0]:feature["offsets"][end][1]]
            assert name == feature["answers"][0]
    assert {f["example_id"] for f in features if f["label"] != (0, 0)} == {e.line for e in examples}


def test_a_stride_that_leaves_no_room_is_an_error_naming_the_question(tmp_path):
    examples = QA.read(squad_file(tmp_path / "train.json", 3, seed=1))
    tokenizer = BertTokenizer.from_pretrained(TINY)
    with pytest.raises(DataError, match=r"question q0: its context does not fit .* --doc-stride 30"):
        QA.encode(examples, tokenizer, QA.label_vocab(examples), max_length=32, doc_stride=30)


def test_subsets_take_whole_articles_in_a_seeded_order(tmp_path):
    examples = QA.read(squad_file(tmp_path / "train.json", 20, seed=1))
    first = QA.subset(examples, 7, seed=42)
    assert [e.line for e in first] == [e.line for e in QA.subset(examples, 7, seed=42)]
    assert [e.line for e in first] != [e.line for e in QA.subset(examples, 7, seed=43)]
    assert len(first) == 7 and len({e.line for e in first}) == 7


@pytest.mark.parametrize("version", ["1.1", "2.0"])
def test_the_command_line_trains_evaluates_and_predicts(tmp_path, capsys, version):
    unanswerable = 8 if version == "2.0" else 0
    train = squad_file(tmp_path / "train.json", 40, seed=2, unanswerable=unanswerable)
    dev = squad_file(tmp_path / "dev.json", 12, seed=3, unanswerable=unanswerable // 2)
    output = tmp_path / "out"
    assert cli.main(["train", "--model", str(TINY), "--train", str(train), "--eval", str(dev), "--task",
                     "question-answering", "--output", str(output), "--max-length", "40", "--doc-stride", "12",
                     "--batch-size", "8", "--learning-rate", "5e-3", "--epochs", "3",
                     "--max-train-examples", "32", "--max-eval-examples", "10"]) == 0
    final = json.loads(capsys.readouterr().out)
    assert set(final) == {"eval_exact_match", "eval_f1"} and 0 <= final["eval_f1"] <= 100
    saved = json.loads((output / "training_args.json").read_text())
    assert (saved["task"], saved["max_length"], saved["doc_stride"]) == ("question-answering", 40, 12)
    assert json.loads((output / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]
    assert cli.main(["evaluate", "--model", str(output), "--data", str(dev)]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"exact_match", "f1"}
    assert cli.main(["predict", "--model", str(output), "--data", str(dev)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in records] == [f"q{i}" for i in range(12)]
    context = json.loads(dev.read_text())["data"][0]["paragraphs"][0]["context"]
    first = records[0]
    assert set(first) == {"id", "answer", "score", "start", "end"}
    if first["answer"]:
        assert context[first["start"]:first["end"]] == first["answer"]
