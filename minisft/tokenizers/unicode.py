"""The character classes tokenizers split text by, as the reference (Rust) tokenizers apply
them: measured tables in unicode_tables.py, read here on first use.

    bert_kind("\\u061d") -> "word"      strip_accents(list("é"), [0]) -> (["e"], [0])
    byte_level_classes() -> {"letter": "[A-Za-z...]", "number": ..., "whitespace": ...}
"""
import bisect
import functools

from minisft.tokenizers import unicode_tables

HANGUL_FIRST, HANGUL_COUNT = 0xAC00, 11172
LEADING, VOWEL, TRAILING = 0x1100, 0x1161, 0x11A7
VOWELS, TRAILINGS = 21, 28


class RangeSet:
    """Code points given as "start-end,..." hexadecimal ranges; `char in ranges`."""

    def __init__(self, text):
        pairs = [part.split("-") for part in "".join(text).split(",") if part]
        self.starts = [int(a, 16) for a, _ in pairs]
        self.ends = [int(b, 16) for _, b in pairs]

    def __contains__(self, char):
        code = ord(char)
        i = bisect.bisect_right(self.starts, code) - 1
        return i >= 0 and code <= self.ends[i]

    def regex_class(self, below=0x110000):
        """The body of a regular-expression character class, e.g. "A-Za-z", of the code
        points below `below`."""
        return "".join(f"\\U{a:08x}" if a == min(b, below - 1) else f"\\U{a:08x}-\\U{min(b, below - 1):08x}"
                       for a, b in zip(self.starts, self.ends) if a < below)


def _mapping(text):
    entries = (entry.split(">") for entry in "".join(text).split())
    return {chr(int(code, 16)): "".join(chr(int(c, 16)) for c in out.split(".") if c) for code, out in entries}


def _classes(text):
    entries = (entry.split(":") for entry in "".join(text).split(","))
    return {chr(code): int(value) for span, value in entries
            for code in range(int(span.split("-")[0], 16), int(span.split("-")[1], 16) + 1)}


@functools.cache
def _tables():
    sets = ("DROP", "SPACE", "CHINESE", "SPLIT", "PUNCT", "NONSPACING")
    return ({name: RangeSet(getattr(unicode_tables, name)) for name in sets}
            | {name: _mapping(getattr(unicode_tables, name)) for name in ("DECOMPOSE", "LOWER")}
            | {"COMBINING": _classes(unicode_tables.COMBINING)})


@functools.lru_cache(maxsize=None)
def bert_clean_kind(char):
    """What BERT's clean_text does to a raw character: "drop", "space" or "keep"."""
    tables = _tables()
    return "drop" if char in tables["DROP"] else "space" if char in tables["SPACE"] else "keep"


def is_chinese(char):
    """Whether BERT's handle_chinese_chars makes `char` a word of its own (CJK ideographs)."""
    return char in _tables()["CHINESE"]


@functools.lru_cache(maxsize=None)
def bert_kind(char):
    """How BERT's pre-tokenizer treats a normalised character: "space" (splits, dropped),
    "punct" (a word of its own) or "word"."""
    tables = _tables()
    return "space" if char in tables["SPLIT"] else "punct" if char in tables["PUNCT"] else "word"


@functools.lru_cache(maxsize=None)
def decompose(char):
    """The canonical decomposition (NFD) of one character; Hangul syllables into their
    conjoining jamo by the formula of Unicode ch. 3.12."""
    index = ord(char) - HANGUL_FIRST
    if not 0 <= index < HANGUL_COUNT:
        return _tables()["DECOMPOSE"].get(char, char)
    leading, rest = divmod(index, VOWELS * TRAILINGS)
    vowel, trailing = divmod(rest, TRAILINGS)
    jamo = chr(LEADING + leading) + chr(VOWEL + vowel)
    return jamo + chr(TRAILING + trailing) if trailing else jamo


def strip_accents(chars, origins):
    """NFD, then nonspacing marks removed, over a character stream. Each run of combining
    marks is put in canonical order (stable by combining class); then, as the reference
    aligns them, the first character of each decomposition takes the next input character's
    origin in the new order, and the characters a decomposition adds take the origin before
    them. chars, origins: equal-length lists; returns new ones."""
    tables = _tables()
    combining, nonspacing = tables["COMBINING"], tables["NONSPACING"]
    decomposed = [(piece, i > 0) for char in chars for i, piece in enumerate(decompose(char))]
    start = 0
    while start < len(decomposed):
        end = start
        while end < len(decomposed) and combining.get(decomposed[end][0], 0):
            end += 1
        if end - start > 1:
            decomposed[start:end] = sorted(decomposed[start:end], key=lambda item: combining[item[0]])
        start = end + 1
    out, places = [], []
    next_origin = iter(origins)
    origin = origins[0] if origins else 0
    for char, added in decomposed:
        if not added:
            origin = next(next_origin)
        if char not in nonspacing:
            out.append(char)
            places.append(origin)
    return out, places


@functools.lru_cache(maxsize=None)
def lowercase(char):
    """One character lowercased, as the reference does it (character by character, so no
    final-sigma rule); may be several characters."""
    return _tables()["LOWER"].get(char, char)


@functools.cache
def byte_level_classes(below=0x110000):
    """Regular-expression class bodies of the byte-level pre-tokenizer's \\p{L}, \\p{N}, \\s,
    of the code points below `below` (0x80: the classes for ASCII text)."""
    return {name.lower(): RangeSet(getattr(unicode_tables, name)).regex_class(below)
            for name in ("LETTER", "NUMBER", "WHITESPACE")}


@functools.cache
def whitespace():
    """The characters of the byte-level pre-tokenizer's \\s, as one string."""
    ranges = RangeSet(unicode_tables.WHITESPACE)
    return "".join(chr(c) for a, b in zip(ranges.starts, ranges.ends) for c in range(a, b + 1))
