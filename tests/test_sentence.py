"""Sentence embeddings and retrieval (minisft.sentence, --task embedding, minisft embed):
embeddings, MultipleNegativesRankingLoss and its gradients against sentence-transformers'
stored outputs (tests/fixtures/make_sentence_fixtures.py), the directory sentence-transformers
loads, retrieval metrics, and the command line on the tiny BERT."""
import json

import numpy as np
import pytest

import minisft
from minisft import cli, tasks
from minisft.models.auto import AutoTokenizer
from minisft.sentence import SentenceEmbedder
from minisft.tasks.data import DataError, collate
from minisft.tokenizer import BertTokenizer
from conftest import FIXTURES, assert_close
from helpers import NEGATIVE, POSITIVE

TINY = FIXTURES / "tiny-bert"
REF = FIXTURES / "tiny_bert_sentence_outputs.npz"


def embed(model, tokenizer, texts):
    encoded = tokenizer(list(texts), return_tensors=None)
    batch = collate([{"input_ids": ids, "token_type_ids": types}
                     for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"])])
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])


def test_embeddings_loss_and_gradients_equal_sentence_transformers():
    ref = np.load(REF)
    model, tokenizer = SentenceEmbedder.from_pretrained(TINY).eval(), BertTokenizer.from_pretrained(TINY)
    assert_close(embed(model, tokenizer, ref["texts"]).logits, ref["embeddings"], atol=1e-5, rtol=0, what="embeddings")
    pairs = [{"input_ids": [a, p], "token_type_ids": [[0] * len(a), [0] * len(p)], "label": 1}
             for a, p in zip(tokenizer(list(ref["anchors"]), return_tensors=None)["input_ids"],
                             tokenizer(list(ref["positives"]), return_tensors=None)["input_ids"])]
    batch = collate(pairs)
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                labels=batch["labels"])
    assert out.logits.shape == (4, 2, 32)
    assert_close(out.loss, ref["loss"], atol=1e-5, rtol=0, what="loss")
    out.loss.backward()
    for name, param in model.model.named_parameters():
        if f"grad/{name}" in ref.files:
            assert_close(param.grad, ref[f"grad/{name}"], atol=1e-5, rtol=0, what=f"grad of {name}")
        else:
            assert param.grad is None, name  # the pooler: not in the embeddings


def test_the_saved_directory_is_sentence_transformers_layout_and_reloads(tmp_path):
    ref = np.load(REF)
    model, tokenizer = SentenceEmbedder.from_pretrained(TINY, pooling="cls").eval(), BertTokenizer.from_pretrained(TINY)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    assert json.loads((tmp_path / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True
    assert json.loads((tmp_path / "sentence_bert_config.json").read_text())["max_seq_length"] == 40
    again = SentenceEmbedder.from_pretrained(tmp_path).eval()
    assert again.pooling == "cls" and again.normalize
    np.testing.assert_array_equal(embed(again, tokenizer, ref["texts"]).logits.numpy(),
                                  embed(model, tokenizer, ref["texts"]).logits.numpy())


def test_sentence_transformers_loads_the_saved_directory_with_equal_embeddings(tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers", reason="the reference extra is not installed")
    texts = list(np.load(REF)["texts"])
    model, tokenizer = SentenceEmbedder.from_pretrained(TINY).eval(), BertTokenizer.from_pretrained(TINY)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    theirs = sentence_transformers.SentenceTransformer(str(tmp_path), device="cpu").encode(texts)
    assert_close(embed(model, tokenizer, texts).logits, theirs, atol=1e-5, rtol=0, what="embeddings")


def test_a_pair_file_without_a_positive_column_is_named(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("anchor,score\nthe film was good,1\n")
    with pytest.raises(DataError, match=r"pairs.csv: no positive column .*--text-pair-column"):
        tasks.get("embedding").read(path)


def pairs_file(path, count, seed):
    rng = np.random.default_rng(seed)
    lines = ["anchor,positive"]
    for i in range(count):
        words = POSITIVE if i % 2 else NEGATIVE
        lines.append(f"the film was {rng.choice(words)},it was {rng.choice(words)} and {rng.choice(words)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_command_line_trains_evaluates_and_embeds(tmp_path, capsys):
    train, dev = pairs_file(tmp_path / "train.csv", 48, seed=0), pairs_file(tmp_path / "dev.csv", 16, seed=1)
    output = tmp_path / "out"
    assert cli.main(["train", "--model", str(TINY), "--train", str(train), "--eval", str(dev), "--task", "embedding",
                     "--output", str(output), "--batch-size", "8", "--learning-rate", "1e-3", "--epochs", "1"]) == 0
    final = json.loads(capsys.readouterr().out)
    assert set(final) == {"eval_mrr@10", "eval_recall@1", "eval_recall@5", "eval_recall@10"}
    assert (output / "modules.json").is_file() and (output / "1_Pooling" / "config.json").is_file()
    assert cli.main(["evaluate", "--model", str(output), "--data", str(dev)]) == 0
    assert json.loads(capsys.readouterr().out) == {k[len("eval_"):]: v for k, v in final.items()}
    texts = tmp_path / "texts.txt"
    texts.write_text("the film was good\nit was dull\n")
    assert cli.main(["embed", "--model", str(output), "--data", str(texts), "--output", str(tmp_path / "e.npy")]) == 0
    vectors = np.load(tmp_path / "e.npy")
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    capsys.readouterr()
    assert cli.main(["embed", "--model", str(output), "--data", str(texts)]) == 0
    rows = [json.loads(line)["embedding"] for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose(rows, vectors, atol=1e-6)


def test_a_row_padded_on_the_left_keeps_every_token():
    from minisft.sentence import normalize, pool

    model = SentenceEmbedder.from_pretrained(TINY).eval()
    ids = np.random.default_rng(0).integers(5, 64, (2, 7))
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # 4 tokens at the end
    mask[1, 5:] = 0  # 5 tokens at the start: 5 is the longest row, but row 0 reaches column 6
    whole = model.model(ids, attention_mask=mask).last_hidden_state
    assert_close(model(ids, attention_mask=mask).logits, normalize(pool(whole, mask, "mean")), atol=1e-6, rtol=0,
                 what="embeddings")


def test_an_xlm_roberta_embedder_gives_sentence_transformers_embeddings(tmp_path):
    """The sentence-transformers layout of another family and tokenizer (SentencePiece): built and
    encoded by sentence-transformers where it is installed, loaded and encoded by minisft."""
    st = pytest.importorskip("sentence_transformers")
    word = st.models.Transformer(str(FIXTURES / "tiny-xlm-roberta"))
    st.SentenceTransformer(modules=[word, st.models.Pooling(32, "mean"), st.models.Normalize()]).save(str(tmp_path))
    texts = ["a film ﬁne", "Ein Café e\u0301 👍, a longer text than the first"]
    expected = st.SentenceTransformer(str(tmp_path)).encode(texts)
    model = SentenceEmbedder.from_pretrained(tmp_path).eval()
    batch = AutoTokenizer.from_pretrained(tmp_path)(texts, padding=True)
    with minisft.no_grad():
        embeddings = model(batch["input_ids"], batch["attention_mask"]).logits.numpy()
    assert type(model.model).__name__ == "XLMRobertaModel"
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)  # unit vectors of float32 sums over 32 features
