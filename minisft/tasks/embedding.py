"""Sentence embeddings trained on (anchor, positive) pairs, in-batch negatives."""

import numpy

from minisft.tasks.data import (ANCHOR_COLUMNS, POSITIVE_COLUMNS, Example, pick_columns, read_records, rows_error)
from minisft.tasks import metrics as M
from minisft.tasks.base import PositionTask
from minisft.tasks.question_answering import squad_records


class Embedding(PositionTask):
    """Retrieval embeddings: a bi-encoder (minisft.sentence: mean pooling, normalised) trained
    on (anchor, positive) pairs, or (anchor, positive, negative...) rows, with in-batch and
    hard negatives (MultipleNegativesRankingLoss, scale 20; within MatryoshkaLoss with
    --matryoshka-dims); evaluated by Recall@1/5/10 and MRR@10 of each anchor's positive among
    all the evaluation positives and negatives, by cosine similarity (at each Matryoshka
    dimension too); saved as a sentence-transformers directory."""
    name, description = "embedding", "(anchor, positive) pairs -> sentence embeddings for retrieval"
    metrics = ("mrr@10", "recall@1", "recall@5", "recall@10")
    stdin_keys = ("anchor",)
    own_options = ("matryoshka_dims",)
    exported_outputs = ("sentence_embedding",)  # sentence-transformers' ONNX name

    def output_options(self, args):
        return {"matryoshka_dims": args.matryoshka_dims}

    def read(self, path, text_column=None, text_pair_column=None, label_column=None, require_labels=True,
             skip_misaligned=False):
        """Pairs from CSV/TSV/JSON lines (anchor and positive columns: anchor/query/question,
        positive/passage/context, and any hard negatives in the columns named negative...,
        in file order), or from SQuAD JSON as (question, its paragraph)."""
        if str(path).lower().endswith(".json"):
            return [Example(question, context, line=qid)
                    for qid, question, context, _, _ in squad_records(path)]
        records = read_records(path)
        columns = list(records[0][1])
        anchor, positive = pick_columns(path, columns, (text_column, ANCHOR_COLUMNS, "anchor", "--text-column"),
                                        (text_pair_column, POSITIVE_COLUMNS, "positive", "--text-pair-column"))
        negatives = [c for c in columns if c.startswith("negative")]
        for column, what in [(anchor, "an empty"), (positive, "an empty")] + [(c, "an empty negative") for c in negatives]:
            bad = [n for n, r in records if not str(r.get(column) or "").strip()]
            if bad:
                raise rows_error(path, bad, f"have {what} {column!r}", "fill them in or remove them")
        return [Example(str(r[anchor]), str(r[positive]), line=n, negatives=tuple(str(r[c]) for c in negatives))
                for n, r in records]

    def stdin_record(self, record, number):
        return Example(record["anchor"], record.get("positive"), line=number)

    def encode(self, examples, tokenizer, labels, max_length=128, label_all_tokens=False, source="data",
               doc_stride=128):
        """One feature per row: the anchor, the positive and each negative as rows of their own,
        each tokenised alone."""
        columns = [[e.text for e in examples], [e.text_pair or "" for e in examples]]
        columns += [[e.negatives[k] for e in examples] for k in range(len(examples[0].negatives) if examples else 0)]
        encoded = [tokenizer(texts, truncation=True, max_length=max_length, return_tensors=None) for texts in columns]
        return [{"input_ids": [c["input_ids"][i] for c in encoded], "token_type_ids": [c["token_type_ids"][i] for c in encoded],
                 "label": 1, "positive": e.text_pair, "negatives": e.negatives} for i, e in enumerate(examples)]

    def training_loss(self, model, batch, args, class_weights=None):
        """MultipleNegativesRankingLoss over the rows' in-batch and hard negatives, within
        MatryoshkaLoss at --matryoshka-dims."""
        from minisft.models.sentence import pairs_loss

        embeddings = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"]).logits
        return pairs_loss(embeddings, args.matryoshka_dims)

    def model(self, directory, labels, **overrides):
        from minisft.models.sentence import SentenceEmbedder

        return SentenceEmbedder.from_pretrained(directory, **overrides)

    def export_settings(self, model):
        return {"pooling": model.pooling, "normalize": model.normalize}

    def gather(self, outputs):
        return outputs  # (2 + k, H): the anchor's, the positive's and the negatives' embeddings

    def evaluate(self, features, outputs, label_names, matryoshka_dims=None):
        """Retrieval metrics against the corpus of every positive and negative; with
        Matryoshka dimensions, also on each one's leading dimensions (NAME/dimD)."""
        corpus = {}
        for feature, rows in zip(features, outputs):
            for text, embedding in zip((feature["positive"], *feature.get("negatives", ())), rows[1:]):
                corpus.setdefault(text, embedding)
        index = {text: i for i, text in enumerate(corpus)}
        queries, documents = numpy.stack([rows[0] for rows in outputs]), numpy.stack(list(corpus.values()))
        relevant = [index[f["positive"]] for f in features]
        scores = M.retrieval_metrics(queries, documents, relevant)
        for dim in matryoshka_dims or ():
            at = M.retrieval_metrics(queries[:, :dim], documents[:, :dim], relevant)
            scores.update({f"{name}/dim{dim}": value for name, value in at.items()})
        return scores

    def prediction(self, example, feature, logits, label_names):
        anchor, positive = logits[:2]  # a row's negatives, if any, follow
        return {"anchor": example.text, "positive": example.text_pair,
                "similarity": round(float(anchor @ positive / numpy.linalg.norm(anchor) / numpy.linalg.norm(positive)), 6)}


def embedding_record(vector):
    """The JSON record `minisft embed` prints for one text's embedding."""
    return {"embedding": [round(float(v), 7) for v in vector]}
