"""Write minisft/tokenizers/grapheme_tables.py: the Unicode properties that extended grapheme
clusters (UAX #29) are made of, for each code point (run from the repository root with the
reference extra: `python tools/measure_graphemes.py`; it rewrites that file).

The reference's Precompiled normalizer (SentencePiece's charsmap, in the Rust tokenizers
library) walks the text grapheme by grapheme. Python's unicodedata has no grapheme
properties, so they are read from the `regex` package (a dependency of transformers), whose
\\p{...} classes follow the Unicode Character Database: Grapheme_Cluster_Break,
Extended_Pictographic and Indic_Conjunct_Break. Ranges are "start-end" hexadecimal code points.

The reference's grapheme tables are of an older Unicode version than regex's, so the marks that
join the character before them (Extend, SpacingMark, ZWJ) are measured on the reference where
they can be: "ϕ" + mark through its Precompiled normaliser (with the nmt_nfkc charsmap of
tests/fixtures/tiny-xlm-roberta) becomes "φ" alone when the two are one cluster (a cluster under
6 bytes is replaced whole by its prefix's entry) and keeps the mark when they are not. A mark the
reference does not join is written as Other. Marks outside the BMP (which make the pair 6 bytes)
and marks the charsmap deletes cannot be told apart this way and keep regex's property.
"""
import pathlib
import sys

import regex

from measure_unicode import code_points, ranges as code_ranges  # tools/, beside this script

TARGET = pathlib.Path(__file__).resolve().parents[1] / "minisft" / "tokenizers" / "grapheme_tables.py"
BREAK = ["CR", "LF", "Control", "Extend", "ZWJ", "Regional_Indicator", "Prepend", "SpacingMark", "L", "V", "T",
         "LV", "LVT"]
PROPERTIES = {**{name: rf"\p{{Grapheme_Cluster_Break={name}}}" for name in BREAK},
              "Extended_Pictographic": r"\p{Extended_Pictographic}",
              **{f"InCB_{name}": rf"\p{{Indic_Conjunct_Break={name}}}" for name in ("Consonant", "Extend", "Linker")}}


def joined_by_the_reference():
    """{code point: whether the reference joins it to "ϕ"} for the BMP marks it can be told for."""
    import tokenizers

    sys.path.insert(0, str(TARGET.parents[2]))
    from minisft.tokenizers.sentencepiece import Charsmap, read_model

    blob = read_model(TARGET.parents[2] / "tests" / "fixtures" / "tiny-xlm-roberta" / "sentencepiece.bpe.model")[
        "normalizer"]["precompiled_charsmap"]
    normalize, own = tokenizers.normalizers.Precompiled(blob).normalize_str, Charsmap(blob).transform
    joining = regex.compile(r"[\p{Grapheme_Cluster_Break=Extend}\p{Grapheme_Cluster_Break=SpacingMark}"
                            r"\p{Grapheme_Cluster_Break=ZWJ}]")
    out = {}
    for c in range(0x10000):
        if 0xD800 <= c <= 0xDFFF or not joining.match(chr(c)) or own(chr(c)) == "":
            continue
        out[c] = normalize("ϕ" + chr(c)) == "φ"
    return out


def ranges(pattern, dropped=frozenset()):
    match = regex.compile(pattern).match
    return code_ranges(c for c in code_points() if match(chr(c)) and c not in dropped)


def main():
    lines = ['"""Grapheme cluster properties (UAX #29), written by tools/measure_graphemes.py (which says',
             'where they come from); do not edit by hand. Read through minisft.tokenizers.graphemes."""',
             f"UNICODE_SOURCE = 'regex {regex.__version__}'", "PROPERTIES = {"]
    dropped = frozenset(c for c, joined in joined_by_the_reference().items() if not joined)
    lines.insert(3, f"NOT_JOINED_BY_THE_REFERENCE = {len(dropped)}  # marks written as Other (see the tool)")
    for name, pattern in PROPERTIES.items():
        text = ranges(pattern, dropped if name in ("Extend", "SpacingMark", "ZWJ", "InCB_Extend", "InCB_Linker") else ())
        chunks = [text[i:i + 96] for i in range(0, len(text), 96)] or [""]
        lines.append(f"    {name!r}: (")
        lines += [f"        {chunk!r}" for chunk in chunks]
        lines.append("    ),")
    lines.append("}")
    TARGET.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
