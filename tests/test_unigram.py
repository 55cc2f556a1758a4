"""SentencePiece Unigram tokenizers (XLM-RoBERTa's): identical to transformers on 6,000
varied lines and random Unicode strings (ids, offsets, word and sequence indices, decoding),
from tokenizer.json and from the SentencePiece model file alone; byte fallback against the
tokenizers library; grapheme clusters, the charsmap, the model file reader and bad input."""
import functools
import gzip
import json

import pytest

from minisft.models.auto import AutoTokenizer
from minisft.tokenizers.graphemes import clusters
from minisft.tokenizers.sentencepiece import Charsmap, ModelFileError, read_model
from minisft.tokenizers.unigram import UnigramTokenizer
from conftest import FIXTURES
from helpers import fixture_mismatches, observe_encoding as observe

TINY = FIXTURES / "tiny-xlm-roberta"          # tests/fixtures/make_unigram_fixtures.py
SPM_ONLY = FIXTURES / "tiny-xlm-roberta-spm"  # its sentencepiece.bpe.model and tokenizer_config.json alone


@pytest.mark.parametrize("cases, directory", [
    ("unigram_cases", TINY), ("unigram_cases", SPM_ONLY),
    ("deberta_tokenizer_cases", FIXTURES / "tiny-deberta-v2"), ("deberta_tokenizer_cases", FIXTURES / "tiny-deberta-v2-spm"),
], ids=["xlm-r-tokenizer.json", "xlm-r-model-file", "deberta-v2-tokenizer.json", "deberta-v2-spm.model"])
def test_identical_to_transformers_on_every_fixture_line(cases, directory):
    """XLMRobertaTokenizer (make_unigram_fixtures.py) and DebertaV2Tokenizer (its charsmap, right
    strip, runs of spaces as one, "▁" before the text; make_encoder_fixtures.py) of one model file."""
    make = functools.partial(UnigramTokenizer.from_pretrained, directory)
    cases, mismatches = fixture_mismatches(FIXTURES / f"{cases}.jsonl.gz", make, observe)
    assert len(cases) >= 5900 and not mismatches, f"{len(mismatches)} of {len(cases)} differ, first: {mismatches[:3]}"


def test_byte_fallback_matches_the_tokenizers_library():
    """The same tokenizer.json with byte_fallback on: a character no piece covers becomes its
    UTF-8 bytes, each with the character's offsets."""
    spec = json.loads((TINY / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["byte_fallback"] = True
    tok = UnigramTokenizer(spec)
    with gzip.open(FIXTURES / "unigram_bytes_cases.jsonl.gz", "rt", encoding="utf-8") as f:
        cases = [json.loads(line) for line in f]
    bytes_seen, wrong = 0, []
    for case in cases:
        enc = tok(case["text"], return_offsets_mapping=True, return_tensors=None)
        got = (enc["input_ids"][0], [list(o) for o in enc["offset_mapping"][0]], enc.word_ids(0))
        if got != (case["input_ids"], case["offset_mapping"], case["word_ids"]):
            wrong.append(case["text"])
        bytes_seen += any(tok.ids_to_tokens[i].startswith("<0x") for i in got[0])
    assert len(cases) >= 3000 and not wrong, f"{len(wrong)} differ, first: {wrong[:3]}"
    assert bytes_seen > 500  # the fixture exercises the fallback
    assert tok.tokenize("ö") == ["▁", "<0xC3>", "<0xB6>"] and tok.decode(tok.encode("wö x")) == "<s> wö x</s>"


def test_auto_tokenizer_picks_unigram_and_the_saved_tokenizer_encodes_the_same(tmp_path):
    tok = AutoTokenizer.from_pretrained(TINY)
    assert isinstance(tok, UnigramTokenizer)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Ein Café, ｆｕｌｌｗｉｄｔｈ ﬁne e\u0301 👨\u200d👩\u200d👧 <mask> end"
    encode = {"return_offsets_mapping": True, "return_tensors": None}
    assert again(text, "pair", **encode) == tok(text, "pair", **encode)
    ids = tok(text, "pair")["input_ids"][0].tolist()
    assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 3  # <s> A </s></s> B </s>
    assert not tok(text, "pair")["token_type_ids"].any()


@pytest.mark.parametrize("text, expected", [
    ("e\u0301x", ["e\u0301", "x"]),                                   # a base and its combining mark
    ("\r\n\n", ["\r\n", "\n"]),                                       # CR LF, then LF alone
    ("🇫🇷🇩🇪🇮", ["🇫🇷", "🇩🇪", "🇮"]),                                # flags: regional indicators in pairs
    ("👨\u200d👩\u200d👧!", ["👨\u200d👩\u200d👧", "!"]),              # emoji joined by ZWJ
    ("a\u200d👩", ["a\u200d", "👩"]),                                 # ZWJ after a letter joins nothing
    ("\u1100\u1161\u11a8\u1100", ["\u1100\u1161\u11a8", "\u1100"]),   # Hangul jamo L V T, then L
    ("\u0915\u094d\u0937\u094d", ["\u0915\u094d\u0937\u094d"]),       # a Devanagari conjunct (GB9c)
    ("\u094d\u0915", ["\u094d", "\u0915"]),                           # a virama with no consonant before
    ("\u0600a", ["\u0600a"]),                                         # prepended concatenation mark
    ("", []),
])
def test_grapheme_clusters_follow_uax_29(text, expected):
    assert clusters(text) == expected


def test_the_charsmap_rewrites_by_its_shortest_prefix():
    proto = read_model(TINY / "sentencepiece.bpe.model")
    charsmap = Charsmap(proto["normalizer"]["precompiled_charsmap"])
    assert charsmap.transform("ﬁ") == "fi" and charsmap.transform("Ａ") == "A"
    assert charsmap.transform("a") is None and charsmap.transform("e\u0301") == "é"
    assert proto["normalizer"]["name"] == "nmt_nfkc" and proto["trainer"]["byte_fallback"] == 1
    assert proto["pieces"][:4] == [("<s>", 0.0, "control"), ("<pad>", 0.0, "control"), ("</s>", 0.0, "control"),
                                   ("<unk>", 0.0, "unknown")]
    assert proto["pieces"][4][2] == "byte"


@pytest.mark.parametrize("content, message", [
    (lambda raw: raw[:len(raw) // 3], r"truncated protobuf"),
    (lambda raw: b"\x0f" + raw, r"protobuf wire type 7"),
    (lambda raw: b"", r"no pieces: not a SentencePiece model file"),
], ids=["truncated", "not-protobuf", "empty"])
def test_a_damaged_model_file_is_named(tmp_path, content, message):
    path = tmp_path / "spm.model"
    path.write_bytes(content((TINY / "sentencepiece.bpe.model").read_bytes()))
    with pytest.raises(ModelFileError, match=f"spm.model: {message}"):
        read_model(path)


@pytest.mark.parametrize("field, value, message", [
    ("normalizer", {"type": "NFKD"}, r"field 'normalizer' has type 'NFKD'"),
    ("pre_tokenizer", {"type": "ByteLevel"}, r"field 'pre_tokenizer' is ByteLevel"),
    ("post_processor", {"type": "RobertaProcessing"}, r"field 'post_processor' is 'RobertaProcessing'"),
])
def test_unsupported_pipelines_are_named(tmp_path, field, value, message):
    spec = json.loads((TINY / "tokenizer.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, field: value}), encoding="utf-8")
    with pytest.raises(ValueError, match=f"tokenizer.json: {message}"):
        UnigramTokenizer.from_pretrained(tmp_path)


def test_a_model_file_of_another_tokenizer_class_is_refused(tmp_path):
    (tmp_path / "spm.model").write_bytes((SPM_ONLY / "sentencepiece.bpe.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    with pytest.raises(ValueError, match=r"tokenizer_class 'T5Tokenizer' from a SentencePiece model file"):
        UnigramTokenizer.from_pretrained(tmp_path)
