"""Mixed precision (minisft.engine.amp): float16 products under autocast over float32 weights, loss
scaling with skipped steps, and float16 parameters that Adam updates without NaN."""
import numpy as np

import minisft
from minisft import functional as F
from minisft.engine import amp
from minisft.models.bert import BertForSequenceClassification
from minisft.optim import AdamW, clip_grad_norm_, parameter_groups
from conftest import FIXTURES, assert_close

REF = np.load(FIXTURES / "training_reference.npz")


def test_linear_under_autocast_multiplies_in_float16_and_returns_float32(device):
    rng = np.random.default_rng(0)
    x = minisft.tensor(rng.standard_normal((4, 6, 16)), requires_grad=True, device=device)
    weight = minisft.tensor(rng.standard_normal((8, 16)) * 0.1, requires_grad=True, device=device)
    bias = minisft.tensor(rng.standard_normal(8), requires_grad=True, device=device)
    g = rng.standard_normal((4, 6, 8)).astype(np.float32)
    expected = F.linear(x, weight, bias)
    expected.backward(g)
    reference = [t.grad.copy() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    with amp.autocast():
        y = F.linear(x, weight, bias)
    y.backward(g)
    assert y.dtype == np.float32 and all(t.grad.dtype == np.float32 for t in (x, weight, bias))
    assert_close(y, expected.numpy(), atol=1e-2, rtol=1e-2, what="output")
    assert not np.array_equal(y.numpy(), expected.numpy()), "autocast should round the product to float16"
    for t, grad, name in zip((x, weight, bias), reference, ("dx", "dW", "db")):
        assert_close(t.grad, minisft.Device("cpu").put(grad), atol=3e-2, rtol=1e-2, what=name)
    assert_close(bias.grad, minisft.Device("cpu").put(reference[2]), atol=1e-5, what="db (summed in float32)")


def _tiny_losses(device, fp16, steps=20):
    minisft.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        FIXTURES / "tiny-bert", num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.classifier.weight.data = REF["tiny/classifier.weight"].copy()
    model.classifier.bias.data = REF["tiny/classifier.bias"].copy()
    model.to(device).train()
    optimizer = AdamW(parameter_groups(model, 0.01), lr=3e-3)
    scaler = amp.GradScaler() if fp16 else None
    losses, skipped = [], 0
    for step in range(steps):
        batch = {k: REF[f"tiny/batch/{step}/{k}"] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
        with amp.autocast(enabled=fp16):
            loss = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"], labels=batch["labels"]).loss
        losses.append(loss.item())
        (scaler.scale(loss) if fp16 else loss).backward()
        overflow = fp16 and scaler.unscale_(model.parameters())
        if not overflow:
            clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        skipped += bool(overflow)
        if fp16:
            scaler.update(overflow)
        optimizer.zero_grad()
    assert all(p.dtype == np.float32 for p in model.parameters()), "master weights stay float32"
    return np.array(losses), skipped


def test_twenty_fp16_steps_track_float32_within_one_percent(device):
    full, _ = _tiny_losses(device, fp16=False)
    mixed, skipped = _tiny_losses(device, fp16=True)
    assert skipped == 0
    assert full[-1] < full[0] * 0.9
    np.testing.assert_allclose(mixed, full, rtol=1e-2)


def test_scaler_skips_an_overflowed_step_and_halves_then_grows():
    scaler = amp.GradScaler(init_scale=8.0, growth_interval=2)
    param = minisft.tensor(np.ones(3), requires_grad=True)
    param.grad = np.array([8.0, np.inf, 16.0], dtype=np.float32)
    assert scaler.unscale_([param])
    scaler.update(True)
    assert scaler.scale_value == 4.0
    param.grad = np.array([4.0, 8.0, 12.0], dtype=np.float32)
    assert not scaler.unscale_([param])
    np.testing.assert_array_equal(param.grad, [1.0, 2.0, 3.0])
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale_value == 8.0
    restored = amp.GradScaler()
    restored.load_state_dict(scaler.state_dict())
    assert (restored.scale_value, restored.good_steps) == (8.0, 0)


def test_adam_updates_float16_parameters_through_float32(device):
    """eps = 1e-8 is 0 in float16: a float16 moment of 0 would divide by zero."""
    param = minisft.tensor(np.ones(4), dtype=np.float16, requires_grad=True, device=device)
    optimizer = AdamW([param], lr=1e-3)
    for _ in range(3):
        param.grad = minisft.Device(device).put(np.array([0.0, 1e-3, -1.0, 0.0], dtype=np.float16))
        optimizer.step()
    values = param.numpy()
    assert param.dtype == np.float16 and np.isfinite(values).all()
    assert values[2] > 1.0 and values[1] < 1.0
    assert optimizer.state[id(param)]["exp_avg_sq"].dtype == np.float32


def test_cli_refuses_fp16_on_the_cpu(tmp_path, capsys):
    from minisft.cli import main

    data = tmp_path / "train.csv"
    data.write_text("text,label\na,0\nb,1\n", encoding="utf-8")
    assert main(["train", "--model", str(FIXTURES / "tiny-bert"), "--train", str(data), "--output",
                 str(tmp_path / "out"), "--fp16"]) == 2
    err = capsys.readouterr().err
    assert "--fp16" in err and "--device cuda" in err
    assert not (tmp_path / "out").exists()
