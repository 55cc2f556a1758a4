"""Fine-tuning parity with transformers: same initial weights (head included), same batches,
dropout off, AdamW with no-decay groups, linear warmup and decay, clipping."""
import numpy as np
import pytest

from minisft.models.bert import BertForSequenceClassification
from minisft.optim import AdamW, clip_grad_norm_, get_linear_schedule_with_warmup, parameter_groups
from conftest import FIXTURES

REF = np.load(FIXTURES / "training_reference.npz")


def _losses(model, prefix, steps, lr, warmup):
    model.classifier.weight.data = REF[f"{prefix}/classifier.weight"].copy()
    model.classifier.bias.data = REF[f"{prefix}/classifier.bias"].copy()
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


def test_tiny_bert_twenty_steps_match_transformers():
    model = BertForSequenceClassification.from_pretrained(
        FIXTURES / "tiny-bert", num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    losses = _losses(model, "tiny", 20, lr=3e-3, warmup=3)
    expected = REF["tiny/losses"]
    assert expected[-1] < expected[0] * 0.9, "the reference run should learn something"
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=0)


@pytest.mark.pretrained
def test_minilm_batch_of_eight_matches_transformers(minilm_dir):
    model = BertForSequenceClassification.from_pretrained(
        minilm_dir, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    losses = _losses(model, "minilm", 4, lr=5e-5, warmup=1)
    np.testing.assert_allclose(losses, REF["minilm/losses"], rtol=1e-4, atol=0)
