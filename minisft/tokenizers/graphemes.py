"""Extended grapheme clusters (Unicode's UAX #29, rules GB3 to GB13 with GB9c), which the
SentencePiece charsmap normaliser walks: "e" + U+0301, a flag, an emoji joined by ZWJs, a
Hangul syllable in jamo, each one cluster.

    clusters("e\u0301x") == ["e\u0301", "x"]
"""
import bisect
import functools

from minisft.tokenizers.grapheme_tables import PROPERTIES


@functools.cache
def _table(name):
    """(sorted range starts, ends) of one property."""
    pairs = [tuple(int(x, 16) for x in r.split("-")) for r in "".join(PROPERTIES[name]).split(",") if r]
    return [a for a, _ in pairs], [b for _, b in pairs]


def _has(name, code):
    starts, ends = _table(name)
    i = bisect.bisect_right(starts, code) - 1
    return i >= 0 and code <= ends[i]


_BREAKS = ("CR", "LF", "Control", "Extend", "ZWJ", "Regional_Indicator", "Prepend", "SpacingMark", "L", "V", "T",
           "LV", "LVT")


@functools.lru_cache(maxsize=1 << 16)
def _properties(char):
    """(Grapheme_Cluster_Break or None, Extended_Pictographic, InCB or None) of a character."""
    code = ord(char)
    kind = next((name for name in _BREAKS if _has(name, code)), None)
    incb = next((name for name in ("Consonant", "Extend", "Linker") if _has(f"InCB_{name}", code)), None)
    return kind, _has("Extended_Pictographic", code), incb


_CONTROLS = ("CR", "LF", "Control")


def _joins(state, before, after):
    """Whether no cluster boundary falls between `before` and `after` (each _properties);
    state: what GB9c, GB11 and GB12/13 need of the cluster so far."""
    a, b = before[0], after[0]
    if a == "CR" and b == "LF":
        return True                                                     # GB3
    if a in _CONTROLS or b in _CONTROLS:
        return False                                                    # GB4, GB5
    if a == "L" and b in ("L", "V", "LV", "LVT") or a in ("LV", "V") and b in ("V", "T") \
            or a in ("LVT", "T") and b == "T":
        return True                                                     # GB6-GB8
    if b in ("Extend", "ZWJ", "SpacingMark") or a == "Prepend":
        return True                                                     # GB9, GB9a, GB9b
    if after[2] == "Consonant" and state["conjunct"] == "linked":
        return True                                                     # GB9c
    if a == "ZWJ" and after[1] and state["pictographic"] == "zwj":
        return True                                                     # GB11
    if a == "Regional_Indicator" and b == "Regional_Indicator":
        return state["regional"] % 2 == 1                               # GB12, GB13
    return False                                                        # GB999


def _advance(state, props):
    """The cluster state after a character with these properties."""
    kind, pictographic, incb = props
    if pictographic:
        state["pictographic"] = "base"
    elif state["pictographic"] == "base" and kind == "Extend":
        pass
    elif state["pictographic"] in ("base",) and kind == "ZWJ":
        state["pictographic"] = "zwj"
    else:
        state["pictographic"] = None
    if incb == "Consonant":
        state["conjunct"] = "consonant"
    elif incb == "Linker" and state["conjunct"] in ("consonant", "linked"):
        state["conjunct"] = "linked"
    elif incb != "Extend" or state["conjunct"] is None:
        state["conjunct"] = None
    state["regional"] = state["regional"] + 1 if kind == "Regional_Indicator" else 0


def clusters(text):
    """The extended grapheme clusters of `text`, in order: [str]."""
    out, start, previous = [], 0, None
    state = {"pictographic": None, "conjunct": None, "regional": 0}
    for i, char in enumerate(text):
        props = _properties(char)
        if previous is not None and not _joins(state, previous, props):
            out.append(text[start:i])
            start = i
        _advance(state, props)
        previous = props
    if text:
        out.append(text[start:])
    return out
