"""`minisft export`: every family and head traced into ONNX and run by onnxruntime, against
minisft's own outputs on padded batches of shapes the exporter did not trace; the command
line around it (predict on the file, int8, adapters, bad input)."""
import json

import numpy as np
import pytest

from minisft import cli, tasks
from minisft.engine.tensor import no_grad
from minisft.models import auto
from minisft.models.sentence import SentenceEmbedder
from conftest import FIXTURES

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
from minisft.export import exporter  # noqa: E402  (needs onnx)
from minisft.export.graph import ExportError  # noqa: E402

FAMILIES = ["bert", "deberta-v2", "deberta-v2-alt", "distilbert", "electra", "modernbert", "modernbert-cls", "mpnet",
            "roberta", "xlm-roberta"]
HEADS = {  # task: (Auto class, options)
    "classification": (auto.AutoModelForSequenceClassification, {"num_labels": 3}),
    "reranking": (auto.AutoModelForSequenceClassification, {"num_labels": 1}),
    "token-classification": (auto.AutoModelForTokenClassification, {"num_labels": 4}),
    "question-answering": (auto.AutoModelForQuestionAnswering, {"num_labels": 2}),
    "multiple-choice": (auto.AutoModelForMultipleChoice, {}),
}
# float32 sums over a few hundred terms in another order (onnxruntime's kernels, not minisft's)
ATOL = 1e-4


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Each family's base model (no head) saved, so that every head starts new on the same encoder."""
    root = tmp_path_factory.mktemp("bases")
    for name in FAMILIES:
        auto.AutoModel.from_pretrained(FIXTURES / f"tiny-{name}", lean=False).save_pretrained(root / name)
    return root


def _plain(bases, family, task):
    if task == "embedding":
        return SentenceEmbedder(auto.AutoModel.from_pretrained(bases / family, lean=False), pooling="mean").eval()
    cls, options = HEADS[task]
    try:
        return cls.from_pretrained(bases / family, lean=False, **options).eval()
    except Exception as exc:
        if "no multiple-choice head" in str(exc):
            pytest.skip(str(exc))
        raise


def _onnx_matches_minisft(model, task):
    proto = exporter.build(model, tasks.get(task).exported_outputs, multiple_choice=tasks.get(task).choices_axis)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for sizes in ({"batch": 4, "choices": 2, "sequence": 9}, {"batch": 1, "choices": 4, "sequence": 5},
                  {"batch": 5, "choices": 3, "sequence": 16}):
        batch = exporter.sample_inputs(model.config, sizes, task == "multiple-choice")
        got = session.run(None, {k: batch[k] for k in names})
        got = np.stack(got, -1) if task == "question-answering" else got[0]
        with no_grad():
            want = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).logits.numpy()
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() <= ATOL, (sizes, float(np.abs(got - want).max()))
    return proto


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", sorted(HEADS) + ["embedding"])
def test_every_family_and_head_runs_in_onnxruntime_as_in_minisft(bases, family, task):
    proto = _onnx_matches_minisft(_plain(bases, family, task), task)
    inputs = [i.name for i in proto.graph.input]
    assert inputs[:2] == ["input_ids", "attention_mask"]
    has_types = family in ("bert", "electra", "roberta", "xlm-roberta", "deberta-v2-alt")  # type_vocab_size > 0, used
    assert ("token_type_ids" in inputs) == has_types
    axes = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert set(map(tuple, axes)) == {("batch", "choices", "sequence") if task == "multiple-choice" else ("batch", "sequence")}
    assert [o.name for o in proto.graph.output] == list(tasks.get(task).exported_outputs)


def test_cls_pooling_and_no_normalisation_are_exported_too(bases):
    model = SentenceEmbedder(auto.AutoModel.from_pretrained(bases / "bert", lean=False), pooling="cls",
                             normalize=False).eval()
    _onnx_matches_minisft(model, "embedding")


def test_an_op_with_no_mapping_is_an_error_that_names_it(bases):
    """The lean passes' fused ops (packed Q/K/V, the fused feed-forward) have no ONNX mapping:
    the exporter takes the plain model, and says so for any other."""
    model = auto.AutoModelForSequenceClassification.from_pretrained(bases / "bert", num_labels=2).eval()  # lean
    with pytest.raises(ExportError, match=r"unmapped op: \w+ has no ONNX mapping"):
        exporter.build(model, ("logits",))


def _reviews(path, count=24):
    rows = [("a wonderful moving film", 1), ("dull and far too long", 0), ("great fun", 1), ("an awful mess", 0)]
    path.write_text("text,label\n" + "".join(f"{t} {i},{y}\n" for i in range(count // 4) for t, y in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BERT classifier and a LoRA one, trained by the command line."""
    root = tmp_path_factory.mktemp("trained")
    data = _reviews(root / "train.csv")
    common = ["--train", str(data), "--max-steps", "3", "--batch-size", "8", "--learning-rate", "1e-3"]
    assert cli.main(["train", "--model", str(FIXTURES / "tiny-bert"), *common, "--output", str(root / "plain")]) == 0
    assert cli.main(["train", "--model", str(FIXTURES / "tiny-bert"), *common, "--lora-r", "2",
                     "--output", str(root / "lora")]) == 0
    return root, data


def _predictions(capsys, *argv):
    capsys.readouterr()
    assert cli.main(["predict", *argv]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predict_on_the_exported_file_prints_what_the_directory_prints(trained, tmp_path, capsys):
    root, data = trained
    out = tmp_path / "served" / "model.onnx"
    out.parent.mkdir()
    assert cli.main(["export", "--model", str(root / "plain"), "--output", str(out)]) == 0
    assert {"vocab.txt", "tokenizer_config.json", "labels.json", "config.json"} <= {p.name for p in out.parent.iterdir()}
    settings = json.loads((out.parent / "labels.json").read_text())
    assert settings["task"] == "classification" and set(settings["id2label"].values()) == {"0", "1"}
    theirs = _predictions(capsys, "--model", str(out), "--data", str(data))
    ours = _predictions(capsys, "--model", str(root / "plain"), "--data", str(data))
    assert [r["label"] for r in theirs] == [r["label"] for r in ours]
    for a, b in zip(theirs, ours):
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]) <= ATOL
    assert cli.main(["evaluate", "--model", str(out), "--data", str(data)]) == 0


def test_int8_quantisation_writes_a_smaller_file_that_predicts(trained, tmp_path, capsys):
    root, data = trained
    plain, int8 = tmp_path / "model.onnx", tmp_path / "model-int8.onnx"
    assert cli.main(["export", "--model", str(root / "plain"), "--output", str(plain)]) == 0
    assert cli.main(["export", "--model", str(root / "plain"), "--output", str(int8), "--quantize", "int8"]) == 0
    assert json.loads((tmp_path / "labels.json").read_text())["quantize"] == "int8"
    ops = {node.op_type for node in __import__("onnx").load(int8).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert len(_predictions(capsys, "--model", str(int8), "--data", str(data))) == 24


def test_an_adapter_directory_needs_merging(trained, tmp_path, capsys):
    root, data = trained
    out = tmp_path / "lora.onnx"
    capsys.readouterr()
    assert cli.main(["export", "--model", str(root / "lora"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LoRA adapters" in err and "--merge-adapters" in err and not out.exists()
    assert cli.main(["export", "--model", str(root / "lora"), "--output", str(out), "--merge-adapters"]) == 0
    theirs = _predictions(capsys, "--model", str(out), "--data", str(data))
    ours = _predictions(capsys, "--model", str(root / "lora"), "--data", str(data))
    for a, b in zip(theirs, ours):
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]) <= ATOL


def test_an_output_in_a_missing_directory_is_one_line(trained, tmp_path, capsys):
    root, _ = trained
    capsys.readouterr()
    assert cli.main(["export", "--model", str(root / "plain"), "--output", str(tmp_path / "nowhere" / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err and "does not exist" in err


@pytest.mark.pretrained
def test_the_minilm_classifier_matches_at_every_length_and_batch_from_one_file(minilm_dir):
    model = auto.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2, lean=False).eval()
    proto = exporter.build(model, ("logits",))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 32):
        for length in (8, 64, 128):
            inputs = exporter.sample_inputs(model.config, {"batch": batch, "choices": 1, "sequence": length}, False)
            got = session.run(None, inputs)[0]
            with no_grad():
                want = model(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             token_type_ids=inputs["token_type_ids"]).logits.numpy()
            assert np.abs(got - want).max() <= ATOL, (batch, length)


def test_an_exported_embedding_model_evaluates_as_the_directory_does(tmp_path, capsys):
    """Rows of (anchor, positive) run column by column through the file, as SentenceEmbedder runs them."""
    from test_sentence import pairs_file

    train, dev = pairs_file(tmp_path / "train.csv", 24, seed=0), pairs_file(tmp_path / "dev.csv", 16, seed=1)
    run, out = tmp_path / "run", tmp_path / "model.onnx"
    assert cli.main(["train", "--model", str(FIXTURES / "tiny-bert"), "--train", str(train), "--task", "embedding",
                     "--output", str(run), "--batch-size", "8", "--max-steps", "3"]) == 0
    assert cli.main(["export", "--model", str(run), "--output", str(out)]) == 0
    assert json.loads((tmp_path / "labels.json").read_text())["pooling"] == "mean"
    capsys.readouterr()
    scores = []
    for model in (run, out):
        assert cli.main(["evaluate", "--model", str(model), "--data", str(dev)]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0].keys() == scores[1].keys()
    assert all(abs(scores[0][k] - scores[1][k]) <= 1e-6 for k in scores[0])  # rank metrics: the same order


def test_a_checkpoint_exports_as_sentence_embeddings_that_embed_reads(tmp_path, capsys):
    """A directory that `minisft train` did not write (here a checkpoint without
    sentence-transformers files: mean pooling, normalised) exports as embeddings."""
    out = tmp_path / "embedder.onnx"
    assert cli.main(["export", "--model", str(FIXTURES / "tiny-bert"), "--output", str(out)]) == 0
    assert json.loads((tmp_path / "labels.json").read_text())["task"] == "embedding"
    texts = tmp_path / "texts.txt"
    texts.write_text("the film was good\nit was dull and far too long\nfun\n")
    for model, name in ((FIXTURES / "tiny-bert", "ours.npy"), (out, "theirs.npy")):
        assert cli.main(["embed", "--model", str(model), "--data", str(texts), "--output", str(tmp_path / name)]) == 0
    ours, theirs = np.load(tmp_path / "ours.npy"), np.load(tmp_path / "theirs.npy")
    assert ours.shape == theirs.shape == (3, 32) and np.abs(ours - theirs).max() <= ATOL
    capsys.readouterr()
    assert cli.main(["embed", "--model", str(out), "--data", str(texts), "--pooling", "cls"]) == 2
    assert "fixed in the file" in capsys.readouterr().err


def test_without_the_export_extra_the_error_names_the_install(monkeypatch, tmp_path, capsys):
    real = exporter.importlib.util.find_spec
    monkeypatch.setattr(exporter.importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    capsys.readouterr()
    assert cli.main(["export", "--model", str(FIXTURES / "tiny-bert"), "--output", str(tmp_path / "m.onnx")]) == 2
    assert "pip install -e '.[export]'" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
