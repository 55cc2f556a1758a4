"""DistilBERT against transformers' stored outputs (tests/fixtures/make_distilbert_fixtures.py):
logits, loss, hidden states, attentions and every gradient; padding; the Auto classes and the
command line on a DistilBERT checkpoint."""
import json

import numpy as np
import pytest

import minisft
from minisft import cli
from minisft.models.auto import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification
from minisft.models.distilbert import (DistilBertForSequenceClassification, DistilBertForTokenClassification,
                                       DistilBertModel)
from conftest import FIXTURES, assert_close

TINY = FIXTURES / "tiny-distilbert"


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURES / "tiny_distilbert_outputs.npz")


def test_outputs_loss_and_every_gradient_match_transformers(reference, device):
    ref = reference
    model = AutoModelForSequenceClassification.from_pretrained(TINY).eval().to(device)
    assert type(model) is DistilBertForSequenceClassification
    out = model(ref["input_ids"], attention_mask=ref["attention_mask"], labels=ref["labels"],
                output_hidden_states=True, output_attentions=True)
    assert_close(out.logits, ref["logits"], atol=1e-5, rtol=0, what="logits")
    assert_close(out.loss, ref["loss"], atol=1e-5, rtol=0, what="loss")
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    for i, hidden in enumerate(out.hidden_states):
        assert_close(hidden, ref[f"hidden_states/{i}"], atol=1e-5, rtol=0, what=f"hidden_states[{i}]")
    for i, attention in enumerate(out.attentions):
        assert_close(attention, ref[f"attentions/{i}"], atol=1e-5, rtol=0, what=f"attentions[{i}]")
    out.loss.backward()
    names = {k[len("grad/"):] for k in ref.files if k.startswith("grad/")}
    assert names == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        assert_close(param.grad, ref[f"grad/{name}"], atol=1e-5, rtol=0, what=f"grad of {name}")


def test_padded_positions_do_not_change_real_ones(reference):
    model = AutoModel.from_pretrained(TINY).eval()
    assert type(model) is DistilBertModel
    with minisft.no_grad():
        batch = model(reference["input_ids"], attention_mask=reference["attention_mask"]).last_hidden_state.numpy()
        length = int(reference["attention_mask"][2].sum())
        alone = model(reference["input_ids"][2:3, :length]).last_hidden_state.numpy()
    assert_close(batch[2:3, :length], alone, atol=1e-5, rtol=0)
    assert_close(batch, reference["hidden_states/2"], atol=1e-5, rtol=0)


def test_token_classification_head_and_save_round_trip(tmp_path, reference):
    model = AutoModelForTokenClassification.from_pretrained(TINY, num_labels=3).eval()
    assert type(model) is DistilBertForTokenClassification
    logits = model(reference["input_ids"], attention_mask=reference["attention_mask"]).logits
    assert logits.shape == (3, 9, 3)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "distilbert" and config["architectures"] == ["DistilBertForTokenClassification"]
    again = AutoModelForTokenClassification.from_pretrained(tmp_path / "saved").eval()
    assert (again(reference["input_ids"]).logits.numpy() == model(reference["input_ids"]).logits.numpy()).all()


def test_sinusoidal_position_embeddings_are_refused_by_name(tmp_path):
    import shutil

    shutil.copytree(TINY, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "sinusoidal_pos_embds": True}))
    with pytest.raises(ValueError, match=r"config.json: field 'sinusoidal_pos_embds' is true"):
        AutoModel.from_pretrained(tmp_path / "ckpt")


def test_the_command_line_fine_tunes_and_predicts_with_distilbert(tmp_path, capsys):
    """The fixture is a 3-label classifier: the data have 3 classes, so its head loads."""
    classes = {"good": "pos", "great": "pos", "bad": "neg", "dull": "neg", "long": "mid", "quite": "mid"}
    rows = [f"the film was {word},{label}" for word, label in classes.items()] * 4
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    output = tmp_path / "run"
    assert cli.main(["train", "--model", str(TINY), "--train", str(tmp_path / "train.csv"), "--output", str(output),
                     "--max-steps", "3", "--batch-size", "4"]) == 0
    assert json.loads((output / "config.json").read_text())["model_type"] == "distilbert"
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(output), "--data", str(tmp_path / "train.csv")]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["label"] in classes.values() and set(first["probabilities"]) == set(classes.values())
