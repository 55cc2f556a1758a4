"""The command line with the real checkpoint and fetched data sets (marked `pretrained`)."""
import json
import subprocess
import sys

import pytest

from minisft import cli
from conftest import ROOT


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "minisft", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    for command in ("fetch", "train", "evaluate", "predict"):
        assert command in result.stdout
    train_help = subprocess.run([sys.executable, "-m", "minisft", "train", "--help"], capture_output=True,
                                text=True, cwd=ROOT).stdout
    for option in ("--learning-rate", "--warmup-steps", "--early-stopping-patience", "--resume", "--label-all-tokens"):
        assert option in train_help


@pytest.mark.pretrained
def test_token_classification_on_wnut16_reports_entity_f1(minilm_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # data/ and weights/ of the checkout
    output = tmp_path / "ner"
    code = cli.main(["train", "--model", str(minilm_dir), "--train", "wnut16", "--output", str(output),
                     "--max-steps", "4", "--batch-size", "8", "--learning-rate", "1e-4"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"eval_f1", "eval_precision", "eval_recall", "eval_accuracy"} <= set(metrics)
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"] and "B-person" in config["label2id"].keys()
    assert cli.main(["predict", "--model", str(output), "--data", "wnut16:test"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(first["tokens"]) == len(first["labels"])
