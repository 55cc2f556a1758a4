"""Test helpers shared across test modules."""
import gzip
import json

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
