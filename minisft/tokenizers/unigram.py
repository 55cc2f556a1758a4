"""SentencePiece Unigram tokenizers (XLM-RoBERTa's), computing what transformers' tokenizer
computes, from tokenizer.json or from the SentencePiece model file alone.

text -> special tokens split out -> the normalisers (SentencePiece's charsmap, walked by
grapheme) with each character's original span kept -> words at whitespace -> Metaspace: spaces
as "▁", "▁" before each word -> each word segmented by Viterbi: the pieces of the highest total
log-probability (score), a character no piece covers as <unk> (runs of them fused into one),
or as its UTF-8 bytes <0xNN> where the model has byte fallback -> <s> A </s> (</s> B </s>).

    tokenizer = UnigramTokenizer.from_pretrained("weights/xlm-roberta-base")
"""
import json
import pathlib

from minisft.engine.errors import MissingFile, ModelFileError
from minisft.files.atomic import write_json_atomic
from minisft.tokenizers import unicode
from minisft.tokenizers.encoding import EncodedText, Tokenizer, WordCache, template_layout, token_content
from minisft.tokenizers.normalized import Normalized, normalizers
from minisft.tokenizers import spm_classes
from minisft.tokenizers.sentencepiece import read_model

DEFAULT_ROLES = spm_classes.XLMRoberta.defaults  # XLM-R's <s> <pad> </s> <unk> <mask>, where a file names none
ROLES = tuple(DEFAULT_ROLES)
UNK_PENALTY = 10.0  # an unknown character scores this far below the least likely piece
SPM_FILES = ("sentencepiece.bpe.model", "spm.model", "spiece.model")


class UnigramTokenizer(Tokenizer):
    """Text to model inputs by a Unigram model, as tokenizer.json specifies it: `spec` is
    that file's content (model, normalizer, pre_tokenizer, post_processor, added_tokens)."""

    def __init__(self, spec, model_max_length=512, tokenizer_class=None, source="tokenizer.json", **special_tokens):
        model = spec["model"]
        self.spec = spec
        self.pieces = [(piece, float(score)) for piece, score in model["vocab"]]
        self.piece_ids = {piece: i for i, (piece, _) in enumerate(self.pieces)}  # a repeated piece: its last id
        added = {t["content"]: t for t in spec.get("added_tokens", [])}
        self.vocab = {**self.piece_ids, **{t: a["id"] for t, a in added.items()}}  # added tokens' ids win
        self.ids_to_tokens = {**dict(enumerate(piece for piece, _ in self.pieces)),
                              **{a["id"]: t for t, a in added.items()}}
        self.scores = {piece: score for piece, score in self.pieces}
        self.longest = max(len(piece) for piece, _ in self.pieces)
        self.unknown_score = min(score for _, score in self.pieces) - UNK_PENALTY
        self.unk_id, self.byte_fallback = model.get("unk_id"), model.get("byte_fallback", False)
        self.normalizers = normalizers(spec.get("normalizer"), source)
        self.metaspace = _metaspace(spec.get("pre_tokenizer"), source)
        self.model_max_length = model_max_length
        defaults = {role: token for role, token in DEFAULT_ROLES.items() if token in self.vocab}
        roles = {**defaults, **{k: v for k, v in special_tokens.items() if v is not None}}
        self.strip = {t: (a.get("lstrip", False), a.get("rstrip", False)) for t, a in added.items()}
        extra = [t for t, a in added.items() if a.get("special") and t not in roles.values()]
        self._init_special_tokens(roles, source, self.strip, extra)
        self.layout, self.pair_type_id = template_layout(spec.get("post_processor"), self.vocab, source)
        self._cache = WordCache(self.token_ids)
        self.init_kwargs = {"model_max_length": model_max_length, **roles}
        if tokenizer_class is not None:
            self.init_kwargs["tokenizer_class"] = tokenizer_class

    # --- loading and saving ---------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory, **overrides):
        """tokenizer.json, else the SentencePiece model file converted as transformers converts
        it for tokenizer_config.json's tokenizer_class; with tokenizer_config.json's options."""
        directory = pathlib.Path(directory)
        config_file = directory / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        options = {k: token_content(config[k]) for k in ("model_max_length", "tokenizer_class", *ROLES)
                   if config.get(k) is not None}
        if options.get("model_max_length", 0) > 1e12:  # transformers' "no limit" sentinel
            options.pop("model_max_length")
        settings = {**config, **options, **overrides}
        source = directory / "tokenizer.json"
        if source.is_file():
            spec = _read_json(source)
            kind = (spec.get("model") or {}).get("type") if isinstance(spec, dict) else None
            if kind != "Unigram":
                raise ModelFileError(f"{source}: field 'model.type' is {kind!r}, not 'Unigram'")
            spec, roles = spm_classes.from_tokenizer_json(spec, settings, source)
        else:
            source = next((directory / name for name in SPM_FILES if (directory / name).is_file()), None)
            if source is None:
                raise MissingFile(f"{directory}: a SentencePiece tokenizer needs tokenizer.json or one of "
                                        f"{', '.join(SPM_FILES)} (save the tokenizer with transformers' "
                                        "save_pretrained)")
            spec, roles = spm_classes.from_model_file(read_model(source), settings, source)
        return cls(spec, source=str(source), **{**roles, **options, **overrides})

    def save_pretrained(self, directory):
        """Write tokenizer.json and tokenizer_config.json, which transformers loads."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.spec, directory / "tokenizer.json")
        write_json_atomic(self.init_kwargs, directory / "tokenizer_config.json")

    def special_layout(self):
        return self.layout

    # --- text to tokens ---------------------------------------------------------------------
    def viterbi(self, word):
        """[(start, end, id)] of the most likely segmentation of `word` (runs of unknown
        characters and the unknown piece fused, id None), as the reference's lattice: the
        first of equally likely paths."""
        best = [None] * (len(word) + 1)
        best[0] = (0.0, 0, None)
        scores, vocab = self.scores, self.piece_ids
        for start in range(len(word)):
            score = best[start][0]
            single = False
            for end in range(start + 1, min(len(word), start + self.longest) + 1):
                piece = word[start:end]
                if piece in scores:
                    total = score + scores[piece]
                    if best[end] is None or total > best[end][0]:
                        best[end] = (total, start, vocab[piece])
                    single = single or end == start + 1
            if not single:
                total = score + self.unknown_score
                if best[start + 1] is None or total > best[start + 1][0]:
                    best[start + 1] = (total, start, None)
        tokens, end = [], len(word)
        unknown = (None, self.unk_id)  # the unknown piece itself fuses too, as the reference's ids do
        while end > 0:
            _, start, token = best[end]
            if token in unknown and tokens and tokens[-1][2] in unknown:
                tokens[-1] = (start, tokens[-1][1], None)
            else:
                tokens.append((start, end, token))
            end = start
        return tokens[::-1]

    def token_ids(self, word):
        """[(start, end, id)] of one word: unknown runs as <unk>, or as bytes."""
        out = []
        for start, end, token in self.viterbi(word):
            if token is None and self.byte_fallback:
                raw = word[start:end].encode("utf-8")
                ids = [self.piece_ids.get(f"<0x{b:02X}>") for b in raw]
                if None not in ids:
                    out.extend((start, end, i) for i in ids)
                    continue
            out.append((start, end, self.unk_id if token is None else token))
        return tuple(out)

    def words(self, segment, start, first):
        """The words of one text segment (Normalized pieces), `first`: whether it opens the text."""
        text = Normalized.of(segment, start)
        for normalizer in self.normalizers:
            normalizer.apply(text)
        replacement, prepend, split, whitespace_split = self.metaspace
        pieces, run = [], None
        spaces = unicode.whitespace() if whitespace_split else ""
        for i, char in enumerate(text.chars + [" "]):  # WhitespaceSplit, or the whole text
            if char in spaces or i == len(text.chars):
                if run is not None:
                    pieces.append(text.slice(run, i))
                run = None
            elif run is None:
                run = i
        out = []
        for index, piece in enumerate(pieces):
            piece.chars = [replacement if c == " " else c for c in piece.chars]
            if (prepend == "always" or prepend == "first" and first and index == 0) and piece.chars[0] != replacement:
                piece.chars.insert(0, replacement)
                piece.spans.insert(0, piece.spans[0])
            cuts = [i for i, c in enumerate(piece.chars) if c == replacement and i > 0] if split else []
            out += [piece.slice(a, b) for a, b in zip([0] + cuts, cuts + [len(piece.chars)])]
        return out

    def _fast_words(self, text):
        return None

    def _ids(self, text):
        return self._sequence(text).ids

    def _sequence(self, text, word_index=None):
        ids, offsets, words = [], [], []
        index = -1
        for segment, start, special in self._segments(text):
            if special is not None:
                index += 1
                ids.append(special)
                offsets.append(self._special_span(segment, start))
                words.append(index if word_index is None else word_index)
                continue
            for word in self.words(segment, start, first=start == 0):
                index += 1
                for a, b, token in self._cache["".join(word.chars)]:
                    ids.append(token)
                    offsets.append((word.spans[a][0], word.spans[b - 1][1]))
                    words.append(index if word_index is None else word_index)
        return EncodedText(ids, offsets, words)

    # --- decoding ---------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens=False):
        """Pieces joined, "▁" as a space (the first one dropped), byte pieces as UTF-8; special
        tokens are known by their text, as the reference knows them (a piece that reads
        "<unk>" is skipped too)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        special = set(self.all_special_tokens)
        replacement, prepend, _, _ = self.metaspace
        out, pending = [], []
        for i in ids:
            token = self.ids_to_tokens[i]
            if token in special and skip_special_tokens:
                continue
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                pending.append(int(token[3:5], 16))
                continue
            if pending:
                out.append(bytes(pending).decode("utf-8", "replace"))
                pending = []
            out.append(token)
        if pending:
            out.append(bytes(pending).decode("utf-8", "replace"))
        text = "".join(out).replace(replacement, " ")
        return text[1:] if prepend != "never" and text.startswith(" ") else text


def _metaspace(spec, source):
    """(replacement, prepend scheme, split, whitespace split first) of tokenizer.json's
    pre_tokenizer: Metaspace, alone or after WhitespaceSplit."""
    parts = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec or {}]
    kinds = [p.get("type") for p in parts]
    if kinds not in (["Metaspace"], ["WhitespaceSplit", "Metaspace"]):
        raise ModelFileError(f"{source}: field 'pre_tokenizer' is {' + '.join(map(str, kinds))}; minisft's "
                         "SentencePiece tokenizers read Metaspace, alone or after WhitespaceSplit")
    meta = parts[-1]
    scheme = meta.get("prepend_scheme", "always" if meta.get("add_prefix_space", True) else "never")
    return meta.get("replacement", "▁"), scheme, meta.get("split", True), kinds[0] == "WhitespaceSplit"


def _read_json(path):
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc})") from None
