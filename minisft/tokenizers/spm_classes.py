"""transformers' SentencePiece tokenizer classes as tokenizer.json pipelines: what each class
builds in its constructor from a vocabulary and a charsmap, whether these come from
tokenizer.json or from the SentencePiece model file. transformers rebuilds the pipeline of
these classes even when tokenizer.json spells another, so the class decides, as there.

    spec = from_model_file(read_model("spm.model"), {"tokenizer_class": "DebertaV2Tokenizer"}, path)
"""
import base64

from minisft.engine.errors import ModelFileError

ROLE_ORDER = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _special(token, type_id=0):
    return {"SpecialToken": {"id": token, "type_id": type_id}}


def _sequence(name, type_id=0):
    return {"Sequence": {"id": name, "type_id": type_id}}


def _added(token, token_id):
    return {"id": token_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _charsmap_spec(charsmap):
    return {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode("ascii")}


def _template(single, pair, ids):
    return {"type": "TemplateProcessing", "single": single, "pair": pair,
            "special_tokens": {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in dict.fromkeys(
                item["SpecialToken"]["id"] for item in pair if "SpecialToken" in item)}}


def _last_ids(vocab):
    return {piece: i for i, (piece, _) in enumerate(vocab)}  # a repeated piece: its last id, as the reference


class XLMRoberta:
    """XLMRobertaTokenizer: <s> <pad> </s> <unk> first, <mask> last; unk id 3; no byte
    fallback; the charsmap; words at whitespace, "▁" before each; <s> A </s> (</s> B </s>)."""
    defaults = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}

    @classmethod
    def vocab_from_model(cls, proto, roles):
        """(vocab, added tokens {token: id}) from the model file: its pieces after the first three."""
        head = [[roles[r], 0.0] for r in ("bos_token", "pad_token", "eos_token", "unk_token")]
        vocab = head + [[piece, score] for piece, score, _ in proto["pieces"][3:]] + [[roles["mask_token"], 0.0]]
        ids = _last_ids(vocab)
        return vocab, {roles[r]: ids[roles[r]] for r in ("bos_token", "pad_token", "eos_token", "unk_token",
                                                         "mask_token")}, 3

    @staticmethod
    def unk_id(vocab, roles, hint):
        return 3

    @classmethod
    def pipeline(cls, charsmap, roles, ids, settings, source):
        scheme = "always" if settings.get("add_prefix_space", True) else "never"
        bos, eos = roles["bos_token"], roles["eos_token"]
        return {
            "normalizer": _charsmap_spec(charsmap) if charsmap else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "WhitespaceSplit"}, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme,
                                              "split": True}]},
            "post_processor": _template([_special(bos), _sequence("A"), _special(eos)],
                                        [_special(bos), _sequence("A"), _special(eos), _special(eos), _sequence("B"),
                                         _special(eos)], ids),
            "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": True},
        }


class DebertaV2:
    """DebertaV2Tokenizer (DeBERTa-v3's): the pieces as they are, the model file's control
    pieces special; [CLS] [SEP] [UNK] [PAD] [MASK] appended where missing; the charsmap, the
    end stripped, runs of spaces as one; "▁" before the text; [CLS] A [SEP] (B [SEP], type 1)."""
    defaults = {"bos_token": "[CLS]", "eos_token": "[SEP]", "sep_token": "[SEP]", "cls_token": "[CLS]",
                "unk_token": "[UNK]", "pad_token": "[PAD]", "mask_token": "[MASK]"}

    @classmethod
    def vocab_from_model(cls, proto, roles):
        vocab = [[piece, score] for piece, score, _ in proto["pieces"]]
        added = {piece: i for i, (piece, _, kind) in enumerate(proto["pieces"]) if kind == "control"}
        return vocab, added, proto["trainer"].get("unk_id", 0)

    @staticmethod
    def unk_id(vocab, roles, hint):
        """The unknown token's place in the pieces, else tokenizer_config.json's unk_id (else 1)."""
        return next((i for i, (piece, score) in enumerate(vocab) if [piece, score] == [roles["unk_token"], 0.0]),
                    1 if hint is None else hint)

    @classmethod
    def pipeline(cls, charsmap, roles, ids, settings, source):
        if not charsmap or settings.get("split_by_punct"):
            raise ModelFileError(f"{source}: a DebertaV2Tokenizer without a charsmap, or with split_by_punct, is not "
                             "read by minisft (DeBERTa-v3's has a charsmap and no split_by_punct)")
        normalizers = [{"type": "Lowercase"}] if settings.get("do_lower_case") else []
        normalizers += [_charsmap_spec(charsmap), {"type": "Strip", "strip_left": False, "strip_right": True},
                        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
        scheme = "always" if settings.get("add_prefix_space", True) else "first"
        cls_token, sep = roles["cls_token"], roles["sep_token"]
        return {
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": True}]},
            "post_processor": _template([_special(cls_token), _sequence("A"), _special(sep)],
                                        [_special(cls_token), _sequence("A"), _special(sep), _sequence("B", 1),
                                         _special(sep, 1)], ids),
            "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": True},
        }


CLASSES = {"XLMRobertaTokenizer": XLMRoberta, "XLMRobertaTokenizerFast": XLMRoberta,
           "DebertaV2Tokenizer": DebertaV2, "DebertaV2TokenizerFast": DebertaV2}


def _roles(kind, settings):
    return {role: settings.get(role) or default for role, default in kind.defaults.items()}


def _assemble(kind, vocab, added, unk_id, charsmap, settings, source):
    """(tokenizer.json's content, the special-token roles): the vocabulary, the role tokens
    appended where missing (in transformers' order), the class's pipeline."""
    roles = _roles(kind, settings)
    vocab, added = [list(v) for v in vocab], dict(added)
    ids = {**_last_ids(vocab), **added}
    for role in ROLE_ORDER:
        token = roles[role]
        if token not in ids:
            ids[token] = max([len(vocab) - 1, *added.values()]) + 1
        added.setdefault(token, ids[token])
    spec = {"version": "1.0", "added_tokens": [_added(t, i) for t, i in sorted(added.items(), key=lambda a: a[1])],
            **kind.pipeline(charsmap, roles, ids, settings, source),
            "model": {"type": "Unigram", "unk_id": kind.unk_id(vocab, roles, unk_id), "vocab": vocab,
                      "byte_fallback": False}}
    return spec, roles


def from_model_file(proto, settings, source):
    """(tokenizer.json's content, roles) for a SentencePiece model file, as transformers converts
    it for tokenizer_config.json's tokenizer_class (XLMRobertaTokenizer where none is named)."""
    name = settings.get("tokenizer_class") or "XLMRobertaTokenizer"
    if name not in CLASSES:
        raise ModelFileError(f"{source}: tokenizer_class {name!r} from a SentencePiece model file alone is not read; "
                         f"minisft converts {', '.join(CLASSES)} (or give tokenizer.json)")
    if proto["trainer"]["model_type"] != "unigram":
        raise ModelFileError(f"{source}: trainer_spec.model_type is {proto['trainer']['model_type']!r}; minisft reads "
                         "Unigram SentencePiece models")
    kind = CLASSES[name]
    vocab, added, unk_id = kind.vocab_from_model(proto, _roles(kind, settings))
    return _assemble(kind, vocab, added, unk_id, proto["normalizer"].get("precompiled_charsmap"), settings, source)


def from_tokenizer_json(spec, settings, source):
    """(tokenizer.json's content as transformers runs it, roles): for the classes above, their
    own pipeline around the file's vocabulary, charsmap and added tokens; else the file as it
    is (roles: none implied)."""
    kind = CLASSES.get(settings.get("tokenizer_class"))
    if kind is None:
        return spec, {}
    charsmap = next((base64.b64decode(n["precompiled_charsmap"]) for n in _flat(spec.get("normalizer"))
                     if n.get("type") == "Precompiled" and n.get("precompiled_charsmap")), None)
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    return _assemble(kind, spec["model"]["vocab"], added, settings.get("unk_id"), charsmap, settings, source)


def _flat(normalizer):
    if not normalizer:
        return []
    if normalizer.get("type") == "Sequence":
        return [n for part in normalizer["normalizers"] for n in _flat(part)]
    return [normalizer]
