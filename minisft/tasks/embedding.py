"""Sentence embeddings trained on (anchor, positive) pairs, in-batch negatives."""

import numpy

from minisft.tasks.data import (ANCHOR_COLUMNS, POSITIVE_COLUMNS, DataError, Example, pick_column, read_records, rows_error)
from minisft.tasks import metrics as M
from minisft.tasks.base import PositionTask
from minisft.tasks.question_answering import squad_records


class Embedding(PositionTask):
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
                    for qid, question, context, _, _ in squad_records(path)]
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
        from minisft.models.sentence import SentenceEmbedder

        return SentenceEmbedder.from_pretrained(directory, **overrides)

    def gather(self, outputs):
        return outputs  # (2, H): the anchor's and the positive's embeddings

    def evaluate(self, features, outputs, label_names):

        corpus = {}
        for feature, pair in zip(features, outputs):
            corpus.setdefault(feature["positive"], pair[1])
        index = {text: i for i, text in enumerate(corpus)}
        return M.retrieval_metrics(numpy.stack([pair[0] for pair in outputs]), numpy.stack(list(corpus.values())),
                                 [index[f["positive"]] for f in features])

    def prediction(self, example, feature, logits, label_names):
        anchor, positive = logits
        return {"anchor": example.text, "positive": example.text_pair,
                "similarity": round(float(anchor @ positive / numpy.linalg.norm(anchor) / numpy.linalg.norm(positive)), 6)}


def embedding_record(vector):
    """The JSON record `minisft embed` prints for one text's embedding."""
    return {"embedding": [round(float(v), 7) for v in vector]}
