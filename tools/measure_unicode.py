"""Measure the Unicode character classes that transformers' (Rust) tokenizers use, code point
by code point, and write them to minisft/tokenizers/unicode_tables.py (run from the repository root with
the reference extra: `python tools/measure_unicode.py`; it rewrites that file).

Why measured and not taken from Python's unicodedata: the Rust tokenizers library classifies
characters with tables of its own crates, each frozen at some Unicode version (e.g. its
"other" and "punctuation" categories predate U+061D, and its "other" leaves unassigned code
points in the word), while Python's unicodedata follows the Python release. Exact ids on every
string need the classes the reference actually applies, so each code point is put through the
reference's normalizer and pre-tokenizers:

- BERT (BertNormalizer, BertPreTokenizer):
    DROP    removed by clean_text (controls, formats, private use, NUL, U+FFFD)
    SPACE   turned into a space by clean_text
    CHINESE surrounded by spaces by handle_chinese_chars (CJK ideographs, as BERT defines them)
    SPLIT   whitespace to BertPreTokenizer (splits words, dropped)
    PUNCT   punctuation to BertPreTokenizer (a word of its own)
    NONSPACING  removed by strip_accents (nonspacing marks)
    DECOMPOSE   canonical decomposition (NFD) where it changes the character: Python's
                unicodedata, unless that disagrees with what strip_accents measured, as for
                characters newer than the reference's normalization tables (Hangul syllables,
                decomposed by formula, are not listed)
    COMBINING   canonical combining classes, which order marks in NFD: Python's unicodedata
                values (stable across Unicode versions) for the marks the reference's NFD
                reorders, measured against U+0334 (class 1) and U+0301 (class 230)
    LOWER   lowercase's result where it changes the character
- Byte-level BPE (the GPT-2 pre-tokenization regex of ByteLevel):
    LETTER, NUMBER, WHITESPACE   the regex's \\p{L}, \\p{N} and \\s

Ranges are written as "start-end" hexadecimal code points, maps as "code>code.code", combining
classes as "start-end:class".
"""
import pathlib
import unicodedata

TARGET = pathlib.Path(__file__).resolve().parents[1] / "minisft" / "tokenizers" / "unicode_tables.py"
HANGUL = range(0xAC00, 0xD7A4)


def code_points():
    return (c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)


def ranges(codes):
    """"start-end,..." of sorted code points."""
    out, start, last = [], None, None
    for c in codes:
        if start is not None and c == last + 1:
            last = c
            continue
        if start is not None:
            out.append(f"{start:X}-{last:X}")
        start = last = c
    if start is not None:
        out.append(f"{start:X}-{last:X}")
    return ",".join(out)


def classes(values):
    """"start-end:class,..." of sorted (code point, class) pairs, runs of one class merged."""
    runs = []
    for code, value in values:
        if runs and runs[-1][1] == code - 1 and runs[-1][2] == value:
            runs[-1][1] = code
        else:
            runs.append([code, code, value])
    return ",".join(f"{a:X}-{b:X}:{value}" for a, b, value in runs)


def mapping(pairs):
    return " ".join(f"{c:X}>" + ".".join(f"{ord(x):X}" for x in out) for c, out in pairs)


def measure():
    from tokenizers import normalizers, pre_tokenizers

    def bert(**flags):
        options = dict(clean_text=False, handle_chinese_chars=False, strip_accents=False, lowercase=False)
        return normalizers.BertNormalizer(**{**options, **flags}).normalize_str

    clean, strip, lower = bert(clean_text=True), bert(strip_accents=True), bert(lowercase=True)
    chinese = bert(handle_chinese_chars=True)
    split = pre_tokenizers.BertPreTokenizer().pre_tokenize_str
    nfd = normalizers.NFD().normalize_str
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str
    tables = {name: [] for name in ("DROP", "SPACE", "CHINESE", "SPLIT", "PUNCT", "NONSPACING", "DECOMPOSE",
                                    "COMBINING", "LOWER",
                                    "LETTER", "NUMBER", "WHITESPACE")}
    for code in code_points():
        char = chr(code)
        cleaned = clean(char)
        if cleaned == "":
            tables["DROP"].append(code)
        elif cleaned == " ":
            tables["SPACE"].append(code)
        if chinese(char) != char:
            tables["CHINESE"].append(code)
        pieces = len(split("a" + char + "a"))
        if pieces != 1:
            tables["SPLIT" if pieces == 2 else "PUNCT"].append(code)
        if strip(char) == "":
            tables["NONSPACING"].append(code)
        if unicodedata.combining(char) and (nfd("a" + char + "\u0334")[-1] != "\u0334"
                                            or nfd("a\u0301" + char)[1] != "\u0301"):
            tables["COMBINING"].append((code, unicodedata.combining(char)))
        lowered = lower(char)
        if lowered != char:
            tables["LOWER"].append((code, lowered))
        if len(byte_level("a" + char)) == 1:
            tables["LETTER"].append(code)
        elif len(byte_level("1" + char)) == 1:
            tables["NUMBER"].append(code)
        elif code == 0x20 or len(byte_level("x" + char * 2 + "x")) == 4:
            tables["WHITESPACE"].append(code)
    nonspacing = {chr(c) for c in tables["NONSPACING"]}
    for code in code_points():
        char = chr(code)
        decomposed = unicodedata.normalize("NFD", char)
        if code in HANGUL or decomposed == char:
            continue
        if "".join(c for c in decomposed if c not in nonspacing) != strip(char):
            decomposed = strip(char)
        if decomposed != char:
            tables["DECOMPOSE"].append((code, decomposed))
    return tables


def write(tables, version):
    lines = [f'"""Unicode character classes of the Rust tokenizers library {version}, written by',
             "tools/measure_unicode.py (which says how they were measured); do not edit by hand.",
             "Read through minisft.tokenizers.unicode.", '"""']
    for name, values in tables.items():
        text = (mapping(values) if name in ("DECOMPOSE", "LOWER") else classes(values) if name == "COMBINING"
                else ranges(values))
        lines.append(f"{name} = (")
        lines.extend(f"    {text[i:i + 96]!r}" for i in range(0, len(text), 96))
        lines.append(")")
    TARGET.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    import tokenizers

    write(measure(), tokenizers.__version__)
    print(f"wrote {TARGET}")
