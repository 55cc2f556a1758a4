"""Byte-level BPE (GPT-2's scheme, used by RoBERTa-like models), computing exactly what
transformers' tokenizer computes.

text -> special tokens split out -> optional prefix space -> pre-tokens by the GPT-2 regular
expression (contractions, letters, numbers, other symbols, whitespace) -> each pre-token's UTF-8
bytes written as printable characters (bytes_to_unicode) -> merges applied by rank -> ids,
with <s> A </s> (and <s> A </s></s> B </s>), offsets trimmed of the spaces a token starts or
ends with, and one word index per pre-token.

Speed comes from caching: each distinct pre-token is merged once, then looked up.
"""
import functools
import json
import pathlib
import re

from minisft.engine.errors import MissingFile, ModelFileError
from minisft.files.atomic import write_json_atomic, write_text_atomic
from minisft.tokenizers import unicode
from minisft.tokenizers.encoding import EncodedText, Tokenizer, WordCache, template_layout, token_content

ROLES = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>",
         "pad_token": "<pad>", "mask_token": "<mask>"}


@functools.cache
def bytes_to_unicode():
    """{byte: character}: printable Latin-1 bytes stand for themselves, the other 68 bytes
    (controls, space, soft hyphen...) for the characters from U+0100 on, in byte order, so
    that every token is printable text without whitespace."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


@functools.cache
def pre_tokenizer(below=0x110000):
    """GPT-2's pre-tokenization pattern, with the reference's \\p{L}, \\p{N} and \\s classes
    (of the code points below `below`: 0x80 gives a faster pattern for ASCII text)."""
    c = unicode.byte_level_classes(below)
    letter, number, space = c["letter"], c["number"], c["whitespace"]
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letter}]+| ?[{number}]+| ?[^{space}{letter}{number}]+"
                      rf"|[{space}]+(?![^{space}])|[{space}]+")


class ByteLevelBPETokenizer(Tokenizer):
    """Text to model inputs by byte-level BPE, reading tokenizer.json, or vocab.json and
    merges.txt, with tokenizer_config.json."""
    pair_type_id = 0  # one token type: the pair's tokens are type 0 too

    def __init__(self, vocab, merges, add_prefix_space=False, trim_offsets=True, model_max_length=512,
                 strip=None, tokenizer_class=None, source="vocab", template=None, **special_tokens):
        """vocab: {token: id}; merges: [(left, right)], highest priority first; strip:
        {token: (lstrip, rstrip)} for special tokens that take the whitespace beside them;
        tokenizer_class: the transformers class name saved with it (as it was loaded);
        template: tokenizer.json's TemplateProcessing post-processor (ModernBERT's [CLS] A
        [SEP]), else RoBERTa's <s> A </s></s> B </s>."""
        self.vocab = vocab
        self.ids_to_tokens = {i: t for t, i in vocab.items()}
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.add_prefix_space, self.trim_offsets = add_prefix_space, trim_offsets
        self.model_max_length = model_max_length
        roles = {**{role: token for role, token in ROLES.items() if token in vocab or template is None},
                 **{k: v for k, v in special_tokens.items() if v is not None}}
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise TypeError(f"unknown special token roles {sorted(unknown)}; known: {', '.join(ROLES)}")
        self.strip = dict(strip or {})
        self._init_special_tokens(roles, source, self.strip)
        self.template = template
        self.layout, self.pair_type_id = template_layout(template, vocab, source) if template else (None, 0)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._cache = WordCache(self.token_ids)
        self._pattern, self._ascii_pattern = pre_tokenizer(), pre_tokenizer(0x80)
        self._spaces = self.byte_encoder[ord(" ")] + unicode.whitespace()
        self.init_kwargs = {"add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets,
                            "model_max_length": model_max_length, **roles}
        if tokenizer_class is not None:
            self.init_kwargs["tokenizer_class"] = tokenizer_class

    # --- loading and saving ---------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory, **overrides):
        directory = pathlib.Path(directory)
        if (directory / "tokenizer.json").is_file():
            options = load_bpe_json(directory / "tokenizer.json")
            source = directory / "tokenizer.json"
        elif (directory / "vocab.json").is_file():
            source = directory / "vocab.json"
            options = {"vocab": _read_json(source), "merges": load_merges(directory / "merges.txt")}
        else:
            raise MissingFile(f"{directory}: a byte-level BPE tokenizer needs tokenizer.json, or vocab.json "
                                    "and merges.txt (save the tokenizer with transformers' save_pretrained)")
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            config = _read_json(config_file)
            keys = ("add_prefix_space", "trim_offsets", "model_max_length", "tokenizer_class", *ROLES)
            options.update({k: token_content(config[k]) for k in keys if config.get(k) is not None})
            for entry in (config.get("added_tokens_decoder") or {}).values():
                if entry.get("lstrip") or entry.get("rstrip"):
                    options.setdefault("strip", {})[entry["content"]] = (entry.get("lstrip", False),
                                                                         entry.get("rstrip", False))
            if options.get("model_max_length", 0) > 1e12:  # transformers' "no limit" sentinel
                options.pop("model_max_length")
        return cls(source=str(source), **{**options, **overrides})

    def save_pretrained(self, directory):
        """Write vocab.json, merges.txt and tokenizer_config.json (special tokens' strip
        flags in added_tokens_decoder, as transformers writes them)."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.vocab, directory / "vocab.json")
        merges = sorted(self.ranks, key=self.ranks.__getitem__)
        write_text_atomic("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), directory / "merges.txt")
        decoder = {str(self.vocab[t]): {"content": t, "lstrip": self.strip.get(t, (False, False))[0],
                                        "rstrip": self.strip.get(t, (False, False))[1], "normalized": False,
                                        "single_word": False, "special": True} for t in self.all_special_tokens}
        write_json_atomic({**self.init_kwargs, "added_tokens_decoder": decoder}, directory / "tokenizer_config.json")
        if self.template is not None:  # only tokenizer.json holds a template
            write_json_atomic(self._tokenizer_json(merges), directory / "tokenizer.json")

    def _tokenizer_json(self, merges):
        """tokenizer.json's content: this BPE on bytes with its template (trim_offsets off, as
        a template leaves offsets)."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": self.add_prefix_space, "trim_offsets": True,
                      "use_regex": True}
        added = [{"id": self.vocab[t], "content": t, "single_word": False, "lstrip": self.strip.get(t, (False,))[0],
                  "rstrip": self.strip.get(t, (False, False))[1], "normalized": False, "special": True}
                 for t in self.all_special_tokens]
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                "pre_tokenizer": byte_level, "post_processor": self.template, "decoder": byte_level,
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                          "ignore_merges": False, "vocab": self.vocab, "merges": [f"{a} {b}" for a, b in merges]}}

    def special_layout(self):
        """The template's, else <s> A </s> and <s> A </s></s> B </s>: the ids before and after each text."""
        return self.layout or ([self.cls_token_id], [self.sep_token_id], [self.sep_token_id], [self.sep_token_id])

    # --- text to tokens ---------------------------------------------------------------------
    def merge(self, symbols):
        """Apply the merges to a list of symbols: repeatedly join the adjacent pair of lowest
        rank (the leftmost of equals), until no pair has a rank."""
        rank, unranked = self.ranks.get, len(self.ranks)
        while len(symbols) > 1:
            ranks = [rank(pair, unranked) for pair in zip(symbols, symbols[1:])]
            best = min(ranks)
            if best == unranked:
                break
            i = ranks.index(best)
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols

    def token_ids(self, piece):
        """The ids of one pre-token: its bytes as characters, merged."""
        symbols = self.merge([self.byte_encoder[b] for b in piece.encode("utf-8")])
        return tuple(self.vocab.get(s, self.unk_token_id) for s in symbols)

    def _prefixed(self, text):
        return " " + text if self.add_prefix_space and not text.startswith(" ") else text

    def _fast_words(self, text):
        """Text without special tokens: its pre-tokens (by the ASCII pattern when it can)."""
        if self._may_hold_special_tokens(text):
            return None
        return (self._ascii_pattern if text.isascii() else self._pattern).findall(self._prefixed(text))

    def _words(self, segment):
        return self._pattern.findall(self._prefixed(segment))

    def _sequence(self, text, word_index=None):
        """Ids, offsets and word indices of one text (or of one pre-split word, whose tokens
        all get `word_index`): one word per pre-token and per special token."""
        ids, offsets, words = [], [], []
        index = -1
        for segment, start, special in self._segments(text):
            if special is not None:  # with the whitespace it took, which trimming removes
                index += 1
                ids.append(special)
                offsets.append(self._trimmed(segment, (start, start + len(segment)), len(ids) == 1 or start == 0))
                words.append(index if word_index is None else word_index)
                continue
            prefixed = self._prefixed(segment)
            added = len(prefixed) - len(segment)  # a prefix space is aligned with the character after it
            for match in self._pattern.finditer(prefixed):
                index += 1
                spans = []  # per byte: the character span it came from
                for position, char in enumerate(match.group(), start + match.start() - added):
                    position = max(position, start)
                    spans.extend([(position, position + 1)] * len(char.encode("utf-8")))
                byte = 0
                for token_id in self._cache[match.group()]:
                    token = self.ids_to_tokens[token_id]
                    first, last = spans[byte], spans[byte + len(token) - 1]
                    byte += len(token)
                    ids.append(token_id)
                    offsets.append(self._trimmed(token, (first[0], last[1]), len(ids) == 1 or first[0] == 0))
                    words.append(index if word_index is None else word_index)
        return EncodedText(ids, offsets, words)

    def _trimmed(self, token, offsets, is_first):
        """Offsets without the spaces the token starts or ends with (except the first token's
        single prefix space when add_prefix_space put it there), as trim_offsets does. A
        space is "Ġ" in a BPE token, or whitespace taken by a special token."""
        if not self.trim_offsets:
            return offsets
        spaces = self._spaces
        leading = len(token) - len(token.lstrip(spaces))
        trailing = len(token) - len(token.rstrip(spaces))
        start, end = offsets
        if leading and not (is_first and self.add_prefix_space and leading == 1):
            start = min(start + leading, end)
        if trailing and end >= trailing:
            end = max(end - trailing, start)
        return start, end

    # --- decoding ---------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens=False):
        """Tokens joined, their characters turned back into bytes, decoded as UTF-8 (invalid
        sequences as U+FFFD)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        special = set(self.all_special_ids)
        out, pending = [], []
        for i in ids:
            if i in special:
                if not skip_special_tokens:
                    out.append(bytes(pending).decode("utf-8", "replace") + self.ids_to_tokens[i])
                    pending = []
                continue
            pending.extend(self.byte_decoder[c] for c in self.ids_to_tokens[i])
        return "".join(out) + bytes(pending).decode("utf-8", "replace")


def _read_json(path):
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFile(f"{path} does not exist: byte-level BPE needs it next to vocab.json") from None
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc})") from None


def load_merges(path):
    """[(left, right)] from merges.txt, one pair per line, highest priority first."""
    try:
        lines = pathlib.Path(path).read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise MissingFile(f"{path} does not exist: byte-level BPE needs merges.txt next to vocab.json") from None
    merges = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        pair = line.rstrip("\r").split(" ")
        if len(pair) != 2:
            raise ModelFileError(f"{path}: line {number} is {line!r}, not two tokens separated by one space")
        merges.append(tuple(pair))
    return merges


def load_bpe_json(path):
    """Constructor options from transformers' fast-tokenizer file, tokenizer.json, when its
    model is BPE on bytes (a ByteLevel pre-tokenizer)."""
    spec = _read_json(path)
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise ModelFileError(f"{path}: field 'model.type' is {kind!r}; minisft reads byte-level 'BPE' tokenizers "
                         "here (and WordPiece ones for BERT-like models)")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("use_regex", True) is not True:
        raise ModelFileError(f"{path}: field 'pre_tokenizer' is {pre.get('type')!r}; minisft's BPE reads the "
                         "ByteLevel pre-tokenizer (with its regex) only")
    if spec.get("normalizer") is not None:
        raise ModelFileError(f"{path}: field 'normalizer' is {spec['normalizer'].get('type')!r}; minisft's byte-level "
                         "BPE reads tokenizers without a normalizer")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    post = spec.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":  # offsets are trimmed by ByteLevel or RobertaProcessing only
        return {"vocab": model["vocab"], "merges": merges, "add_prefix_space": pre.get("add_prefix_space", False),
                "trim_offsets": False, "strip": _strip(spec), "template": post}
    return {"vocab": model["vocab"], "merges": merges, "add_prefix_space": pre.get("add_prefix_space", False),
            "trim_offsets": post.get("trim_offsets", pre.get("trim_offsets", True)), "strip": _strip(spec)}


def _strip(spec):
    """{token: (lstrip, rstrip)} of tokenizer.json's added tokens that take whitespace."""
    return {t["content"]: (t.get("lstrip", False), t.get("rstrip", False))
            for t in spec.get("added_tokens", []) if t.get("lstrip") or t.get("rstrip")}
