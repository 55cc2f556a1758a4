"""Module bookkeeping and the layers' own behaviour (their math is in test_ops.py)."""
import numpy as np
import pytest

import minisft
import minisft.nn as nn
from conftest import assert_close


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(4, 3)
        self.LayerNorm = nn.LayerNorm(3, eps=1e-12)
        self.dropout = nn.Dropout(0.1)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(10, 4, padding_idx=0)
        self.layer = nn.ModuleList([Block(), Block()])
        self.shared = self.embeddings  # the same module twice: its parameter appears once

    def forward(self, ids):
        h = self.embeddings(ids)
        for block in self.layer:
            h = block.dropout(block.LayerNorm(block.dense(h)))
            h = minisft.cat([h, h[..., :1]], dim=-1)
        return h


def test_named_parameters_are_dotted_in_definition_order():
    names = [name for name, _ in Model().named_parameters()]
    assert names == ["embeddings.weight",
                     "layer.0.dense.weight", "layer.0.dense.bias",
                     "layer.0.LayerNorm.weight", "layer.0.LayerNorm.bias",
                     "layer.1.dense.weight", "layer.1.dense.bias",
                     "layer.1.LayerNorm.weight", "layer.1.LayerNorm.bias"]


def test_state_dict_round_trip():
    minisft.manual_seed(0)
    source = Model()
    minisft.manual_seed(1)
    target = Model()
    target.load_state_dict({k: v.copy() for k, v in source.state_dict().items()})
    for (name, a), (_, b) in zip(source.named_parameters(), target.named_parameters()):
        assert_close(a, b.numpy(), atol=0, rtol=0, what=name)


def test_load_state_dict_lists_missing_unexpected_and_misshaped():
    state = Model().state_dict()
    state.pop("layer.1.dense.bias")
    state["pooler.dense.weight"] = np.zeros(3)
    state["layer.0.dense.weight"] = np.zeros((5, 5))
    with pytest.raises(KeyError) as error:
        Model().load_state_dict(state)
    message = str(error.value)
    assert "missing keys: layer.1.dense.bias" in message
    assert "unexpected keys: pooler.dense.weight" in message
    assert "layer.0.dense.weight: checkpoint (5, 5), model (3, 4)" in message
    state["layer.0.dense.weight"] = np.zeros((3, 4))
    result = Model().load_state_dict(state, strict=False)
    assert result.missing_keys == ["layer.1.dense.bias"]
    assert result.unexpected_keys == ["pooler.dense.weight"]


def test_train_eval_zero_grad_and_to_dtype():
    model = Model()
    model.eval()
    assert all(not m.training for m in model.modules())
    model.train()
    assert model.layer[1].dropout.training
    model.eval()
    out = model(np.array([[1, 2, 0]]))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert (model.embeddings.weight.grad[0] == 0).all()  # padding_idx gets no gradient
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    model.to(dtype=np.float64)
    assert model(np.array([[1]])).dtype == np.float64


def test_module_to_device(device):
    model = Model().to(device)
    assert all(p.device == minisft.Device(device) for p in model.parameters())
    model.eval()
    assert model(np.array([[1, 2]])).device == minisft.Device(device)


def test_layers_initialise_as_torch():
    minisft.manual_seed(0)
    linear = nn.Linear(400, 300)
    bound = 1 / np.sqrt(400)
    assert np.abs(linear.weight.numpy()).max() <= bound
    assert np.abs(linear.weight.numpy()).max() > 0.95 * bound
    embedding = nn.Embedding(1000, 64, padding_idx=3)
    assert (embedding.weight.numpy()[3] == 0).all()
    assert abs(embedding.weight.numpy().std() - 1) < 0.02
    norm = nn.LayerNorm(8, eps=1e-12)
    assert (norm.weight.numpy() == 1).all() and (norm.bias.numpy() == 0).all() and norm.eps == 1e-12
    assert all(p.dtype == np.float32 for p in (linear.weight, embedding.weight, norm.weight))


def test_dropout_module_follows_training_flag():
    drop = nn.Dropout(0.5)
    x = minisft.tensor(np.ones((100, 100)))
    assert (drop(x).numpy() == 0).any()
    drop.eval()
    assert drop(x) is x


def test_module_without_super_init_says_so():
    class Broken(nn.Module):
        def __init__(self):
            self.dense = nn.Linear(2, 2)

    with pytest.raises(AttributeError, match=r"super\(\).__init__\(\)"):
        Broken()


def test_seeded_initialisation_is_reproducible():
    minisft.manual_seed(5)
    a = nn.Linear(3, 3).weight.numpy()
    minisft.manual_seed(5)
    b = nn.Linear(3, 3).weight.numpy()
    assert (a == b).all()
