"""BertTokenizer: identical to transformers' on 2,000+ varied lines, plus behaviour checks."""
import functools
import gzip
import json
import runpy

import numpy as np
import pytest

from minisft.tokenizer import BasicTokenizer, BertTokenizer, WordpieceTokenizer
from conftest import FIXTURES, ROOT
from helpers import fixture_mismatches, observe_encoding


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return BertTokenizer.from_pretrained(minilm_dir)


@pytest.mark.pretrained  # made with all-MiniLM-L6-v2's vocab.txt
def test_identical_to_transformers_on_every_fixture_line(minilm_dir):
    def observe(tok, case):
        enc = tok(case["text"], case["pair"], return_offsets_mapping=True, return_tensors=None, **case["call"])
        return {"input_ids": enc["input_ids"][0], "token_type_ids": enc["token_type_ids"][0],
                "offset_mapping": [list(o) for o in enc["offset_mapping"][0]],
                "word_ids": enc.word_ids(0), "decoded": tok.decode(enc["input_ids"][0])}

    make = functools.partial(BertTokenizer.from_pretrained, minilm_dir)
    cases, mismatches = fixture_mismatches(FIXTURES / "tokenizer_cases.jsonl.gz", make, observe)
    assert len(cases) >= 2000 and not mismatches, f"{len(mismatches)} of {len(cases)} differ, first: {mismatches[:3]}"


@pytest.mark.pretrained  # made with all-MiniLM-L6-v2's vocab.txt
def test_identical_to_transformers_on_random_unicode(minilm_dir):
    """Unassigned code points, marks of every combining class, controls, formats, private use,
    characters newer than the reference's Unicode tables (make_bert_fixtures.py)."""
    def observe(tok, case):
        enc = tok([case["text"]], return_offsets_mapping=True, return_tensors=None)
        return {"input_ids": enc["input_ids"][0], "offset_mapping": [list(o) for o in enc["offset_mapping"][0]]}

    make = functools.partial(BertTokenizer.from_pretrained, minilm_dir)
    cases, mismatches = fixture_mismatches(FIXTURES / "unicode_cases.jsonl.gz", make, observe)
    assert len(cases) == 4000 and not mismatches, f"{len(mismatches)} differ, first: {mismatches[:3]}"


@pytest.mark.pretrained
def test_identical_to_transformers_on_generated_unicode(minilm_dir):
    """Live, where the reference extra is installed: hypothesis draws any code points."""
    transformers = pytest.importorskip("transformers")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    ours = BertTokenizer.from_pretrained(minilm_dir)
    theirs = transformers.BertTokenizer.from_pretrained(minilm_dir)
    text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=16)

    @settings(max_examples=1000, deadline=None, derandomize=True)
    @given(text, text)
    def check(first, second):
        assert ours.encode(first) == theirs.encode(first)
        assert ours.encode(first, second) == theirs.encode(first, second)

    check()


@pytest.mark.pretrained
def test_an_empty_second_text_is_no_pair(tokenizer):
    """encode(text, "") is encode(text), as transformers does it; in a batch "" stays a pair."""
    assert tokenizer.encode("hello", "") == tokenizer.encode("hello")
    assert tokenizer(["hello"], [""], return_tensors=None)["input_ids"][0][-2:] == [tokenizer.sep_token_id] * 2


def test_unicode_tables_are_what_their_script_measures(tmp_path):
    """tools/measure_unicode.py, run against the installed reference, rewrites the same tables."""
    pytest.importorskip("tokenizers")
    module = runpy.run_path(str(ROOT / "tools" / "measure_unicode.py"), run_name="measure")
    module["write"].__globals__["TARGET"] = tmp_path / "unicode_tables.py"
    import tokenizers

    module["write"](module["measure"](), tokenizers.__version__)
    committed = ROOT / "minisft" / "tokenizers" / "unicode_tables.py"
    assert (tmp_path / "unicode_tables.py").read_text(encoding="utf-8") == committed.read_text(encoding="utf-8")


@pytest.mark.pretrained
def test_batch_padding_and_arrays(tokenizer):
    batch = tokenizer(["a short one", "a somewhat longer sentence here"], padding=True)
    assert batch["input_ids"].dtype == np.int64 and batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert batch["input_ids"][0, -1] == tokenizer.pad_token_id
    assert batch.word_ids(0) == [None, 0, 1, 2, None, None, None]
    fixed = tokenizer(["a", "b c"], padding="max_length", max_length=10)
    assert fixed["input_ids"].shape == (2, 10)
    with pytest.raises(ValueError, match="padding=True"):
        tokenizer(["a", "b c"])


@pytest.mark.pretrained
def test_pairs_and_truncation(tokenizer):
    enc = tokenizer("first text", "and the second one", truncation=True, max_length=7, return_tensors=None)
    assert len(enc["input_ids"][0]) == 7
    assert enc["token_type_ids"][0] == [0, 0, 0, 0, 1, 1, 1]
    assert enc.sequence_ids(0) == [None, 0, 0, None, 1, 1, None]


@pytest.mark.pretrained
def test_split_into_words_word_ids_for_label_alignment(tokenizer):
    enc = tokenizer(["Huggingface", "rocks", "!"], is_split_into_words=True, return_tensors=None)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    word_ids = enc.word_ids(0)
    assert word_ids[0] is None and word_ids[-1] is None
    assert sorted(set(w for w in word_ids if w is not None)) == [0, 1, 2]


@pytest.mark.pretrained
def test_tokenize_encode_decode(tokenizer):
    assert tokenizer.tokenize("Unaffable!") == ["una", "##ffa", "##ble", "!"]
    ids = tokenizer.encode("Hello, world!")
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello, world!"


@pytest.mark.pretrained
def test_save_pretrained_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = BertTokenizer.from_pretrained(tmp_path)
    text = "Ça va? 中文 [MASK] tokenization"
    assert again(text, return_tensors=None)["input_ids"] == tokenizer(text, return_tensors=None)["input_ids"]


def test_missing_vocab_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        BertTokenizer.from_pretrained(tmp_path)


def test_basic_tokenizer_rules_without_a_vocabulary():
    basic = BasicTokenizer(do_lower_case=True)
    assert basic.tokenize(" \tHeLLo!How  \n Are yoU?  ") == ["hello", "!", "how", "are", "you", "?"]
    assert basic.tokenize("Héllo 中文") == ["hello", "中", "文"]
    assert BasicTokenizer(do_lower_case=True, strip_accents=False).tokenize("Héllo") == ["héllo"]
    assert BasicTokenizer(do_lower_case=False).tokenize("Héllo") == ["Héllo"]
    assert basic.tokenize("a\x00b\u200bc") == ["abc"]


def test_wordpiece_greedy_longest_match_and_unknown():
    vocab = {t: i for i, t in enumerate(["[UNK]", "want", "##want", "##ed", "wa", "un", "runn", "##ing"])}
    wordpiece = WordpieceTokenizer(vocab)
    assert wordpiece.tokenize("unwanted") == ["un", "##want", "##ed"]
    assert wordpiece.tokenize("running") == ["runn", "##ing"]
    assert wordpiece.tokenize("unwantedX") == ["[UNK]"]
    assert wordpiece.tokenize("a" * 101) == ["[UNK]"]


def test_tokenizer_json_is_read_when_vocab_txt_is_absent(tmp_path):
    """tiny-distilbert's tokenizer.json was written by transformers (make_family_fixtures.py)."""
    import shutil

    from minisft.models.auto import AutoTokenizer

    shutil.copytree(FIXTURES / "tiny-distilbert", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "vocab.txt").unlink()
    texts = ["The film was GOOD, and funny!", "Paris visited John", "unknownword xyz", "mary's story"]
    from_json = AutoTokenizer.from_pretrained(tmp_path / "ckpt")(texts, return_tensors=None)
    from_vocab = AutoTokenizer.from_pretrained(FIXTURES / "tiny-distilbert")(texts, return_tensors=None)
    assert from_json["input_ids"] == from_vocab["input_ids"]


def test_a_tokenizer_json_of_another_model_type_is_named(tmp_path):
    import shutil

    from minisft.tokenizer import BertTokenizer

    shutil.copytree(FIXTURES / "tiny-distilbert", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "vocab.txt").unlink()
    spec = json.loads((tmp_path / "ckpt" / "tokenizer.json").read_text())
    spec["model"]["type"] = "Unigram"
    (tmp_path / "ckpt" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"tokenizer.json: field 'model.type' is 'Unigram'; minisft reads WordPiece"):
        BertTokenizer.from_pretrained(tmp_path / "ckpt")


@pytest.mark.pretrained  # made with all-MiniLM-L6-v2's vocab.txt (tests/fixtures/make_qa_fixtures.py)
def test_question_and_context_windows_equal_transformers(tokenizer):
    """run_qa's call: truncation="only_second", return_overflowing_tokens, a stride and
    offsets, on 70 SQuAD questions: the same windows, ids, types, offsets and sequence ids."""
    with gzip.open(FIXTURES / "qa_windows.jsonl.gz", "rt", encoding="utf-8") as f:
        cases = [json.loads(line) for line in f]
    assert sum(len(case["rows"]) > 1 for case in cases) >= 10  # contexts of several windows
    for case in cases:
        ours = tokenizer([case["question"]], [case["context"]], truncation="only_second", max_length=case["max_length"],
                   stride=case["stride"], return_overflowing_tokens=True, return_offsets_mapping=True,
                   return_tensors=None)
        assert ours["overflow_to_sample_mapping"] == case["overflow_to_sample_mapping"]
        for i, row in enumerate(case["rows"]):
            assert ours["input_ids"][i] == row["input_ids"]
            assert ours["token_type_ids"][i] == row["token_type_ids"]
            assert [list(o) for o in ours["offset_mapping"][i]] == row["offset_mapping"]
            assert ours.sequence_ids(i) == row["sequence_ids"]


@pytest.mark.pretrained
def test_a_stride_as_long_as_a_window_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="stride 30 must be less than the 30 tokens a window holds"):
        tokenizer(["what is it?"], ["a context " * 40], truncation="only_second", max_length=37, stride=30,
            return_overflowing_tokens=True)


def test_mpnet_s_tokenizer_is_identical_to_transformers():
    """MPNetTokenizer: BERT's WordPiece with <s> A </s></s> B </s>, one token type, <mask> taking
    the space before it (its offsets without it): ids, offsets, word and sequence ids and decodings
    on 2,600 cases (tests/fixtures/make_encoder_fixtures.py), from its tokenizer.json."""
    from minisft.models.auto import AutoTokenizer
    from minisft.tokenizers.wordpiece import MPNetTokenizer

    directory = FIXTURES / "tiny-mpnet"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert isinstance(tokenizer, MPNetTokenizer)
    cases, mismatches = fixture_mismatches(FIXTURES / "mpnet_tokenizer_cases.jsonl.gz",
                                           lambda **options: MPNetTokenizer.from_pretrained(directory, **options),
                                           observe_encoding)
    assert len(cases) >= 2500 and not mismatches, f"{len(mismatches)} of {len(cases)} differ, first: {mismatches[:3]}"
    assert not tokenizer("a film", "a story")["token_type_ids"].any()
