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


@pytest.mark.parametrize("loss", ["hard", "matryoshka"])
def test_hard_negatives_and_matryoshka_losses_equal_sentence_transformers(loss):
    """(anchor, positive, negative, negative) rows: MultipleNegativesRankingLoss with the hard
    negatives among every anchor's candidates, and MatryoshkaLoss around it at 32, 16 and 8
    dimensions; the loss and every gradient as sentence-transformers gives them."""
    from minisft.models.sentence import pairs_loss

    ref = np.load(REF)
    model, tokenizer = SentenceEmbedder.from_pretrained(TINY).eval(), BertTokenizer.from_pretrained(TINY)
    task = tasks.get("embedding")
    examples = [tasks.data.Example(str(a), str(p), negatives=tuple(map(str, n)))
                for a, p, n in zip(ref["anchors"], ref["positives"], ref["negatives"])]
    batch = collate(task.encode(examples, tokenizer, None))
    assert batch["input_ids"].shape[:2] == (4, 4)
    dims = [int(d) for d in ref["matryoshka_dims"]] if loss == "matryoshka" else None
    value = pairs_loss(model(batch["input_ids"], attention_mask=batch["attention_mask"],
                             token_type_ids=batch["token_type_ids"]).logits, dims)
    assert_close(value, ref[f"{loss}/loss"], atol=1e-5, rtol=0, what="loss")
    value.backward()
    for name, param in model.model.named_parameters():
        if f"{loss}/grad/{name}" in ref.files:
            assert_close(param.grad, ref[f"{loss}/grad/{name}"], atol=1e-5, rtol=0, what=f"grad of {name}")


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


def triplets_file(path, count, seed, negatives=1):
    """(anchor, positive, negative...) rows: a review, one of the same kind, ones of the other."""
    rng = np.random.default_rng(seed)
    columns = ["anchor", "positive"] + (["negative"] if negatives == 1 else [f"negative_{k + 1}" for k in range(negatives)])
    lines = [",".join(columns)]
    for i in range(count):
        same, other = (POSITIVE, NEGATIVE) if i % 2 else (NEGATIVE, POSITIVE)
        lines.append(",".join([f"the film was {rng.choice(same)}", f"it was {rng.choice(same)}"]
                              + [f"it was {rng.choice(other)}" for _ in range(negatives)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_triplets_train_with_matryoshka_and_report_each_dimension(tmp_path, capsys):
    train, dev = triplets_file(tmp_path / "train.csv", 32, 0, 2), triplets_file(tmp_path / "dev.csv", 12, 1)
    output = tmp_path / "out"
    assert cli.main(["train", "--model", str(TINY), "--train", str(train), "--eval", str(dev), "--task", "embedding",
                     "--output", str(output), "--batch-size", "8", "--max-steps", "4", "--matryoshka-dims", "32,16,8"]) == 0
    final = json.loads(capsys.readouterr().out)
    assert {"eval_recall@1", "eval_recall@1/dim16", "eval_mrr@10/dim8", "eval_recall@10/dim32"} <= set(final)
    assert final["eval_recall@1/dim32"] == final["eval_recall@1"]  # all 32 dimensions: the same ranking
    assert json.loads((output / "training_args.json").read_text())["matryoshka_dims"] == [32, 16, 8]
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(output), "--data", str(train)]) == 0  # rows with negatives
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 32 and set(records[0]) == {"anchor", "positive", "similarity"}


@pytest.mark.parametrize("extra, message", [
    (("--matryoshka-dims", "64,16"), "--matryoshka-dims '64,16': 64 is more than the 32 dimensions of"),
    (("--matryoshka-dims", "16,16"), "'16,16': each dimension >= 1, none twice"),
])
def test_matryoshka_dimensions_are_checked(tmp_path, capsys, extra, message):
    train = triplets_file(tmp_path / "train.csv", 8, 0)
    try:  # argparse's own check exits; the one against the model returns
        code = cli.main(["train", "--model", str(TINY), "--train", str(train), "--task", "embedding", "--output",
                         str(tmp_path / "out"), "--batch-size", "4", "--max-steps", "1", *extra])
    except SystemExit as stop:
        code = stop.code
    assert code == 2 and message in capsys.readouterr().err


def test_a_triplet_row_with_an_empty_negative_is_named(tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_text("anchor,positive,negative\nthe film was good,it was fun,it was dull\nthe film was bad,it was dull,\n")
    code = cli.main(["train", "--model", str(TINY), "--train", str(path), "--task", "embedding", "--output",
                     str(tmp_path / "out"), "--batch-size", "2", "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "t.csv: 1 row has an empty negative 'negative' (line 3); fill them in or remove them" in err


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
