"""BertModel against transformers: a tiny random model exhaustively, and the real
all-MiniLM-L6-v2 checkpoint (marked `pretrained`)."""
import json
import shutil

import numpy as np
import pytest

import minisft
from minisft.files.weights import CheckpointError, load_safetensors, save_safetensors
from minisft.models.bert import BertConfig, BertModel
from conftest import FIXTURES, assert_close
from helpers import assert_layers_and_gradients_match

TINY = FIXTURES / "tiny-bert"


def loss_of(out):
    """The scalar whose gradients make_bert_fixtures.py stores."""
    return (out.last_hidden_state ** 2).mean() + out.pooler_output.sum() * 0.01


@pytest.fixture(scope="module")
def tiny_reference():
    return np.load(FIXTURES / "tiny_bert_outputs.npz")


def test_tiny_bert_outputs_and_every_gradient_match_transformers(tiny_reference, device):
    ref = tiny_reference
    model = BertModel.from_pretrained(TINY).eval().to(device)
    out = model(ref["input_ids"], attention_mask=ref["attention_mask"],
                token_type_ids=ref["token_type_ids"], output_hidden_states=True,
                output_attentions=True)
    assert_close(out.last_hidden_state, ref["last_hidden_state"], atol=1e-5, rtol=0, what="last_hidden_state")
    assert_close(out.pooler_output, ref["pooler_output"], atol=1e-5, rtol=0, what="pooler_output")
    assert_layers_and_gradients_match(model, out, loss_of(out), ref)


def test_padded_positions_do_not_change_real_ones(tiny_reference):
    ref = tiny_reference
    model = BertModel.from_pretrained(TINY).eval()
    with minisft.no_grad():
        batch = model(ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state.numpy()
        length = int(ref["attention_mask"][2].sum())
        alone = model(ref["input_ids"][2:3, :length]).last_hidden_state.numpy()
    assert_close(batch[2:3, :length], alone, atol=1e-5, rtol=0)


def test_save_pretrained_round_trip(tmp_path, tiny_reference):
    model = BertModel.from_pretrained(TINY).eval()
    model.save_pretrained(tmp_path / "saved")
    again = BertModel.from_pretrained(tmp_path / "saved").eval()
    ids = tiny_reference["input_ids"]
    with minisft.no_grad():
        assert (model(ids).last_hidden_state.numpy() == again(ids).last_hidden_state.numpy()).all()
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["model_type"] == "bert"
    assert not list((tmp_path / "saved").glob("*.tmp"))


def test_config_defaults_and_unknown_fields_kept():
    config = BertConfig.from_pretrained(TINY)
    assert config.hidden_size == 32 and config.layer_norm_eps == 1e-12
    assert BertConfig().hidden_act == "gelu" and BertConfig().num_labels == 2
    assert BertConfig(custom_field=3).to_dict()["custom_field"] == 3
    assert BertConfig(id2label={"0": "neg", "1": "pos"}).label2id == {"neg": 0, "pos": 1}


def test_hidden_act_comes_from_config(tiny_reference):
    ids = tiny_reference["input_ids"]
    outputs = {}
    for activation in ("gelu", "gelu_new", "relu"):
        model = BertModel.from_pretrained(TINY, hidden_act=activation).eval()
        with minisft.no_grad():
            outputs[activation] = model(ids).last_hidden_state.numpy()
    assert_close(outputs["gelu_new"], outputs["gelu"], atol=1e-2, rtol=0)  # tanh form: close
    assert np.abs(outputs["gelu_new"] - outputs["gelu"]).max() > 0
    assert np.abs(outputs["relu"] - outputs["gelu"]).max() > 1e-3


# --- bad input -----------------------------------------------------------------------------
def _copy_tiny(tmp_path):
    target = tmp_path / "model"
    shutil.copytree(TINY, target)
    return target


def test_missing_config_or_weights_named(tmp_path):
    target = _copy_tiny(tmp_path)
    (target / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        BertModel.from_pretrained(target)
    (target / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertModel.from_pretrained(target)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        BertModel.from_pretrained(tmp_path / "nowhere")


def test_truncated_or_corrupted_weights_named(tmp_path):
    target = _copy_tiny(tmp_path)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated"):
        BertModel.from_pretrained(target)
    weights.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="corrupted"):
        BertModel.from_pretrained(target)
    weights.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        BertModel.from_pretrained(target)


def test_config_weight_shape_mismatch_names_the_tensor(tmp_path):
    target = _copy_tiny(tmp_path)
    with pytest.raises(CheckpointError, match=r"embeddings.word_embeddings.weight: checkpoint \(64, 32\), model \(65, 32\)"):
        BertModel.from_pretrained(target, vocab_size=65)


def test_missing_and_unexpected_keys_listed(tmp_path):
    target = _copy_tiny(tmp_path)
    state = load_safetensors(target / "model.safetensors")
    del state["pooler.dense.bias"]
    state["cls.predictions.bias"] = np.zeros(64, np.float32)   # another task's head: ignored
    state["encoder.extra.weight"] = np.zeros(3, np.float32)
    save_safetensors(state, target / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: pooler.dense.bias \| unexpected keys: encoder.extra.weight"):
        BertModel.from_pretrained(target)
    BertModel.from_pretrained(target, strict=False)


def test_bad_config_field_named(tmp_path):
    target = _copy_tiny(tmp_path)
    with pytest.raises(ValueError, match=r"config.json: field 'hidden_size' \(32\) must be a multiple"):
        BertModel.from_pretrained(target, num_attention_heads=5)


def test_ids_beyond_vocabulary_and_too_long_sequences():
    model = BertModel.from_pretrained(TINY).eval()
    with pytest.raises(IndexError, match=r"input_ids contain id 64, outside \[0, 64\).*vocab_size"):
        model(np.array([[1, 64]]))
    with pytest.raises(IndexError, match="token_type_ids"):
        model(np.array([[1, 2]]), token_type_ids=np.array([[0, 2]]))
    with pytest.raises(ValueError, match="sequence length 41 exceeds max_position_embeddings 40"):
        model(np.ones((1, 41), np.int64))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\)"):
        model(np.ones((1, 2), np.int64), attention_mask=np.ones((1, 3), np.int64))


# --- the real checkpoint ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_reference():
    return np.load(FIXTURES / "minilm_outputs.npz")


@pytest.mark.pretrained
def test_minilm_outputs_and_gradients_match_transformers(minilm_dir, minilm_reference):
    ref = minilm_reference
    model = BertModel.from_pretrained(minilm_dir).eval()
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    out = model(ref["input_ids"], attention_mask=ref["attention_mask"], token_type_ids=ref["token_type_ids"])
    assert_close(out.last_hidden_state, ref["last_hidden_state"], atol=1e-4, rtol=0, what="last_hidden_state")
    assert_close(out.pooler_output, ref["pooler_output"], atol=1e-4, rtol=0, what="pooler_output")
    loss_of(out).backward()
    params = dict(model.named_parameters())
    # Attention key biases have an analytically zero gradient (softmax ignores a constant
    # added to a row); both libraries leave rounding noise there, so those only must be tiny.
    zero_floor = 1e-6 * float(np.median(ref["grad_norms"]))
    for name, norm in zip(ref["grad_names"], ref["grad_norms"]):
        ours = float(np.linalg.norm(params[str(name)].grad.astype(np.float64)))
        if norm < zero_floor:
            assert "attention.self.key.bias" in str(name) and ours < zero_floor, (name, ours, norm)
        else:
            assert abs(ours - norm) <= 1e-4 * norm, f"grad norm of {name}: {ours} vs {norm}"
    slices = {"embeddings.word_embeddings.weight": (slice(1996, 2000), slice(0, 6)),
              "encoder.layer.0.attention.self.query.weight": (slice(0, 3), slice(0, 5)),
              "encoder.layer.5.output.dense.weight": (slice(10, 13), slice(0, 5)),
              "pooler.dense.weight": (slice(0, 3), slice(0, 5))}
    for name, index in slices.items():
        assert_close(params[name].grad[index], ref[f"grad_slice/{name}"], what=f"grad slice of {name}")


@pytest.mark.pretrained
def test_minilm_padded_batch_equals_each_sentence_alone(minilm_dir, minilm_reference):
    ref = minilm_reference
    model = BertModel.from_pretrained(minilm_dir).eval()
    with minisft.no_grad():
        batch = model(ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state.numpy()
        for i, mask in enumerate(ref["attention_mask"]):
            length = int(mask.sum())
            alone = model(ref["input_ids"][i:i + 1, :length]).last_hidden_state.numpy()
            assert_close(batch[i:i + 1, :length], alone, atol=1e-5, rtol=0, what=f"sentence {i}")
