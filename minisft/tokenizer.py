"""BERT's WordPiece tokenizer, computing exactly what transformers' BertTokenizer computes.

text -> special tokens split out -> BasicTokenizer (clean control characters, split CJK
characters, strip accents and lowercase as configured, split on whitespace and punctuation)
-> WordpieceTokenizer (greedy longest match from a vocabulary, "##" for continuations)
-> ids, with [CLS]/[SEP], token_type_ids, truncation, padding and character offsets.

Speed comes from caching: each distinct word is normalised and split into pieces once,
and plain-ASCII text is split by one regular expression instead of character by character.
"""
import functools
import itertools
import json
import pathlib
import re

import numpy

from minisft import unicode
from minisft.checkpoint import write_json_atomic, write_text_atomic

SPECIAL_TOKENS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ASCII_WORDS = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","))


class BasicTokenizer:
    """Cleans, normalises and splits text into words and punctuation marks."""

    def __init__(self, do_lower_case=True, never_split=None, tokenize_chinese_chars=True,
                 strip_accents=None):
        self.do_lower_case = do_lower_case
        self.never_split = set(never_split or ())
        self.tokenize_chinese_chars = tokenize_chinese_chars
        # Accents are stripped when lowercasing unless strip_accents says otherwise.
        self.strip_accents = do_lower_case if strip_accents is None else strip_accents

    def words(self, text, offset=0):
        """[(word, start, end, origins)]: each normalised word with its span in `text`
        (shifted by `offset`); origins maps each of its characters to a position in text,
        or is None when characters map one to one."""
        if text.isascii() and not _ASCII_CONTROL.search(text):
            lower = self.do_lower_case
            return [(m.group().lower() if lower else m.group(), m.start() + offset, m.end() + offset, None)
                    for m in _ASCII_WORDS.finditer(text)]
        return self._words_general(text, offset)

    def _normalized(self, text, offset):
        """(characters, origins): `text` as BERT's normalizer leaves it (clean_text, spaces
        around CJK ideographs, strip_accents, lowercase), each character with the position
        in `text` (plus `offset`) it came from."""
        chars, origins = [], []
        for position, char in enumerate(text, offset):
            kind = unicode.bert_clean_kind(char)
            if kind == "drop":
                continue
            if kind == "space":
                char = " "
            elif self.tokenize_chinese_chars and unicode.is_chinese(char):
                chars.extend((" ", char, " "))
                origins.extend((position,) * 3)
                continue
            chars.append(char)
            origins.append(position)
        if self.strip_accents:
            chars, origins = unicode.strip_accents(chars, origins)
        if self.do_lower_case:
            lowered = [unicode.lowercase(c) for c in chars]
            origins = [o for o, c in zip(origins, lowered) for _ in c]
            chars = [c for piece in lowered for c in piece]
        return chars, origins

    def _words_general(self, text, offset):
        words, word, places = [], [], []

        def flush():
            if word:
                words.append(("".join(word), places[0], places[-1] + 1, list(places)))
                word.clear()
                places.clear()

        for char, origin in zip(*self._normalized(text, offset)):
            kind = unicode.bert_kind(char)
            if kind == "word":
                word.append(char)
                places.append(origin)
                continue
            flush()
            if kind == "punct":
                words.append((char, origin, origin + 1, [origin]))
        flush()
        return words

    def tokenize(self, text):
        """Words and punctuation marks of `text`; never_split tokens pass whole."""
        out = []
        for part in text.split():
            out.extend([part] if part in self.never_split else [w for w, *_ in self.words(part)])
        return out


class WordpieceTokenizer:
    """Greedy longest-match-first split of one word into vocabulary pieces."""

    def __init__(self, vocab, unk_token="[UNK]", max_input_chars_per_word=100):
        self.vocab = vocab
        self.unk_token = unk_token
        self.max_input_chars_per_word = max_input_chars_per_word

    def split(self, word):
        """[(piece, start, end)] with character spans in `word`; [UNK] spans the whole word."""
        if len(word) > self.max_input_chars_per_word:
            return [(self.unk_token, 0, len(word))]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            else:
                return [(self.unk_token, 0, len(word))]
            pieces.append((piece, start, end))
            start = end
        return pieces

    def tokenize(self, word):
        return [piece for piece, _, _ in self.split(word)]


class BatchEncoding(dict):
    """input_ids, token_type_ids, attention_mask (and offset_mapping) with per-example
    word and sequence indices, as transformers returns them. The indices are computed on
    first request (`details(i)` -> (offsets, word ids, sequence ids)), keeping the
    common path, ids only, fast."""

    def __init__(self, data, details):
        super().__init__(data)
        self._details = details
        self._cache = {}

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _row(self, batch_index):
        if batch_index not in self._cache:
            self._cache[batch_index] = self._details(batch_index)
        return self._cache[batch_index]

    def word_ids(self, batch_index=0):
        """Per token: the index of the word it came from, None for special and padding."""
        return self._row(batch_index)[1]

    def sequence_ids(self, batch_index=0):
        """Per token: 0 for the first text, 1 for the pair, None for special and padding."""
        return self._row(batch_index)[2]


class _Sequence:
    """One tokenised text: ids and, when asked for, char offsets and word indices."""
    __slots__ = ("ids", "offsets", "words")

    def __init__(self, ids, offsets=None, words=None):
        self.ids, self.offsets, self.words = ids, offsets, words

    def __len__(self):
        return len(self.ids)

    def truncate(self, length):
        self.ids = self.ids[:length]
        if self.offsets is not None:
            self.offsets, self.words = self.offsets[:length], self.words[:length]


class _PieceCache(dict):
    """word -> tuple of WordPiece ids, filled on first lookup."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def __missing__(self, word):
        ids = tuple(self.tokenizer.vocab[p] for p, _, _ in self.tokenizer.wordpiece_tokenizer.split(word))
        if len(self) < 1_000_000:
            self[word] = ids
        return ids


class BertTokenizer:
    """Text to BERT inputs, reading vocab.txt and tokenizer_config.json."""

    def __init__(self, vocab, do_lower_case=True, tokenize_chinese_chars=True, strip_accents=None,
                 model_max_length=512, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                 cls_token="[CLS]", mask_token="[MASK]", source="vocab"):
        self.vocab = vocab
        self.ids_to_tokens = {i: t for t, i in vocab.items()}
        self.model_max_length = model_max_length
        self.unk_token, self.sep_token, self.pad_token = unk_token, sep_token, pad_token
        self.cls_token, self.mask_token = cls_token, mask_token
        specials = [unk_token, sep_token, pad_token, cls_token, mask_token]
        missing = [t for t in specials if t not in vocab]
        if missing:
            raise ValueError(f"{source}: special tokens {', '.join(missing)} are not in the vocabulary")
        self.all_special_tokens = specials
        self.all_special_ids = [vocab[t] for t in specials]
        self.unk_token_id, self.sep_token_id, self.pad_token_id, self.cls_token_id, self.mask_token_id = \
            self.all_special_ids
        self._special_split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
        self.basic_tokenizer = BasicTokenizer(do_lower_case, specials, tokenize_chinese_chars, strip_accents)
        self.wordpiece_tokenizer = WordpieceTokenizer(vocab, unk_token)
        self._pieces = _PieceCache(self)
        self.init_kwargs = {"do_lower_case": do_lower_case, "tokenize_chinese_chars": tokenize_chinese_chars,
                            "strip_accents": strip_accents, "model_max_length": model_max_length,
                            "unk_token": unk_token, "sep_token": sep_token, "pad_token": pad_token,
                            "cls_token": cls_token, "mask_token": mask_token}

    # --- loading and saving ---------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory, **overrides):
        directory = pathlib.Path(directory)
        vocab_file = directory / "vocab.txt"
        if vocab_file.is_file():
            vocab, options = load_vocab(vocab_file), {}
        elif (directory / "tokenizer.json").is_file():
            vocab_file = directory / "tokenizer.json"
            vocab, options = load_wordpiece_json(vocab_file)
        else:
            raise FileNotFoundError(f"{vocab_file} does not exist (nor tokenizer.json): a tokenizer needs "
                                    "vocab.txt, one token per line (run `minisft fetch NAME`)")
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{config_file}: not valid JSON ({exc})") from None
            keys = ("do_lower_case", "tokenize_chinese_chars", "strip_accents", "model_max_length",
                    *SPECIAL_TOKENS)
            options.update({k: _token_content(config[k]) for k in keys if config.get(k) is not None})
            if options.get("model_max_length", 0) > 1e12:  # transformers' "no limit" sentinel
                options.pop("model_max_length")
        return cls(vocab, source=str(vocab_file), **{**options, **overrides})

    def save_pretrained(self, directory):
        """Write vocab.txt and tokenizer_config.json."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tokens = [self.ids_to_tokens[i] for i in range(len(self.ids_to_tokens))]
        write_text_atomic("\n".join(tokens) + "\n", directory / "vocab.txt")
        write_json_atomic({**self.init_kwargs, "tokenizer_class": "BertTokenizer"},
                          directory / "tokenizer_config.json")

    def __len__(self):
        return len(self.vocab)

    # --- text to pieces -------------------------------------------------------------------
    def _segments(self, text):
        """Split out special tokens: [(segment, start, is_special)]."""
        if "[" not in text:
            return [(text, 0, False)]
        out, position = [], 0
        for i, part in enumerate(self._special_split.split(text)):
            if part:
                out.append((part, position, i % 2 == 1))
            position += len(part)
        return out

    def _ids(self, text):
        """Token ids of one text, the fast path: words looked up in the piece cache."""
        basic = self.basic_tokenizer
        if "[" not in text and text.isascii() and not _ASCII_CONTROL.search(text):
            words = _ASCII_WORDS.findall(text.lower() if basic.do_lower_case else text)
            return list(itertools.chain.from_iterable(map(self._pieces.__getitem__, words)))
        ids = []
        for segment, _, special in self._segments(text):
            if special:
                ids.append(self.vocab[segment])
            else:
                for word, *_ in basic.words(segment):
                    ids.extend(self._pieces[word])
        return ids

    def _sequence(self, text, word_index=None):
        """Ids, offsets and word indices of one text (or of one pre-split word, whose
        tokens all get `word_index`)."""
        ids, offsets, words = [], [], []
        index = -1
        for segment, start, special in self._segments(text):
            if special:
                index += 1
                ids.append(self.vocab[segment])
                offsets.append((start, start + len(segment)))
                words.append(index if word_index is None else word_index)
                continue
            for word, begin, end, origins in self.basic_tokenizer.words(segment, start):
                index += 1
                pieces = self.wordpiece_tokenizer.split(word)
                piece_ids = [self.vocab[piece] for piece, _, _ in pieces]
                ids.extend(piece_ids)
                for _, s, e in pieces:
                    if piece_ids == [self.unk_token_id]:
                        offsets.append((begin, end))
                    elif origins is None:
                        offsets.append((begin + s, begin + e))
                    else:
                        offsets.append((origins[s], origins[e - 1] + 1))
                words.extend([index if word_index is None else word_index] * len(piece_ids))
        return _Sequence(ids, offsets, words)

    def _encode_text(self, text, is_split_into_words, detailed):
        if not is_split_into_words:
            if not isinstance(text, str):
                raise TypeError(f"text must be a string, not {type(text).__name__} "
                                "(pass is_split_into_words=True for a list of words)")
            return self._sequence(text) if detailed else _Sequence(self._ids(text))
        parts = [self._sequence(word, word_index=i) for i, word in enumerate(text)]
        return _Sequence([t for p in parts for t in p.ids], [o for p in parts for o in p.offsets],
                         [w for p in parts for w in p.words])

    def tokenize(self, text):
        """The WordPiece tokens of `text`, without special tokens."""
        return [self.ids_to_tokens[i] for i in self._ids(text)]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.vocab.get(tokens, self.unk_token_id)
        return [self.vocab.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, (int, numpy.integer)):
            return self.ids_to_tokens[int(ids)]
        return [self.ids_to_tokens[int(i)] for i in ids]

    # --- encoding ---------------------------------------------------------------------------
    def encode(self, text, text_pair=None, add_special_tokens=True, truncation=False, max_length=None):
        """Token ids of one text (or pair), with [CLS]/[SEP] by default."""
        return self(text, text_pair, add_special_tokens=add_special_tokens, truncation=truncation,
                    max_length=max_length, return_tensors=None)["input_ids"][0]

    def __call__(self, text, text_pair=None, add_special_tokens=True, padding=False, truncation=False,
                 max_length=None, is_split_into_words=False, return_offsets_mapping=False,
                 return_tensors="np"):
        """Encode a text, a pair, or a batch of them.

        padding: False, True/"longest" or "max_length". truncation: False, True/"longest_first",
        "only_first" or "only_second", to max_length (default model_max_length) tokens in
        all. return_tensors="np" gives (batch, length) int64 arrays (padding needed when
        lengths differ); None gives lists.
        """
        single = isinstance(text, str) or (is_split_into_words and text and isinstance(text[0], str))
        texts = [text] if single else list(text)
        if text_pair is None or (single and text_pair == ""):  # as transformers: an empty pair is none
            pairs = [None] * len(texts)
        else:
            pairs = [text_pair] if single else list(text_pair)
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(pairs)} text pairs")
        padding = {True: "longest", False: None, "do_not_pad": None}.get(padding, padding)
        truncation = {True: "longest_first", False: None, "do_not_truncate": None}.get(truncation, truncation)
        if padding not in (None, "longest", "max_length"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', not {padding!r}")
        if truncation not in (None, "longest_first", "only_first", "only_second"):
            raise ValueError(f"truncation must be True, False, 'longest_first', 'only_first' or "
                             f"'only_second', not {truncation!r}")
        if max_length is None and (truncation or padding == "max_length"):
            max_length = self.model_max_length
        options = (add_special_tokens, truncation, max_length, is_split_into_words)
        rows = [self._encode_row(t, p, *options, detailed=False) for t, p in zip(texts, pairs)]
        lengths = [len(ids) for ids, _ in rows]
        target = max(lengths, default=0) if padding == "longest" else max_length if padding else None

        def details(i):
            """(offsets, word ids, sequence ids) of row i, padded like its ids."""
            ids, types, offsets, words, sequence = self._encode_row(texts[i], pairs[i], *options, detailed=True)
            pad = max(0, target - len(ids)) if target is not None else 0
            return offsets + [(0, 0)] * pad, words + [None] * pad, sequence + [None] * pad

        columns = _collate(rows, lengths, target, self.pad_token_id, return_tensors)
        if return_offsets_mapping:
            offsets = [details(i)[0] for i in range(len(rows))]
            columns["offset_mapping"] = (offsets if return_tensors is None
                                         else numpy.array(offsets, dtype=numpy.int64).reshape(len(rows), -1, 2))
        return BatchEncoding(columns, details)

    def _encode_row(self, text, pair, add_special_tokens, truncation, max_length, is_split_into_words,
                    detailed):
        """(ids, start of the pair's type-1 tokens) or, detailed, also offsets, word and
        sequence indices."""
        first = self._encode_text(text, is_split_into_words, detailed)
        second = None if pair is None else self._encode_text(pair, is_split_into_words, detailed)
        if truncation:
            specials = (3 if second is not None else 2) if add_special_tokens else 0
            _truncate(first, second, max_length - specials, truncation)
        cls, sep = ([self.cls_token_id], [self.sep_token_id]) if add_special_tokens else ([], [])
        ids = cls + first.ids + sep
        type_start = len(ids)
        if second is not None:
            ids += second.ids + sep
        if not detailed:
            return ids, type_start
        edge = [None] if add_special_tokens else []
        offsets = [(0, 0)] * len(cls) + first.offsets + [(0, 0)] * len(sep)
        words = edge + first.words + edge
        sequence = edge + [0] * len(first) + edge
        if second is not None:
            offsets += second.offsets + [(0, 0)] * len(sep)
            words += second.words + edge
            sequence += [1] * len(second) + edge
        return ids, [0] * type_start + [1] * (len(ids) - type_start), offsets, words, sequence

    # --- decoding ---------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens=False):
        """Tokens joined with spaces, "##" continuations glued, spaces before . ? ! , removed."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        special = set(self.all_special_ids) if skip_special_tokens else ()
        text = " ".join(self.ids_to_tokens[i] for i in ids if i not in special).replace(" ##", "")
        for dirty, clean in _CLEANUP:
            text = text.replace(dirty, clean)
        return text

    def batch_decode(self, sequences, skip_special_tokens=False):
        return [self.decode(ids, skip_special_tokens) for ids in sequences]


def _collate(rows, lengths, target, pad_id, return_tensors):
    """Pad rows of (ids, type_start) to `target` into input_ids, token_type_ids and
    attention_mask: (batch, length) int64 arrays, or lists when return_tensors is None."""
    if return_tensors is None:
        columns = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
        for (ids, type_start), length in zip(rows, lengths):
            pad = max(0, target - length) if target is not None else 0
            columns["input_ids"].append(ids + [pad_id] * pad)
            columns["token_type_ids"].append([0] * type_start + [1] * (length - type_start) + [0] * pad)
            columns["attention_mask"].append([1] * length + [0] * pad)
        return columns
    if return_tensors != "np":
        raise ValueError(f"return_tensors must be 'np' or None, not {return_tensors!r}")
    if target is None:
        if len(set(lengths)) > 1:
            raise ValueError("texts have different lengths: pass padding=True to batch them "
                             "as arrays, or return_tensors=None for lists")
        target = lengths[0] if lengths else 0
    width = max([target, *lengths])
    input_ids = numpy.full((len(rows), width), pad_id, dtype=numpy.int64)
    token_type_ids = numpy.zeros((len(rows), width), dtype=numpy.int64)
    for i, ((ids, type_start), length) in enumerate(zip(rows, lengths)):
        input_ids[i, :length] = ids
        if type_start < length:
            token_type_ids[i, type_start:length] = 1
    positions = numpy.arange(width)
    attention_mask = (positions < numpy.array(lengths, dtype=numpy.int64)[:, None]).astype(numpy.int64)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


def _truncate(first, second, budget, strategy):
    """Shorten the sequences in place so that together they hold at most `budget` tokens."""
    if budget < 0:
        raise ValueError("max_length is too short to hold the special tokens")
    total = len(first) + (len(second) if second is not None else 0)
    if total <= budget:
        return
    if second is None or strategy == "only_first":
        keep = budget - (len(second) if second is not None else 0)
        if keep <= 0:
            raise ValueError(f"truncation='only_first': the pair alone has {len(second)} tokens, "
                             f"more than max_length allows")
        first.truncate(keep)
    elif strategy == "only_second":
        keep = budget - len(first)
        if keep <= 0:
            raise ValueError(f"truncation='only_second': the first text alone has {len(first)} "
                             f"tokens, more than max_length allows")
        second.truncate(keep)
    else:  # longest_first: take tokens from the longer one until they fit
        n1, n2 = len(first), len(second)
        half = budget // 2
        if n1 <= half:
            n2 = budget - n1
        elif n2 <= half:
            n1 = budget - n2
        else:
            n1, n2 = (budget - half, half) if n1 > n2 else (half, budget - half)
        first.truncate(n1)
        second.truncate(n2)


def _token_content(value):
    """tokenizer_config.json may hold a special token as {"content": ...}."""
    return value["content"] if isinstance(value, dict) and "content" in value else value


def load_wordpiece_json(path):
    """({token: id}, tokenizer options) from transformers' fast-tokenizer file, tokenizer.json,
    when its model is WordPiece (normalised as BERT's: BertNormalizer)."""
    try:
        spec = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        model = spec["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a tokenizer.json ({exc}); save the tokenizer again") from None
    if model.get("type") != "WordPiece" or model.get("continuing_subword_prefix", "##") != "##":
        raise ValueError(f"{path}: field 'model.type' is {model.get('type')!r}; minisft reads WordPiece "
                         "tokenizers (with the '##' prefix) here: give vocab.txt, or a WordPiece tokenizer.json")
    options = {"unk_token": model.get("unk_token", "[UNK]")}
    normalizer = spec.get("normalizer") or {}
    if normalizer.get("type") == "BertNormalizer":
        options.update(do_lower_case=normalizer.get("lowercase", True), strip_accents=normalizer.get("strip_accents"),
                       tokenize_chinese_chars=normalizer.get("handle_chinese_chars", True))
    return dict(sorted(model["vocab"].items(), key=lambda item: item[1])), options


def load_vocab(path):
    """{token: id} from vocab.txt, one token per line, id = line number."""
    with open(path, encoding="utf-8") as f:
        tokens = f.read().split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    return {token.rstrip("\r"): i for i, token in enumerate(tokens)}
