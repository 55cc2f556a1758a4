"""Test helpers shared across test modules."""
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
