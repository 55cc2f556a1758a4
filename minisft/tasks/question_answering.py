"""Extractive question answering (SQuAD): windows of a long context, answer spans."""
import random
import sys

from minisft.tasks import metrics as M
from minisft.tasks import spans
from minisft.tasks.data import (DataError, Example, read_json, read_records)
from minisft.tasks.base import PositionTask


class QuestionAnswering(PositionTask):
    """Extractive question answering (SQuAD): the answer is a span of the context. Long
    contexts go in windows of --max-length tokens (default 384) that overlap by --doc-stride
    (default 128) beside the question; the best span over the windows answers (minisft.tasks.spans);
    exact match and F1 as the official SQuAD scripts (v2.0 rules when some questions have no
    answer). Labels are (start, end) token positions, [CLS] twice for a window without the
    answer."""
    name, description = "question-answering", "question, context -> the answer's span in the context (SQuAD)"
    metrics = ("f1", "exact_match")
    pair = True
    default_max_length = 384
    own_options = ("doc_stride", "skip_misaligned")
    exported_outputs = ("start_logits", "end_logits")

    def read(self, path, text_column=None, text_pair_column=None, label_column=None, require_labels=True,
             skip_misaligned=False):
        """Questions from SQuAD JSON (v1.1, or v2.0 with unanswerable ones), or JSON lines of
        {"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}.
        An answer whose text is not at its answer_start is an error naming the question, or
        with skip_misaligned its question is dropped and counted."""
        examples = [Example(question.lstrip(), context, answers, line=str(qid), group=group)
                    for qid, question, context, answers, group in squad_records(path)]
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


def _answer_text(best, null, version):
    """The predicted answer: the best span, or "" (no answer) when none is valid or, under
    SQuAD v2.0's rules, when the null score beats it (threshold 0)."""
    if best is None or (version != "1.1" and null > best["score"]):
        return ""
    return best["text"]


def squad_records(path):
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
