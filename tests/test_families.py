"""The BERT-family models other than BERT (DeBERTa-v2, DistilBERT, ELECTRA, ModernBERT, MPNet,
RoBERTa, XLM-RoBERTa) against transformers' stored outputs (tests/fixtures/make_family_fixtures.py,
make_unigram_fixtures.py, make_encoder_fixtures.py): logits, loss, hidden states, attentions and
every gradient; padding; the Auto classes and the command line on each checkpoint."""
import json
import shutil

import numpy as np
import pytest

import minisft
from minisft import cli, lean
from minisft.models import bert, deberta_v2, distilbert, electra, modernbert, mpnet, roberta, xlm_roberta
from minisft.models.auto import (AutoConfig, AutoModel, AutoModelForQuestionAnswering,
                                 AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer)
from conftest import FIXTURES, assert_close
from helpers import assert_layers_and_gradients_match

FAMILIES = {  # name: (base, sequence classification, token classification)
    "deberta-v2": (deberta_v2.DebertaV2Model, deberta_v2.DebertaV2ForSequenceClassification,
                   deberta_v2.DebertaV2ForTokenClassification),  # tests/fixtures/make_encoder_fixtures.py
    "modernbert": (modernbert.ModernBertModel, modernbert.ModernBertForSequenceClassification,
                   modernbert.ModernBertForTokenClassification),  # 14 tokens: longer than its local window
    "mpnet": (mpnet.MPNetModel, mpnet.MPNetForSequenceClassification, mpnet.MPNetForTokenClassification),
    "distilbert": (distilbert.DistilBertModel, distilbert.DistilBertForSequenceClassification,
                   distilbert.DistilBertForTokenClassification),
    "electra": (electra.ElectraModel, electra.ElectraForSequenceClassification, electra.ElectraForTokenClassification),
    "roberta": (roberta.RobertaModel, roberta.RobertaForSequenceClassification, roberta.RobertaForTokenClassification),
    "xlm-roberta": (xlm_roberta.XLMRobertaModel, xlm_roberta.XLMRobertaForSequenceClassification,
                    xlm_roberta.XLMRobertaForTokenClassification),  # tests/fixtures/make_unigram_fixtures.py
}
TRAINABLE = ["deberta-v2", "distilbert", "electra", "modernbert", "mpnet", "roberta", "xlm-roberta", "bert-bin"]  # bert-bin: a BERT stored only as pytorch_model.bin


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    """(name, checkpoint directory, stored outputs, the family's classes)."""
    name = request.param
    outputs = np.load(FIXTURES / f"tiny_{name.replace('-', '_')}_outputs.npz")
    return name, FIXTURES / f"tiny-{name}", outputs, FAMILIES[name]


def inputs(ref):
    return {key: ref[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in ref.files}


def test_outputs_loss_and_every_gradient_match_transformers(family, device):
    _, directory, ref, classes = family
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval().to(device)
    assert type(model) is classes[1]
    out = model(**inputs(ref), labels=ref["labels"], output_hidden_states=True, output_attentions=True)
    assert_close(out.logits, ref["logits"], atol=1e-5, rtol=0, what="logits")
    assert_close(out.loss, ref["loss"], atol=1e-5, rtol=0, what="loss")
    assert_layers_and_gradients_match(model, out, out.loss, ref)


def test_the_base_model_loads_a_task_checkpoint_and_padding_changes_nothing(family):
    _, directory, ref, classes = family
    model = AutoModel.from_pretrained(directory).eval()
    assert type(model) is classes[0]
    with minisft.no_grad():
        batch = model(**inputs(ref)).last_hidden_state.numpy()
        length = int(ref["attention_mask"][2].sum())
        alone = model(ref["input_ids"][2:3, :length]).last_hidden_state.numpy()
    assert_close(batch[2:3, :length], alone, atol=1e-5, rtol=0)
    layers = sum(1 for k in ref.files if k.startswith("attentions/"))
    assert_close(batch, ref[f"hidden_states/{layers}"], atol=1e-5, rtol=0)


def test_token_classification_head_and_save_round_trip(family, tmp_path):
    name, directory, ref, classes = family
    model = AutoModelForTokenClassification.from_pretrained(directory, num_labels=3).eval()
    assert type(model) is classes[2]
    logits = model(**inputs(ref)).logits
    assert logits.shape == ref["input_ids"].shape + (3,)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == name and config["architectures"] == [classes[2].__name__]
    again = AutoModelForTokenClassification.from_pretrained(tmp_path / "saved").eval()
    assert (again(ref["input_ids"]).logits.numpy() == model(ref["input_ids"]).logits.numpy()).all()


@pytest.mark.parametrize("name", TRAINABLE)
def test_the_command_line_fine_tunes_and_predicts(name, tmp_path, capsys):
    """The fixtures are 3-label classifiers: the data have 3 classes, so their heads load.
    Where the reference extra is installed, transformers loads the result and gives the same
    logits."""
    directory = FIXTURES / f"tiny-{name}"
    classes = {"good": "pos", "great": "pos", "bad": "neg", "dull": "neg", "long": "mid", "quite": "mid"}
    rows = [f"the film was {word},{label}" for word, label in classes.items()] * 4
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    output = tmp_path / "run"
    assert cli.main(["train", "--model", str(directory), "--train", str(tmp_path / "train.csv"),
                     "--output", str(output), "--max-steps", "3", "--batch-size", "4"]) == 0
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(output), "--data", str(tmp_path / "train.csv")]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["label"] in classes.values() and set(first["probabilities"]) == set(classes.values())
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    texts = ["the film was good", "a dull, long film"]
    ours = AutoModelForSequenceClassification.from_pretrained(output).eval()
    batch = AutoTokenizer.from_pretrained(output)(texts, padding=True)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(output).eval()
    reference = transformers.AutoTokenizer.from_pretrained(output)(texts, padding=True, return_tensors="pt")
    assert (reference["input_ids"].numpy() == batch["input_ids"]).all()
    with torch.no_grad():
        expected = theirs(**reference).logits.numpy()
    inputs = {k: batch[k] for k in reference}
    np.testing.assert_allclose(ours(**inputs).logits.numpy(), expected, atol=1e-4)


def test_electra_projects_its_embeddings_to_the_hidden_size():
    model = AutoModel.from_pretrained(FIXTURES / "tiny-electra")
    assert model.embeddings.word_embeddings.weight.shape == (64, 16)
    assert model.embeddings_project.weight.shape == (32, 16)


def test_roberta_positions_start_after_the_padding_index_and_its_limit_is_named():
    model = AutoModel.from_pretrained(FIXTURES / "tiny-roberta").eval()
    ids = np.full((1, 40), 7)
    assert model(ids).last_hidden_state.shape == (1, 40, 32)  # positions 2..41 of 42
    with pytest.raises(ValueError, match=r"needs position 42, beyond max_position_embeddings 42.*truncate to 40"):
        model(np.full((1, 41), 7))


def test_distilbert_sinusoidal_position_embeddings_are_refused_by_name(tmp_path):
    shutil.copytree(FIXTURES / "tiny-distilbert", tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "sinusoidal_pos_embds": True}))
    with pytest.raises(ValueError, match=r"config.json: field 'sinusoidal_pos_embds' is true"):
        AutoModel.from_pretrained(tmp_path / "ckpt")


NEWER = {"deberta-v2": deberta_v2.DebertaV2ForQuestionAnswering, "modernbert": modernbert.ModernBertForQuestionAnswering,
         "mpnet": mpnet.MPNetForQuestionAnswering, "xlm-roberta": xlm_roberta.XLMRobertaForQuestionAnswering}
# their fixtures hold every parameter (param/NAME): the model is built from config.json and given them all


@pytest.mark.parametrize("name", ["bert", "distilbert", "electra", "roberta"] + sorted(NEWER))
def test_question_answering_head_matches_transformers(name, device):
    """Start and end logits, the loss (a position past the input ignored), every hidden
    state, attention and gradient against tests/fixtures/make_head_fixtures.py's. QA's loss
    reads every position, padding too: DeBERTa's padding queries, whose rows are wholly
    masked, must pass no gradient to their scores, as transformers' masked_fill."""
    ref, model, out = _question_answering(name, device)
    assert_layers_and_gradients_match(model, out, out.loss, ref)


def _question_answering(name, device):
    """The fixture, the model with its parameters (eval, on `device`), and its output, whose start and
    end logits and loss are checked here."""
    ref = np.load(FIXTURES / f"tiny_{name.replace('-', '_')}_qa_outputs.npz")
    if name in NEWER:
        model = NEWER[name](AutoConfig.from_pretrained(FIXTURES / f"tiny-{name}", num_labels=2))
        model.load_state_dict({k[len("param/"):]: ref[k] for k in ref.files if k.startswith("param/")})
    else:
        model = AutoModelForQuestionAnswering.from_pretrained(FIXTURES / f"tiny-{name}", num_labels=2)
        model.load_state_dict({**model.state_dict(), "qa_outputs.weight": ref["qa_outputs.weight"],
                               "qa_outputs.bias": ref["qa_outputs.bias"]})
    model = model.eval().to(device)
    out = model(**inputs(ref), labels=ref["positions"], output_hidden_states=True, output_attentions=True)
    assert_close(out.start_logits, ref["start_logits"], atol=1e-5, rtol=0, what="start logits")
    assert_close(out.end_logits, ref["end_logits"], atol=1e-5, rtol=0, what="end logits")
    assert_close(out.loss, ref["loss"], atol=1e-5, rtol=0, what="loss")
    return ref, model, out


MULTIPLE_CHOICE = {"bert": bert.BertForMultipleChoice, "distilbert": distilbert.DistilBertForMultipleChoice,
                   "roberta": roberta.RobertaForMultipleChoice, "deberta-v2": deberta_v2.DebertaV2ForMultipleChoice,
                   "modernbert": modernbert.ModernBertForMultipleChoice, "mpnet": mpnet.MPNetForMultipleChoice,
                   "xlm-roberta": xlm_roberta.XLMRobertaForMultipleChoice}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "dropout": 0.0,
              "attention_dropout": 0.0, "seq_classif_dropout": 0.0}


def multiple_choice_model(name, ref):
    """The family's multiple-choice model with the fixture's parameters, dropout off."""
    config = AutoConfig.from_pretrained(FIXTURES / f"tiny-{name}")
    for key, value in NO_DROPOUT.items():
        if hasattr(config, key):
            setattr(config, key, value)
    model = MULTIPLE_CHOICE[name](config)
    model.load_state_dict({k[len("param/"):]: ref[k] for k in ref.files if k.startswith("param/")})
    return model


@pytest.mark.parametrize("name", sorted(MULTIPLE_CHOICE))
def test_multiple_choice_head_matches_transformers(name, device):
    """Logits (B, C), loss, every hidden state, attention and gradient against
    tests/fixtures/make_head_fixtures.py's, on 3 questions of 4 padded choices."""
    ref = np.load(FIXTURES / f"tiny_{name.replace('-', '_')}_mc_outputs.npz")
    model = multiple_choice_model(name, ref).eval().to(device)
    out = model(**inputs(ref), labels=ref["labels"], output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (3, 4)
    assert_close(out.logits, ref["logits"], atol=1e-5, rtol=0, what="logits")
    assert_close(out.loss, ref["loss"], atol=1e-5, rtol=0, what="loss")
    assert_layers_and_gradients_match(model, out, out.loss, ref)


@pytest.mark.parametrize("name", sorted(MULTIPLE_CHOICE))
def test_twenty_multiple_choice_steps_give_transformers_losses(name):
    from minisft.optim import AdamW

    ref = np.load(FIXTURES / f"tiny_{name.replace('-', '_')}_mc_outputs.npz")
    model = multiple_choice_model(name, ref).train()
    optimizer = AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    losses = []
    for step in range(20):
        batch = {k: ref[f"steps/{step}/{k}"] for k in ("input_ids", "attention_mask", "token_type_ids")
                 if f"steps/{step}/{k}" in ref.files}
        loss = model(**batch, labels=ref[f"steps/{step}/labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # the first step's loss within 1e-6; AdamW (dividing by sqrt(v) + 1e-8) then turns float32
    # rounding in tiny gradients into small differences of the weights: 1.6e-5 at most here
    np.testing.assert_allclose(losses[0], ref["step_losses"][0], rtol=1e-6)
    np.testing.assert_allclose(losses, ref["step_losses"], rtol=5e-5, atol=0)


def test_gradient_checkpointing_gives_every_family_the_same_gradients(family):
    """ELECTRA's embeddings projection and DistilBERT's own embeddings recompute too. DeBERTa's,
    ModernBERT's and MPNet's layers also take relative positions, rotary tables or a learned
    position bias: refused by name, for now."""
    name, directory, ref, _ = family
    if name in ("deberta-v2", "modernbert", "mpnet"):
        with pytest.raises(ValueError, match=r"gradient checkpointing is not available for (DebertaV2Layer|"
                                             r"ModernBertEncoderLayer|MPNetLayer) yet"):
            lean.gradient_checkpointing(AutoModelForSequenceClassification.from_pretrained(directory))
        return
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForSequenceClassification.from_pretrained(directory).train()  # dropout on
        if checkpointing:
            lean.gradient_checkpointing(model)
        minisft.manual_seed(3)
        model(**inputs(ref), labels=ref["labels"]).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert np.array_equal(grad, checkpointed[name]), name


def test_deberta_v2_s_other_options_match_transformers():
    """c2p alone, separate position projections, no log buckets (6 relative positions at length 9:
    clamped), absolute positions, token types, embeddings projected from 24 to 32, a tanh pooler
    (tests/fixtures/make_encoder_fixtures.py); the v3 layout is the family fixture above."""
    ref = np.load(FIXTURES / "tiny_deberta_v2_alt_outputs.npz")
    model = AutoModelForSequenceClassification.from_pretrained(FIXTURES / "tiny-deberta-v2-alt").eval()
    assert model.deberta.embeddings.embed_proj.weight.shape == (32, 24)
    out = model(**inputs(ref), labels=ref["labels"], output_hidden_states=True, output_attentions=True)
    assert_close(out.logits, ref["logits"], atol=1e-5, rtol=0, what="logits")
    assert_close(out.loss, ref["loss"], atol=1e-5, rtol=0, what="loss")
    assert_layers_and_gradients_match(model, out, out.loss, ref)


@pytest.mark.parametrize("length, buckets, max_position", [(512, 256, 512), (700, 256, 512), (40, 8, 40), (9, 6, 100)])
def test_deberta_log_buckets_are_transformers(length, buckets, max_position):
    """Relative positions beyond buckets / 2 on transformers' float32 log scale, where a rounding
    of the log would move a distance into the next bucket."""
    torch = pytest.importorskip("torch")
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    q = torch.zeros(1, length, 4)
    expected = build_relative_position(q, q, bucket_size=buckets, max_position=max_position)[0].numpy()
    assert (deberta_v2.relative_positions(length, buckets, max_position) == expected).all()


def test_modernbert_s_other_options_match_transformers():
    """cls pooling, biases and norm biases on, global attention on every other layer, a local
    window of 3 tokens each way (tests/fixtures/make_encoder_fixtures.py); the family fixture above
    pools the mean, with 2 local layers of 4 tokens each way."""
    ref = np.load(FIXTURES / "tiny_modernbert_cls_outputs.npz")
    model = AutoModelForSequenceClassification.from_pretrained(FIXTURES / "tiny-modernbert-cls").eval()
    assert model.config.layer_types == ["full_attention", "sliding_attention"] and model.config.sliding_window == 3
    out = model(**inputs(ref), labels=ref["labels"], output_hidden_states=True, output_attentions=True)
    assert_close(out.logits, ref["logits"], atol=1e-5, rtol=0, what="logits")
    assert_close(out.loss, ref["loss"], atol=1e-5, rtol=0, what="loss")
    assert_layers_and_gradients_match(model, out, out.loss, ref)


def test_modernbert_s_local_layers_see_only_their_window():
    """A token changed beyond a local layer's window changes nothing of a first-layer local output
    there, but changes the global layers' (the first layer is global: layer types by position)."""
    config = AutoConfig.from_pretrained(FIXTURES / "tiny-modernbert")
    window = config.sliding_window
    bias = modernbert.attention_biases(None, 12, window, np.float32)
    assert bias["full_attention"] is None
    allowed = bias["sliding_attention"][0, 0] == 0
    assert allowed[5].tolist() == [abs(5 - j) <= window for j in range(12)]


@pytest.mark.parametrize("length", [1, 14, 130, 512])
def test_mpnet_s_relative_position_buckets_are_transformers(length):
    torch = pytest.importorskip("torch")
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    positions = torch.arange(length)
    expected = MPNetEncoder.relative_position_bucket(positions[None, :] - positions[:, None]).numpy()
    assert (mpnet.relative_position_buckets(length) == expected).all()
