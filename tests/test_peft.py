"""Lean fine-tuning: freezing, LoRA adapters in peft's layout (equal logits to peft's), merging,
and the command-line flags."""
import json
import re
import shutil

import numpy as np
import pytest

from minisft import cli, lean, manual_seed, peft
from minisft.models.auto import AutoModelForSequenceClassification
from minisft.optim import AdamW, parameter_groups
from conftest import FIXTURES

TINY = FIXTURES / "tiny-bert"


def _classifier(name="bert"):
    manual_seed(0)  # the same new head each time
    return AutoModelForSequenceClassification.from_pretrained(FIXTURES / f"tiny-{name}", num_labels=3).eval()


def _batch():
    ids = np.random.default_rng(0).integers(5, 64, (3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("name", ["bert", "distilbert", "electra", "roberta"])
def test_frozen_parameters_get_no_gradient_no_state_and_the_rest_the_same_gradient(name):
    ids, mask = _batch()
    full, lean = _classifier(name), peft.freeze(_classifier(name), embeddings=True, layers=1)
    for model in (full, lean):
        model(ids, attention_mask=mask, labels=np.array([0, 1, 2])).loss.backward()
    frozen = {n for n, p in lean.named_parameters() if not p.requires_grad}
    layer0 = "transformer.layer.0." if name == "distilbert" else "encoder.layer.0."
    assert frozen and all(".embeddings." in n or layer0 in n for n in frozen)
    assert any(layer0 in n for n in frozen) and any(".embeddings." in n for n in frozen)
    grads = dict(full.named_parameters())
    for n, p in lean.named_parameters():
        if n in frozen:
            assert p.grad is None
        else:
            np.testing.assert_allclose(p.grad, grads[n].grad, rtol=1e-5, atol=1e-7)
    optimizer = AdamW(parameter_groups(lean, 0.01), lr=1e-3)
    optimizer.step()
    assert len(optimizer.state) == len(list(lean.parameters())) - len(frozen)


def test_a_frozen_linear_keeps_neither_its_input_nor_computes_its_weight_gradient():
    from minisft import tensor
    import minisft.functional as F

    x = tensor(np.random.randn(4, 3), requires_grad=True)
    frozen = tensor(np.random.randn(2, 3))
    out = F.linear(x, frozen)
    assert out._ctx.saved[0] is None  # no x kept: dW is not wanted
    out.sum().backward()
    np.testing.assert_allclose(x.grad, np.ones((4, 2)) @ frozen.numpy(), rtol=1e-6)


def test_freezing_more_layers_than_there_are_is_refused():
    with pytest.raises(ValueError, match=r"--freeze-layers 3: the model has 2 layers; give 0 to 2"):
        peft.freeze(_classifier(), layers=3)


def test_lora_starts_from_the_base_model_and_trains_only_adapters_and_head():
    ids, mask = _batch()
    base = _classifier()
    expected = base(ids, attention_mask=mask).logits.numpy()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8))
    np.testing.assert_allclose(model(ids, attention_mask=mask).logits.numpy(), expected, rtol=1e-6, atol=1e-7)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted([f"model.bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight"
                                for i in range(2) for m in ("query", "value") for ab in "AB"]
                               + ["model.classifier.weight", "model.classifier.bias"])
    a = model.adapters()[0][1].lora_A.weight.numpy()
    assert np.abs(a).max() <= 1 / np.sqrt(32) and a.std() > 0.05  # U(-1/sqrt(in), 1/sqrt(in))


def test_merge_and_unmerge_give_the_adapted_output():
    ids, mask = _batch()
    model = peft.get_peft_model(_classifier(), peft.LoraConfig(r=4, lora_alpha=8))
    for _, adapter in model.adapters():
        adapter.lora_B.weight.data = np.random.default_rng(1).normal(0, 0.2, adapter.lora_B.weight.shape).astype(np.float32)
    adapted = model(ids, attention_mask=mask).logits.numpy()
    model.merge_adapter()
    np.testing.assert_allclose(model(ids, attention_mask=mask).logits.numpy(), adapted, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    np.testing.assert_allclose(model(ids, attention_mask=mask).logits.numpy(), adapted, rtol=1e-5, atol=1e-6)
    plain = model.merge_and_unload()
    np.testing.assert_allclose(plain(ids, attention_mask=mask).logits.numpy(), adapted, rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in plain.parameters()) and "lora" not in " ".join(plain.state_dict())


def test_a_peft_adapter_gives_peft_s_logits():
    """tiny-bert-lora was written by peft (make_lora_fixtures.py) with a random B."""
    reference = np.load(FIXTURES / "tiny_bert_lora_outputs.npz")
    model = peft.load_adapter(_classifier(), FIXTURES / "tiny-bert-lora").eval()
    logits = model(reference["input_ids"], attention_mask=reference["attention_mask"]).logits.numpy()
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-5)


def test_peft_loads_what_minisft_saves(tmp_path):
    torch = pytest.importorskip("torch")
    reference_peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    ids, mask = _batch()
    model = peft.load_adapter(_classifier(), FIXTURES / "tiny-bert-lora")
    model.save_pretrained(tmp_path)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(TINY, num_labels=3)
    theirs = reference_peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        expected = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(model.eval()(ids, attention_mask=mask).logits.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("config, message", [
    (dict(r=0), r"LoRA r 0: the rank must be a positive integer"),
    (dict(target_modules=["attn"]), r"match no Linear layer of BertForSequenceClassification; its Linear layers "
                                    r"are: query, key, value, dense, classifier"),
])
def test_bad_lora_settings_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        peft.get_peft_model(_classifier(), peft.LoraConfig(**config))


def _train_csv(tmp_path):
    rows = [f"the film was {w},{label}" for w, label in (("good", "pos"), ("bad", "neg"), ("great", "pos"))] * 4
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    return str(tmp_path / "train.csv")


def test_the_command_line_trains_saves_evaluates_and_merges_adapters(tmp_path, capsys):
    data = _train_csv(tmp_path)
    common = ["--model", str(TINY), "--train", data, "--max-steps", "4", "--batch-size", "4", "--lora-r", "4",
              "--learning-rate", "1e-2", "--lora-target-modules", "query,value"]
    assert cli.main(["train", *common, "--output", str(tmp_path / "lora")]) == 0
    saved = {p.name for p in (tmp_path / "lora").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json"} <= saved
    assert "model.safetensors" not in saved
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["query", "value"] and config["task_type"] == "SEQ_CLS"
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(tmp_path / "lora"), "--data", data]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)
    assert cli.main(["train", *common, "--output", str(tmp_path / "merged"), "--merge-adapters"]) == 0
    merged = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in merged and "adapter_config.json" not in merged
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(tmp_path / "merged"), "--data", data]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["label"] in ("pos", "neg")


def test_bad_lean_options_stop_before_anything_is_written(tmp_path, capsys):
    data = _train_csv(tmp_path)
    for flags, message in ((["--freeze-layers", "3"], "--freeze-layers 3: the model has 2 layers"),
                           (["--lora-r", "4", "--lora-target-modules", "attn"], "its Linear layers are: query"),
                           (["--lora-r", "-1"], "--lora-r")):
        try:
            code = cli.main(["train", "--model", str(TINY), "--train", data, "--output", str(tmp_path / "out"),
                             "--batch-size", "4", *flags])
        except SystemExit as exc:  # refused while parsing
            code = exc.code
        assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_adapter_whose_base_is_gone_is_named(tmp_path, capsys):
    data = _train_csv(tmp_path)
    assert cli.main(["train", "--model", str(TINY), "--train", data, "--output", str(tmp_path / "lora"),
                     "--max-steps", "2", "--batch-size", "4", "--lora-r", "2"]) == 0
    path = tmp_path / "lora" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": str(tmp_path / "gone")}))
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(tmp_path / "lora"), "--data", data]) == 2
    assert "its base checkpoint (base_model_name_or_path)" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "lora")


@pytest.mark.parametrize("frozen_embeddings", [True, False])
@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_gradient_checkpointing_gives_the_same_gradients_with_dropout_and_keeps_less(name, frozen_embeddings):
    from minisft.inspect import summary

    ids, mask = _batch()
    results = []
    for checkpointing in (False, True):
        model = _classifier(name).train()  # dropout on: the recomputation must draw the same masks
        if checkpointing:
            lean.gradient_checkpointing(model)
        if frozen_embeddings:  # layer 0's input then needs no gradient
            peft.freeze(model, embeddings=True)
        manual_seed(5)
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": np.array([0, 1, 2])}
        rows = summary.summarize(model, inputs)
        layers = [row.activation_bytes for row in rows if re.fullmatch(r".*\.layer\.\d+", row.path)]
        embedded = next(row.activation_bytes for row in rows if re.fullmatch(r"\w+\.embeddings", row.path))
        results.append((rows[0].activation_bytes, layers, embedded, {n: p.grad for n, p in model.named_parameters()}))
    (kept, layers, embedded, plain), (kept_checkpointed, layers_checkpointed, embedded_checkpointed, checkpointed) = results
    assert set(plain) == set(checkpointed)
    for n, grad in plain.items():
        assert (grad is None and checkpointed[n] is None) or np.array_equal(grad, checkpointed[n]), n
    # every layer but the last keeps nothing inside but its input, (B, L, H) float32; the last
    # keeps its activations (its backward comes right away), its feed-forward's pre-activation
    # alone where the feed-forward is fused (lean_activations), so no more than without
    width = getattr(model.config, "hidden_size", None) or model.config.dim
    assert len(layers) >= 2 and all(layers) and layers_checkpointed[:-1] == [ids.size * width * 4] * (len(layers) - 1)
    assert 0 < layers_checkpointed[-1] <= layers[-1]
    assert kept_checkpointed < kept - 0.5 * sum(layers[:-1])
    if not frozen_embeddings:  # the embeddings are recomputed too: they keep the ids alone
        assert embedded > 0 and embedded_checkpointed == ids.astype(np.int64).nbytes
