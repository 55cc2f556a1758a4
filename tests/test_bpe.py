"""Byte-level BPE: identical to transformers' RobertaTokenizer on 2,600 varied lines (ids,
offsets, word and sequence indices, decoding), plus behaviour and bad-input checks."""
import functools
import json
import shutil

import pytest

from minisft.models.auto import AutoTokenizer
from minisft.tokenizers.bpe import ByteLevelBPETokenizer, bytes_to_unicode
from conftest import FIXTURES
from helpers import fixture_mismatches, observe_encoding

TINY = FIXTURES / "tiny-roberta"  # a 1,000-token BPE trained by make_family_fixtures.py


@pytest.fixture(scope="module")
def tokenizer():
    return ByteLevelBPETokenizer.from_pretrained(TINY)


def test_identical_to_transformers_on_every_fixture_line():
    make = functools.partial(ByteLevelBPETokenizer.from_pretrained, TINY)
    cases, mismatches = fixture_mismatches(FIXTURES / "bpe_cases.jsonl.gz", make, observe_encoding)
    assert len(cases) >= 2000 and not mismatches, f"{len(mismatches)} of {len(cases)} differ, first: {mismatches[:3]}"


def test_auto_tokenizer_picks_byte_level_bpe_and_pairs_have_one_token_type(tokenizer):
    assert isinstance(AutoTokenizer.from_pretrained(TINY), ByteLevelBPETokenizer)
    batch = tokenizer("a film", "a story")
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.sep_token_id) == 3
    assert ids[ids.index(tokenizer.sep_token_id) + 1] == tokenizer.sep_token_id  # <s> A </s></s> B </s>
    assert not batch["token_type_ids"].any()


def test_the_mask_token_takes_the_space_before_it(tokenizer):
    """roberta-base's <mask> is lstrip: "a <mask>" has no separate space token."""
    assert tokenizer.tokenize("a <mask> b") == ["a", "<mask>", "Ġb"]
    assert tokenizer.tokenize("a <pad> b") == ["a", "Ġ", "<pad>", "Ġb"]


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_merges_apply_by_rank_until_none_applies():
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", "a", "b", "c", "ab", "bc", "abc"])}
    tok = ByteLevelBPETokenizer(vocab, [("b", "c"), ("a", "b"), ("a", "bc")])
    assert tok.merge(list("abc")) == ["abc"]  # (b, c) first, then (a, bc)
    assert tok.merge(list("abab")) == ["ab", "ab"]
    assert tok.merge(list("cab")) == ["c", "ab"]
    assert tok.tokenize("abcab") == ["abc", "ab"]


def test_save_pretrained_round_trip_keeps_ids_and_the_mask_strip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"vocab.json", "merges.txt", "tokenizer_config.json"}
    again = ByteLevelBPETokenizer.from_pretrained(tmp_path)
    texts = ["It's a wonderful film <mask>!", " naïve café 中文 😀", "12345 don't\n\nstop"]
    assert again(texts, return_tensors=None)["input_ids"] == tokenizer(texts, return_tensors=None)["input_ids"]


def test_transformers_reads_what_minisft_saves(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = ["It's a wonderful film <mask>!", " naïve café 中文 😀", "12345 don't\n\nstop"]
    assert theirs(texts)["input_ids"] == tokenizer(texts, return_tensors=None)["input_ids"]


@pytest.mark.parametrize("edit, message", [
    (lambda spec: spec["model"].update(type="Unigram"), r"tokenizer.json: field 'model.type' is 'Unigram'"),
    (lambda spec: spec.update(pre_tokenizer={"type": "Metaspace"}), r"field 'pre_tokenizer' is 'Metaspace'"),
    (lambda spec: spec.update(normalizer={"type": "NFC"}), r"field 'normalizer' is 'NFC'"),
])
def test_unsupported_tokenizer_json_names_the_file_and_field(tmp_path, edit, message):
    shutil.copytree(TINY, tmp_path / "ckpt")
    spec = json.loads((tmp_path / "ckpt" / "tokenizer.json").read_text(encoding="utf-8"))
    edit(spec)
    (tmp_path / "ckpt" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        AutoTokenizer.from_pretrained(tmp_path / "ckpt")


def test_a_bad_merges_line_is_named(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    with open(tmp_path / "merges.txt", "a", encoding="utf-8") as f:
        f.write("a b c\n")
    with pytest.raises(ValueError, match=r"merges.txt: line \d+ is 'a b c', not two tokens"):
        ByteLevelBPETokenizer.from_pretrained(tmp_path)


def test_modernbert_s_tokenizer_json_is_identical_to_transformers():
    """ModernBERT ships a byte-level BPE in tokenizer.json with a TemplateProcessing post-processor
    ([CLS] A [SEP] B [SEP], B of type 1) and tokenizer_class TokenizersBackend: ids, untrimmed
    offsets (a template trims none), word and sequence ids and decodings on 2,364 cases
    (tests/fixtures/make_encoder_fixtures.py); it saves as transformers loads it."""
    directory = FIXTURES / "tiny-modernbert"

    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert isinstance(tokenizer, ByteLevelBPETokenizer) and tokenizer.cls_token == "[CLS]"
    cases, mismatches = fixture_mismatches(FIXTURES / "modernbert_tokenizer_cases.jsonl.gz", lambda **_: tokenizer,
                                           observe_encoding)
    assert len(cases) >= 2300 and not mismatches, f"{len(mismatches)} of {len(cases)} differ, first: {mismatches[:3]}"
    pair = tokenizer("a film", "a story", return_tensors=None)
    assert pair["token_type_ids"][0] == [0] * 4 + [1] * 3
