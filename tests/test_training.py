"""Fine-tuning parity with transformers: same initial weights (head included), same batches,
dropout off, AdamW with no-decay groups, linear warmup and decay, clipping."""
import numpy as np
import pytest

import minisft
from minisft.models.bert import BertForSequenceClassification
from minisft.optim import AdamW, clip_grad_norm_, get_linear_schedule_with_warmup, parameter_groups
from conftest import FIXTURES

REF = np.load(FIXTURES / "training_reference.npz")


def _losses(model, prefix, steps, lr, warmup, device="cpu"):
    model.classifier.weight.data = REF[f"{prefix}/classifier.weight"].copy()
    model.classifier.bias.data = REF[f"{prefix}/classifier.bias"].copy()
    model.to(device)
    optimizer = AdamW(parameter_groups(model, 0.01), lr=lr)
    schedule = get_linear_schedule_with_warmup(optimizer, warmup, steps)
    model.train()
    losses = []
    for step in range(steps):
        batch = {k: REF[f"{prefix}/batch/{step}/{k}"]
                 for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"], labels=batch["labels"])
        losses.append(out.loss.item())
        out.loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return np.array(losses)


def test_tiny_bert_twenty_steps_match_transformers(device):
    model = BertForSequenceClassification.from_pretrained(
        FIXTURES / "tiny-bert", num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    losses = _losses(model, "tiny", 20, lr=3e-3, warmup=3, device=device)
    expected = REF["tiny/losses"]
    assert expected[-1] < expected[0] * 0.9, "the reference run should learn something"
    np.testing.assert_allclose(losses, expected, rtol=1e-5 if device == "cpu" else 1e-4, atol=0)  # GPU: other sums


@pytest.mark.pretrained
def test_minilm_batch_of_eight_matches_transformers(minilm_dir):
    model = BertForSequenceClassification.from_pretrained(
        minilm_dir, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    losses = _losses(model, "minilm", 4, lr=5e-5, warmup=1)
    np.testing.assert_allclose(losses, REF["minilm/losses"], rtol=1e-4, atol=0)


@pytest.mark.pretrained
@pytest.mark.skipif(not minisft.cuda_available(), reason="compares the GPU with the CPU")
def test_minilm_gradients_on_the_gpu_equal_the_cpu(minilm_dir):
    """One 8x128 step of all-MiniLM-L6-v2 without dropout: every gradient on cuda within 1e-3
    of the CPU's, relative to the gradient's largest entry."""
    rng = np.random.default_rng(0)
    ids, labels = rng.integers(1000, 20000, (8, 128)), rng.integers(0, 2, 8)
    mask = np.ones_like(ids)
    mask[3, 90:] = 0
    grads = []
    for device in ("cpu", "cuda"):
        model = BertForSequenceClassification.from_pretrained(
            minilm_dir, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model.classifier.weight.data = REF["minilm/classifier.weight"].copy()
        model.to(device).train()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({name: minisft.Device("cpu").put(p.grad) for name, p in model.named_parameters()})
    for name, expected in grads[0].items():
        error = np.abs(grads[1][name] - expected).max() / max(np.abs(expected).max(), 1e-12)
        assert error <= 1e-3, f"{name}: relative error {error:.3g}"
