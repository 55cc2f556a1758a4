"""Test helpers shared across test modules."""
import gzip
import json

import numpy as np
import pytest

import minisft
import minisft.functional as F
import minisft.nn as nn


class MinisftLib:
    """The namespace that tests/op_cases.py expressions run against (torch's twin)."""
    F = F
    nn = nn
    cat = staticmethod(minisft.cat)
    where = staticmethod(minisft.where)
    constant = staticmethod(lambda values: np.asarray(values, dtype=np.float32))

    @staticmethod
    def call(module, params, *args):
        for name, value in params.items():
            setattr(module, name, value)
        return module(*args)


def fixture_mismatches(path, make_tokenizer, observe):
    """(cases, [(field, text)]) for a tokenizer fixture (gzipped JSON lines, one case each):
    a tokenizer made by make_tokenizer(**case["options"]) per distinct options, observe(tok,
    case) -> {field: value} compared with the case's fields; a case that records an error
    must raise ValueError."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        cases = [json.loads(line) for line in f]
    tokenizers, mismatches = {}, []
    for case in cases:
        key = json.dumps(case["options"], sort_keys=True)
        if key not in tokenizers:
            tokenizers[key] = make_tokenizer(**case["options"])
        tok = tokenizers[key]
        if "error" in case:
            with pytest.raises(ValueError):
                tok(case["text"], case["pair"], return_tensors=None, **case["call"])
            continue
        mismatches += [(field, case["text"]) for field, value in observe(tok, case).items() if value != case[field]]
    return cases, mismatches


def observe_encoding(tok, case):
    """What a tokenizer fixture records of one case: ids, offsets, word and sequence ids, decodings."""
    enc = tok(case["text"], case["pair"], return_offsets_mapping=True, return_tensors=None, **case["call"])
    ids = enc["input_ids"][0]
    return {"input_ids": ids, "offset_mapping": [list(o) for o in enc["offset_mapping"][0]],
            "word_ids": enc.word_ids(0), "sequence_ids": enc.sequence_ids(0), "decoded": tok.decode(ids),
            "decoded_skipping_special": tok.decode(ids, skip_special_tokens=True)}


def assert_layers_and_gradients_match(model, out, loss, ref):
    """Every hidden state and attention of `out` (as many as the fixture's layers), then, after
    loss.backward(), every parameter's gradient equal to the reference fixture's (1e-5 absolute)."""
    from conftest import assert_close

    layers = sum(1 for k in ref.files if k.startswith("attentions/"))
    assert layers >= 2 and len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    for i, hidden in enumerate(out.hidden_states):
        assert_close(hidden, ref[f"hidden_states/{i}"], atol=1e-5, rtol=0, what=f"hidden_states[{i}]")
    for i, attention in enumerate(out.attentions):
        assert_close(attention, ref[f"attentions/{i}"], atol=1e-5, rtol=0, what=f"attentions[{i}]")
    loss.backward()
    names = {k[len("grad/"):] for k in ref.files if k.startswith("grad/")}
    assert names == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        assert_close(param.grad, ref[f"grad/{name}"], atol=1e-5, rtol=0, what=f"grad of {name}")


POSITIVE = ["good", "great", "fun", "wonderful", "brilliant", "moving", "funny", "warm"]
NEGATIVE = ["bad", "awful", "dull", "boring", "tedious", "weak", "mess", "long"]


def write_reviews(path, count, rng):
    """A csv of `count` made-up reviews (text,label) that the tiny vocabulary covers."""
    lines = ["text,label"]
    for _ in range(count):
        positive = rng.random() < 0.5
        words = rng.choice(POSITIVE if positive else NEGATIVE, 3)
        lines.append(f"the film was {' and '.join(words)},{'positive' if positive else 'negative'}")
    path.write_text("\n".join(lines) + "\n")
    return path
