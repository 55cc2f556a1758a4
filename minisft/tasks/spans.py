"""Answer spans in windows of a context: the halves of extractive question answering that are
not the model, as transformers' run_qa computes them.

A context too long for the model is cut into overlapping windows (the tokenizer's
return_overflowing_tokens with a stride), each beside the question. For training, a window's
label is the first and last token of the answer, or the [CLS] token twice when the window
does not hold the whole answer. For predictions, every window proposes its n best starts and
n best ends; the best-scoring valid span (inside the context, end not before start, at most
max_answer_length tokens) of any window is the answer, its characters found by the offsets.
"""
import numpy

N_BEST, MAX_ANSWER_LENGTH = 20, 30


def answer_positions(offsets, sequence_ids, start_char, end_char, cls_index=0):
    """(first token, last token) of the characters [start_char, end_char) in a window, or
    (cls_index, cls_index) when its context tokens (sequence id 1) do not hold all of them."""
    context = [i for i, s in enumerate(sequence_ids) if s == 1]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return cls_index, cls_index
    start = next(i for i in context if offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return start, end


def best_span(windows, context, n_best=N_BEST, max_answer_length=MAX_ANSWER_LENGTH):
    """The best answer over a context's windows, and the null score.

    windows: (logits (L, 2) of start and end, offsets (L pairs; None outside the context)) per
    window. Returns ({"text", "score", "start", "end"} (characters; None when no window has
    a valid span), null score: the lowest of the windows' [CLS] start + end logits)."""
    best, null = None, None
    for logits, offsets in windows:
        starts, ends = logits[:, 0], logits[:, 1]
        null = starts[0] + ends[0] if null is None else min(null, starts[0] + ends[0])
        for start in numpy.argsort(starts)[::-1][:n_best]:
            for end in numpy.argsort(ends)[::-1][:n_best]:
                if (start >= len(offsets) or end >= len(offsets) or offsets[start] is None or offsets[end] is None
                        or end < start or end - start + 1 > max_answer_length):
                    continue
                score = float(starts[start] + ends[end])
                if best is None or score > best["score"]:
                    first, last = offsets[start][0], offsets[end][1]
                    best = {"text": context[first:last], "score": score, "start": first, "end": last}
    return best, float(null)
