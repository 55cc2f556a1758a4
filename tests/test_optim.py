"""Optimisers, schedules and clipping against torch.optim / transformers' stored results."""
import math

import numpy as np
import pytest

import minisft
from minisft import nn
from minisft.optim import (SGD, Adam, AdamW, clip_grad_norm_, get_constant_schedule_with_warmup,
                           get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup,
                           parameter_groups)
from conftest import FIXTURES, assert_close

REF = np.load(FIXTURES / "optim_reference.npz")
OPTIMIZERS = {
    "sgd_momentum": lambda g: SGD(g, lr=0.05, momentum=0.9, weight_decay=0.01),
    "sgd_nesterov": lambda g: SGD(g, lr=0.05, momentum=0.9, nesterov=True),
    "sgd_plain": lambda g: SGD(g, lr=0.1),
    "adam": lambda g: Adam(g, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
    "adamw": lambda g: AdamW(g, lr=1e-2, weight_decay=0.1),
}
COUNT = sum(1 for k in REF.files if k.startswith("initial/"))


def _params(device):
    return [nn.Parameter(minisft.tensor(REF[f"initial/{i}"], device=device)) for i in range(COUNT)]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_hundred_steps_equal_torch_optim(name, device, kernel_set):
    params = _params(device)
    optimizer = OPTIMIZERS[name]([{"params": params[:-1]}, {"params": params[-1:], "weight_decay": 0.0}])
    for t in range(100):
        for i, p in enumerate(params):
            p.grad = minisft.Device(device).put(REF[f"grad/{t}/{i}"].copy())
        optimizer.step()
    for i, p in enumerate(params):
        assert_close(p, REF[f"{name}/final/{i}"], atol=1e-6, rtol=1e-6, what=f"{name} parameter {i}")


def test_state_dict_round_trip_continues_identically():
    def run(split):
        params = _params("cpu")
        optimizer = AdamW(params, lr=1e-2)
        for t in range(10):
            if t == split:
                state = optimizer.state_dict()
                params = [nn.Parameter(minisft.tensor(p.numpy())) for p in params]
                optimizer = AdamW(params, lr=1e-2)
                optimizer.load_state_dict(state)
            for i, p in enumerate(params):
                p.grad = REF[f"grad/{t}/{i}"].copy()
            optimizer.step()
        return [p.numpy() for p in params]

    for a, b in zip(run(None), run(4)):
        assert (a == b).all()


@pytest.mark.parametrize("name, make", [
    ("linear", lambda o: get_linear_schedule_with_warmup(o, 7, 50)),
    ("cosine", lambda o: get_cosine_schedule_with_warmup(o, 7, 50)),
    ("constant", lambda o: get_constant_schedule_with_warmup(o, 7))])
def test_schedules_equal_transformers(name, make):
    optimizer = SGD([nn.Parameter(np.zeros(1, np.float32))], lr=0.1)
    schedule = make(optimizer)
    lrs = []
    for _ in range(55):
        lrs.append(schedule.get_last_lr()[0])
        schedule.step()
    np.testing.assert_allclose(lrs, REF[f"schedule/{name}"], rtol=1e-12, atol=1e-15)
    restored = make(SGD([nn.Parameter(np.zeros(1, np.float32))], lr=0.1))
    restored.load_state_dict(schedule.state_dict())
    assert restored.get_last_lr() == schedule.get_last_lr()


def test_clip_grad_norm_equals_torch(device):
    params = _params(device)
    for i, p in enumerate(params):
        p.grad = minisft.Device(device).put(REF[f"grad/0/{i}"] * 3)
    norm = clip_grad_norm_(params, 1.0)
    assert abs(norm - float(REF["clip/norm"])) <= 1e-5 * float(REF["clip/norm"])
    for i, p in enumerate(params):
        assert_close(p.grad, REF[f"clip/grad/{i}"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm_type", [2.0, 3.0, math.inf])
def test_clip_grad_norm_reads_one_total_for_every_norm(device, norm_type):
    params = _params(device)
    grads = [REF[f"grad/0/{i}"] * 3 for i in range(len(params))]
    for p, g in zip(params, grads):
        p.grad = minisft.Device(device).put(g)
    flat = np.concatenate([g.ravel() for g in grads]).astype(np.float64)
    expected = np.abs(flat).max() if norm_type == math.inf else (np.abs(flat) ** norm_type).sum() ** (1 / norm_type)
    norm = clip_grad_norm_(params, 1.0, norm_type=norm_type)
    assert isinstance(norm, float) and abs(norm - expected) <= 1e-5 * expected


def test_no_decay_groups_take_biases_and_layernorm_weights():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(2, 2)
            self.LayerNorm = nn.LayerNorm(2)

    decay, plain = parameter_groups(Block(), 0.01)
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert len(decay["params"]) == 1 and len(plain["params"]) == 3


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="empty parameter list"):
        AdamW([])
    with pytest.raises(ValueError, match="betas"):
        Adam([nn.Parameter(np.zeros(1, np.float32))], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="unknown group options"):
        SGD([{"params": [nn.Parameter(np.zeros(1, np.float32))], "momentun": 0.9}])
