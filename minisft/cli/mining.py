"""`minisft mine-hard-negatives`: hard negatives mined with an embedding model, as
sentence-transformers' mine_hard_negatives does with its "top" sampling: for each distinct
anchor, the corpus (every distinct positive) ranked by cosine similarity; of its first
range_max + positives + 1 candidates, the anchor's own positives and the anchor itself are
excluded, and so are candidates too close to its positives (the margins) or outside
[min_score, max_score]; of the first range_max left, the first range_min are skipped and
the next num_negatives kept.

    rows, short = mine(anchors, positives, embed, Mining(num_negatives=3))   # embed(texts) -> (N, H), normalised
"""
from dataclasses import dataclass

import numpy

from minisft.training.options import OptionError


@dataclass
class Mining:
    num_negatives: int = 3
    range_min: int = 0
    range_max: int = None       # default: range_min + num_negatives (x 10 with a margin or a score bound) + positives
    absolute_margin: float = None  # drop candidates with score + margin > the anchor's lowest positive score
    relative_margin: float = None  # drop candidates above that score less |score| x margin
    max_score: float = None
    min_score: float = None
    output_format: str = "triplet"  # one row per negative, or "n-tuple": one row of num_negatives


def mine(anchors, positives, embed, settings):
    """Rows of (anchor, positive, negative) ("triplet"), or (anchor, positive, negative_1, ...,
    negative_N) where all N were found ("n-tuple"), in the order of the distinct anchors and
    each one's positives; and how many (anchor, positive) rows got fewer than N negatives."""
    corpus = list(dict.fromkeys(positives))
    corpus_index = {text: i for i, text in enumerate(corpus)}
    queries = list(dict.fromkeys(anchors))
    own = {}  # each distinct anchor's distinct positives, as corpus indices in order
    for anchor, positive in zip(anchors, positives):
        found = own.setdefault(anchor, [])
        if corpus_index[positive] not in found:
            found.append(corpus_index[positive])
    range_max = _check(settings, max(len(p) for p in own.values()))
    query_vectors, corpus_vectors = embed(queries), embed(corpus)
    scores = query_vectors @ corpus_vectors.T                  # (Q, D) cosine similarities
    window = range_max + max(len(p) for p in own.values()) + 1  # the candidates looked at: room for the excluded
    outside = numpy.argsort(-scores, axis=1, kind="stable")[:, window:]
    numpy.put_along_axis(scores, outside, -numpy.inf, axis=1)
    for q, query in enumerate(queries):
        excluded = own[query] + ([corpus_index[query]] if query in corpus_index else [])
        scores[q, excluded] = -numpy.inf
        lowest_positive = float(min(query_vectors[q] @ corpus_vectors[p] for p in own[query]))
        drop = numpy.zeros(len(corpus), dtype=bool)
        if settings.absolute_margin is not None:
            drop |= scores[q] + settings.absolute_margin > lowest_positive
        if settings.relative_margin is not None:
            drop |= scores[q] > lowest_positive - abs(lowest_positive) * settings.relative_margin
        if settings.max_score is not None:
            drop |= scores[q] > settings.max_score
        if settings.min_score is not None:
            drop |= scores[q] < settings.min_score
        scores[q, drop] = -numpy.inf
    order = numpy.argsort(-scores, axis=1, kind="stable")[:, :range_max][:, settings.range_min:]
    order = order[:, :settings.num_negatives]
    rows, short = [], 0
    for q, query in enumerate(queries):
        negatives = [corpus[i] for i in order[q] if numpy.isfinite(scores[q, i])]
        for p in own[query]:
            short += len(negatives) < settings.num_negatives
            if settings.output_format == "triplet":
                rows += [(query, corpus[p], negative) for negative in negatives]
            elif len(negatives) == settings.num_negatives:
                rows.append((query, corpus[p], *negatives))
    return rows, short


def _check(settings, max_positives):
    """range_max (its default when None), or OptionError for a window that cannot hold the
    negatives asked for."""
    bounded = any(v is not None for v in (settings.absolute_margin, settings.relative_margin, settings.max_score,
                                          settings.min_score))
    range_max = settings.range_max
    if range_max is None:
        range_max = settings.range_min + settings.num_negatives * (10 if bounded else 1) + max_positives
    if settings.range_min >= range_max:
        raise OptionError("--range-min", settings.range_min, f"not below --range-max {range_max}",
                          "lower --range-min or raise --range-max")
    if settings.num_negatives > range_max - settings.range_min:
        raise OptionError("--num-negatives", settings.num_negatives, f"more than the {range_max - settings.range_min} "
                          f"candidates between --range-min {settings.range_min} and --range-max {range_max}",
                          "lower --num-negatives or widen the range")
    return range_max


def columns(anchor, positive, settings):
    """The output's header: the input's anchor and positive columns, then negative (one a row)
    or negative_1 ... negative_N, as sentence-transformers names them."""
    if settings.output_format == "triplet":
        return [anchor, positive, "negative"]
    return [anchor, positive, *(f"negative_{i}" for i in range(1, settings.num_negatives + 1))]
