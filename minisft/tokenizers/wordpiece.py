"""BERT's WordPiece tokenizer, computing exactly what transformers' BertTokenizer computes.

text -> special tokens split out -> BasicTokenizer (clean control characters, split CJK
characters, strip accents and lowercase as configured, split on whitespace and punctuation)
-> WordpieceTokenizer (greedy longest match from a vocabulary, "##" for continuations)
-> ids, with [CLS]/[SEP], token_type_ids, truncation, padding and character offsets.

Speed comes from caching: each distinct word is normalised and split into pieces once,
and plain-ASCII text is split by one regular expression instead of character by character.
"""
import json
import pathlib
import re

from minisft.engine.errors import MissingFile, ModelFileError
from minisft.files.atomic import write_json_atomic, write_text_atomic
from minisft.tokenizers import unicode
from minisft.tokenizers.encoding import EncodedText, Tokenizer, WordCache, token_content

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


class BertTokenizer(Tokenizer):
    """Text to BERT inputs, reading vocab.txt and tokenizer_config.json."""

    tokenizer_class = "BertTokenizer"  # saved in tokenizer_config.json

    def __init__(self, vocab, do_lower_case=True, tokenize_chinese_chars=True, strip_accents=None,
                 model_max_length=512, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                 cls_token="[CLS]", mask_token="[MASK]", source="vocab", strip=None):
        """strip: {token: (lstrip, rstrip)} for special tokens that take the whitespace beside them."""
        self.vocab = vocab
        self.ids_to_tokens = {i: t for t, i in vocab.items()}
        self.model_max_length = model_max_length
        specials = {"unk_token": unk_token, "sep_token": sep_token, "pad_token": pad_token,
                    "cls_token": cls_token, "mask_token": mask_token}
        self._init_special_tokens(specials, source, strip)
        self.basic_tokenizer = BasicTokenizer(do_lower_case, self.all_special_tokens, tokenize_chinese_chars,
                                              strip_accents)
        self.wordpiece_tokenizer = WordpieceTokenizer(vocab, unk_token)
        self._cache = WordCache(self._word_ids)
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
            raise MissingFile(f"{vocab_file} does not exist (nor tokenizer.json): a tokenizer needs "
                                    "vocab.txt, one token per line (run `minisft fetch NAME`)")
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ModelFileError(f"{config_file}: not valid JSON ({exc})") from None
            keys = ("do_lower_case", "tokenize_chinese_chars", "strip_accents", "model_max_length",
                    *SPECIAL_TOKENS)
            options.update({k: token_content(config[k]) for k in keys if config.get(k) is not None})
            if options.get("model_max_length", 0) > 1e12:  # transformers' "no limit" sentinel
                options.pop("model_max_length")
        return cls(vocab, source=str(vocab_file), **{**options, **overrides})

    def save_pretrained(self, directory):
        """Write vocab.txt and tokenizer_config.json."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tokens = [self.ids_to_tokens[i] for i in range(len(self.ids_to_tokens))]
        write_text_atomic("\n".join(tokens) + "\n", directory / "vocab.txt")
        write_json_atomic({**self.init_kwargs, "tokenizer_class": self.tokenizer_class},
                          directory / "tokenizer_config.json")

    def _word_ids(self, word):
        return tuple(self.vocab[p] for p, _, _ in self.wordpiece_tokenizer.split(word))

    def special_layout(self):
        """[CLS] A [SEP] and [CLS] A [SEP] B [SEP]: the ids before and after each text."""
        return [self.cls_token_id], [self.sep_token_id], [], [self.sep_token_id]

    # --- text to pieces -------------------------------------------------------------------
    def _fast_words(self, text):
        """Plain ASCII without controls or special tokens: its words by one regular expression."""
        if text.isascii() and not _ASCII_CONTROL.search(text) and not self._may_hold_special_tokens(text):
            return _ASCII_WORDS.findall(text.lower() if self.basic_tokenizer.do_lower_case else text)
        return None

    def _words(self, segment):
        return [word for word, *_ in self.basic_tokenizer.words(segment)]

    def _sequence(self, text, word_index=None):
        """Ids, offsets and word indices of one text (or of one pre-split word, whose
        tokens all get `word_index`)."""
        ids, offsets, words = [], [], []
        index = -1
        for segment, start, special in self._segments(text):
            if special is not None:
                index += 1
                ids.append(special)
                offsets.append(self._special_span(segment, start))
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
        return EncodedText(ids, offsets, words)

    # --- decoding ---------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens=False):
        """Tokens joined with spaces, "##" continuations glued, spaces before . ? ! , removed."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        special = set(self.all_special_ids) if skip_special_tokens else ()
        text = " ".join(self.ids_to_tokens[i] for i in ids if i not in special).replace(" ##", "")
        for dirty, clean in _CLEANUP:
            text = text.replace(dirty, clean)
        return text

def load_wordpiece_json(path):
    """({token: id}, tokenizer options) from transformers' fast-tokenizer file, tokenizer.json,
    when its model is WordPiece (normalised as BERT's: BertNormalizer)."""
    try:
        spec = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        model = spec["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path}: not a tokenizer.json ({exc}); save the tokenizer again") from None
    if model.get("type") != "WordPiece" or model.get("continuing_subword_prefix", "##") != "##":
        raise ModelFileError(f"{path}: field 'model.type' is {model.get('type')!r}; minisft reads WordPiece "
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


class MPNetTokenizer(BertTokenizer):
    """MPNet's (all-mpnet-base-v2's): BERT's WordPiece with RoBERTa's <s> A </s></s> B </s>, one
    token type, and <mask> taking the space before it."""
    pair_type_id = 0
    tokenizer_class = "MPNetTokenizer"

    def __init__(self, vocab, unk_token="[UNK]", sep_token="</s>", pad_token="<pad>", cls_token="<s>",
                 mask_token="<mask>", **options):
        super().__init__(vocab, unk_token=unk_token, sep_token=sep_token, pad_token=pad_token, cls_token=cls_token,
                         mask_token=mask_token, strip={mask_token: (True, False)}, **options)

    def special_layout(self):
        return [self.cls_token_id], [self.sep_token_id], [self.sep_token_id], [self.sep_token_id]
