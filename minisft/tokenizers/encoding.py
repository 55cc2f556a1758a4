"""What every tokenizer shares once a text is split into tokens: special tokens found in the
text, the special-token layout of one text or a pair, truncation, padding, arrays, character
offsets and word indices (BatchEncoding), as transformers' tokenizers return them.

A tokenizer subclasses Tokenizer and gives `_ids(text)` (the fast path: ids only),
`_sequence(text, word_index)` (ids with offsets and word indices), `special_layout()` and
`decode`.
"""
import functools
import itertools
import re

import numpy

from minisft.engine.errors import ModelFileError
from minisft.tokenizers import unicode


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

    def offsets(self, batch_index=0):
        """Per token: its (start, end) characters in its text, (0, 0) for special and padding."""
        return self._row(batch_index)[0]

    def word_ids(self, batch_index=0):
        """Per token: the index of the word it came from, None for special and padding."""
        return self._row(batch_index)[1]

    def sequence_ids(self, batch_index=0):
        """Per token: 0 for the first text, 1 for the pair, None for special and padding."""
        return self._row(batch_index)[2]


class EncodedText:
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

    def window(self, start, stop):
        """Tokens [start, stop) as an EncodedText of their own."""
        if self.offsets is None:
            return EncodedText(self.ids[start:stop])
        return EncodedText(self.ids[start:stop], self.offsets[start:stop], self.words[start:stop])

    def windows(self, length, stride):
        """Windows of `length` tokens from the start, each `stride` tokens into the one before
        it, until one reaches the end (as transformers' tokenizers cut overflowing tokens)."""
        if stride >= length:
            raise ValueError(f"stride {stride} must be less than the {length} tokens a window holds")
        windows = []
        for start in range(0, max(len(self), 1), length - stride):
            windows.append(self.window(start, start + length))
            if start + length >= len(self):
                break
        return windows


class WordCache(dict):
    """word -> tuple of token ids, computed by `tokenize_word` on first lookup (up to
    `limit` words are kept)."""

    def __init__(self, tokenize_word, limit=1_000_000):
        super().__init__()
        self.tokenize_word, self.limit = tokenize_word, limit

    def __missing__(self, word):
        ids = self.tokenize_word(word)
        if len(self) < self.limit:
            self[word] = ids
        return ids


class Tokenizer:
    """Encoding shared by every tokenizer. Subclasses set `vocab` ({token: id}),
    `model_max_length`, call `_init_special_tokens`, and give `_ids`, `_sequence`,
    `special_layout` and `decode`."""
    pair_type_id = 1  # token type of the second text (0 where a model has one token type)

    def _init_special_tokens(self, roles, source, strip=None, extra=()):
        """roles: {"unk_token": "[UNK]", ...}, each set as an attribute with its `..._id`;
        strip: {token: (lstrip, rstrip)} for tokens that take the whitespace beside them;
        extra: special tokens without a role (split out of text, skipped in decoding alike)."""
        missing = [t for t in [*roles.values(), *extra] if t not in self.vocab]
        if missing:
            raise ModelFileError(f"{source}: special tokens {', '.join(missing)} are not in the vocabulary")
        for role, token in roles.items():
            setattr(self, role, token)
            setattr(self, role + "_id", self.vocab[token])
        self.all_special_tokens = list(dict.fromkeys([*roles.values(), *extra]))
        self.all_special_ids = [self.vocab[t] for t in self.all_special_tokens]
        strip = strip or {}
        ordered = sorted(self.all_special_tokens, key=len, reverse=True)  # longest first
        self._special_contents = ordered
        space = f"[{re.escape(unicode.whitespace())}]*"  # Unicode White_Space, as the reference strips
        self._special_pattern = re.compile("|".join(
            (space if strip.get(t, (False, False))[0] else "") + f"({re.escape(t)})"
            + (space if strip.get(t, (False, False))[1] else "") for t in ordered))
        self._special_first_chars = {t[0] for t in ordered}

    def __len__(self):
        return len(self.vocab)

    def _ids(self, text):
        """Token ids of one text, the fast path: each word's ids looked up in the word cache.
        Subclasses give `_fast_words(text)` (the words when no special token can be in the
        text, else None) and `_words(segment)`."""
        words = self._fast_words(text)
        if words is not None:
            return list(itertools.chain.from_iterable(map(self._cache.__getitem__, words)))
        ids = []
        for segment, _, special in self._segments(text):
            if special is not None:
                ids.append(special)
            else:
                for word in self._words(segment):
                    ids.extend(self._cache[word])
        return ids

    @staticmethod
    def _special_span(segment, start):
        """A special token's offsets, without the whitespace it took (lstrip, rstrip)."""
        spaces = unicode.whitespace()
        lead = len(segment) - len(segment.lstrip(spaces))
        return start + lead, start + len(segment.rstrip(spaces))

    def _may_hold_special_tokens(self, text):
        return any(c in text for c in self._special_first_chars)

    def _segments(self, text):
        """Split out special tokens: [(segment, start, special token id or None)]."""
        if not self._may_hold_special_tokens(text):
            return [(text, 0, None)]
        out, position = [], 0
        for match in self._special_pattern.finditer(text):
            if match.start() > position:
                out.append((text[position:match.start()], position, None))
            out.append((match.group(), match.start(), self.vocab[self._special_contents[match.lastindex - 1]]))
            position = match.end()
        if position < len(text):
            out.append((text[position:], position, None))
        return out

    def _encode_text(self, text, is_split_into_words, detailed):
        if not is_split_into_words:
            if not isinstance(text, str):
                raise TypeError(f"text must be a string, not {type(text).__name__} "
                                "(pass is_split_into_words=True for a list of words)")
            return self._sequence(text) if detailed else EncodedText(self._ids(text))
        parts = [self._sequence(word, word_index=i) for i, word in enumerate(text)]
        return EncodedText([t for p in parts for t in p.ids], [o for p in parts for o in p.offsets],
                         [w for p in parts for w in p.words])

    def tokenize(self, text):
        """The tokens of `text`, without special tokens."""
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
                 return_tensors="np", stride=0, return_overflowing_tokens=False):
        """Encode a text, a pair, or a batch of them.

        padding: False, True/"longest" or "max_length". truncation: False, True/"longest_first",
        "only_first" or "only_second", to max_length (default model_max_length) tokens in
        all. return_tensors="np" gives (batch, length) int64 arrays (padding needed when
        lengths differ); None gives lists. return_overflowing_tokens: the tokens truncation
        would drop become more rows, windows of the truncated text that overlap the one
        before by `stride` tokens (only_second for pairs: a question beside each window of
        its context); "overflow_to_sample_mapping" gives each row's input.
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
        options = (add_special_tokens, truncation, max_length, is_split_into_words,
                   stride if return_overflowing_tokens else None)
        rows, samples = [], []  # rows of (ids, type_start); the input of each
        for index, (t, p) in enumerate(zip(texts, pairs)):
            windows = self._encode_rows(t, p, *options, detailed=False)
            rows += windows
            samples += [(index, window) for window in range(len(windows))]
        lengths = [len(ids) for ids, _ in rows]
        target = max(lengths, default=0) if padding == "longest" else max_length if padding else None

        @functools.lru_cache(maxsize=1)  # rows are asked for in order: an input's windows come together
        def detailed_rows(index):
            return self._encode_rows(texts[index], pairs[index], *options, detailed=True)

        def details(i):
            """(offsets, word ids, sequence ids) of row i, padded like its ids."""
            index, window = samples[i]
            ids, types, offsets, words, sequence = detailed_rows(index)[window]
            pad = max(0, target - len(ids)) if target is not None else 0
            return offsets + [(0, 0)] * pad, words + [None] * pad, sequence + [None] * pad

        encoding = BatchEncoding(_collate(rows, lengths, target, self.pad_token_id, return_tensors), details)
        if return_offsets_mapping:
            offsets = [encoding.offsets(i) for i in range(len(rows))]
            encoding["offset_mapping"] = (offsets if return_tensors is None
                                          else numpy.array(offsets, dtype=numpy.int64).reshape(len(rows), -1, 2))
        if return_overflowing_tokens:
            mapping = [index for index, _ in samples]
            encoding["overflow_to_sample_mapping"] = mapping if return_tensors is None else numpy.array(mapping)
        return encoding

    def _encode_rows(self, text, pair, add_special_tokens, truncation, max_length, is_split_into_words,
                     stride, detailed):
        """The rows of a text or pair: one, or with a stride (return_overflowing_tokens) one
        per window of the truncated text; each (ids, start of the pair's type-1 tokens) or,
        detailed, also offsets, word and sequence indices."""
        first = self._encode_text(text, is_split_into_words, detailed)
        second = None if pair is None else self._encode_text(pair, is_split_into_words, detailed)
        layout = self.special_layout() if add_special_tokens else ([], [], [], [])
        if not truncation:
            return [self._row(first, second, layout, detailed)]
        specials = sum(map(len, layout)) if second is not None else len(layout[0]) + len(layout[1])
        if stride is None:
            _truncate(first, second, max_length - specials, truncation)
            return [self._row(first, second, layout, detailed)]
        if second is not None and truncation != "only_second":
            raise ValueError(f"return_overflowing_tokens with a text pair needs truncation='only_second', "
                             f"not {truncation!r}")
        budget = max_length - specials - (len(first) if second is not None else 0)
        if budget <= 0:
            raise ValueError(f"the first text alone has {len(first)} tokens, more than max_length "
                             f"{max_length} allows beside its pair")
        if second is None:
            return [self._row(window, None, layout, detailed) for window in first.windows(budget, stride)]
        return [self._row(first, window, layout, detailed) for window in second.windows(budget, stride)]

    def _row(self, first, second, layout, detailed):
        before_first, after_first, before_second, after_second = layout
        ids = before_first + first.ids + after_first
        type_start = len(ids)
        if second is not None:
            ids += before_second + second.ids + after_second
        if not self.pair_type_id:
            type_start = len(ids)
        if not detailed:
            return ids, type_start
        offsets, words, sequence = [], [], []
        parts = [(before_first, first, 0, after_first)]
        if second is not None:
            parts.append((before_second, second, 1, after_second))
        for before, encoded, index, after in parts:
            offsets += [(0, 0)] * len(before) + encoded.offsets + [(0, 0)] * len(after)
            words += [None] * len(before) + encoded.words + [None] * len(after)
            sequence += [None] * len(before) + [index] * len(encoded) + [None] * len(after)
        return ids, [0] * type_start + [1] * (len(ids) - type_start), offsets, words, sequence

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


def template_layout(spec, vocab, source):
    """((before A, after A, before B, after B) special ids, B's token type) of tokenizer.json's
    TemplateProcessing post-processor; its single template's A is its pair's."""
    if not spec or spec.get("type") != "TemplateProcessing":
        kind = spec.get("type") if spec else None
        raise ModelFileError(f"{source}: field 'post_processor' is {kind!r}; minisft reads TemplateProcessing")

    def parts(template):
        """The special ids around each sequence, and each sequence's type id."""
        runs, types = [[]], {}
        for item in template:
            (kind, value), = item.items()
            if kind == "Sequence":
                types[value["id"]] = value.get("type_id", 0)
                runs.append([])
            else:
                runs[-1].append(vocab[value["id"]])
        return runs, types
    (_, after_single), _ = parts(spec["single"])
    (before_a, middle, after_b), types = parts(spec["pair"])
    after_a = middle[:len(after_single)]
    return (before_a, after_a, middle[len(after_a):], after_b), types.get("B", 0)


def token_content(value):
    """tokenizer_config.json may hold a special token as {"content": ...}."""
    return value["content"] if isinstance(value, dict) and "content" in value else value
