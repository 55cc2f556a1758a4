"""The training loop on the tiny model: outputs, exact resume, NaN stop, interrupted
checkpoint writes, early stopping, and the command line's errors."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import minisft
from minisft import cli
from minisft.files.weights import load_safetensors
from minisft.training.trainer import latest_checkpoint
from conftest import FIXTURES, ROOT
from helpers import write_reviews

TINY = FIXTURES / "tiny-bert"


@pytest.fixture
def sentiment(tmp_path):
    """Small csv files of made-up reviews the tiny vocabulary covers."""
    rng = np.random.default_rng(0)
    return write_reviews(tmp_path / "train.csv", 48, rng), write_reviews(tmp_path / "dev.csv", 16, rng)


def train(*extra, output, data):
    train_file, dev_file = data
    return cli.main(["train", "--model", str(TINY), "--train", str(train_file), "--eval", str(dev_file),
                     "--output", str(output), "--batch-size", "4", "--learning-rate", "1e-3",
                     "--logging-steps", "2", *map(str, extra)])


def test_train_writes_a_loadable_model_metrics_and_args(tmp_path, sentiment, capsys):
    output = tmp_path / "out"
    assert train("--epochs", 2, "--eval-steps", 6, output=output, data=sentiment) == 0
    final = json.loads(capsys.readouterr().out)
    assert 0 <= final["eval_accuracy"] <= 1
    files = {p.name for p in output.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json",
            "training_args.json", "metrics.jsonl"} <= files
    assert "best" not in files  # the final model is the best one, moved out of best/, not a second copy
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert json.loads((output / "training_args.json").read_text())["learning_rate"] == 1e-3
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records) and any("eval_accuracy" in r for r in records)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-24"]
    # evaluate and predict read it back
    assert cli.main(["evaluate", "--model", str(output), "--data", str(sentiment[1])]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == final["eval_accuracy"]
    assert cli.main(["predict", "--model", str(output), "--data", str(sentiment[1])]) == 0
    predictions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(predictions) == 16 and set(predictions[0]["probabilities"]) == {"negative", "positive"}


@pytest.mark.parametrize("precision", ["float32", pytest.param("fp16", marks=pytest.mark.skipif(
    not minisft.cuda_available(), reason="--fp16 needs a GPU"))])
def test_resumed_run_ends_with_the_same_weights(tmp_path, sentiment, device, precision):
    """Dropout is on (the tiny config's 0.1), so this also checks the RNG state resumes (on a
    GPU: dropout drawn from (seed, step); with --fp16 the loss scale resumes too)."""
    if precision == "fp16" and device == "cpu":
        pytest.skip("--fp16 runs on a GPU")
    args = ("--max-steps", 10, "--save-steps", 3, "--save-total-limit", 0, "--eval-steps", 4, "--device", device,
            *(("--fp16",) if precision == "fp16" else ()))
    straight = tmp_path / "straight"
    assert train(*args, output=straight, data=sentiment) == 0
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(straight / "checkpoint-3", interrupted / "checkpoint-3")  # no best/ yet: the first evaluation is at 4
    assert train(*args, "--resume", output=interrupted, data=sentiment) == 0
    for name in ("checkpoint-9/model.safetensors", "model.safetensors"):
        a, b = load_safetensors(straight / name), load_safetensors(interrupted / name)
        assert all((a[k] == b[k]).all() for k in a), name


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, capsys):
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "the film was good,1.0\n" * 8 + "the film was bad,1e30\n" * 8)  # (1e30)^2: inf
    output = tmp_path / "out"
    code = cli.main(["train", "--model", str(TINY), "--train", str(data), "--task", "regression",
                     "--output", str(output), "--batch-size", "4", "--no-group-by-length"])
    assert code == 1
    err = capsys.readouterr().err
    assert "the loss was inf" in err and "try a lower --learning-rate" in err


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, sentiment):
    """A child process is killed (SIGKILL) in the middle of writing its second checkpoint."""
    output = tmp_path / "out"
    script = f"""
import os, signal
import minisft.training.checkpoints
real = minisft.training.checkpoints.save_safetensors
calls = []
def save(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 2:   # the optimizer state of the second checkpoint
        open(str(path) + ".partial", "wb").write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    real(tensors, path, metadata)
minisft.training.checkpoints.save_safetensors = save
from minisft import cli
cli.main(["train", "--model", {str(TINY)!r}, "--train", {str(sentiment[0])!r}, "--output", {str(output)!r},
          "--batch-size", "4", "--max-steps", "4", "--save-steps", "2"])
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert result.returncode == -9
    assert latest_checkpoint(output).name == "checkpoint-2"
    assert train("--max-steps", 4, "--save-steps", 2, "--resume", output=output, data=sentiment) == 0
    assert not list(output.glob(".*.tmp"))
    assert latest_checkpoint(output).name == "checkpoint-4"


def test_early_stopping_after_patience(tmp_path, sentiment, capsys):
    output = tmp_path / "out"
    assert train("--learning-rate", 1e-12, "--eval-steps", 1, "--early-stopping-patience", 2,
                 output=output, data=sentiment) == 0
    err = capsys.readouterr().err
    assert "early stopping at step 3" in err


def test_existing_output_directory_is_refused(tmp_path, sentiment, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert train("--max-steps", 1, output=output, data=sentiment) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "mine"


def test_progress_degrades_to_log_lines(tmp_path, sentiment, capsys):
    assert train("--max-steps", 4, output=tmp_path / "out", data=sentiment) == 0
    err = capsys.readouterr().err
    assert "step 2/4" in err and "it/s" in err and "ETA" in err and "\r" not in err


def test_overwrite_starts_clean_but_keeps_other_files(tmp_path, sentiment):
    output = tmp_path / "out"
    assert train("--max-steps", 12, "--eval-steps", 12, output=output, data=sentiment) == 0
    (output / "notes.txt").write_text("mine")
    assert cli.main(["train", "--model", str(TINY), "--train", str(sentiment[0]), "--output", str(output),
                     "--batch-size", "4", "--max-steps", "2", "--overwrite-output-dir"]) == 0
    assert not (output / "best").exists()  # no evaluation in the second run: no stale best model
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 2
    assert (output / "notes.txt").read_text() == "mine"


def test_predict_takes_a_text_file_as_it_takes_standard_input(tmp_path, sentiment, capsys, monkeypatch):
    """A .txt file: a text a line, blank lines skipped; the same records as the CSV's texts.
    evaluate refuses it: it has no labels."""
    import io

    output = tmp_path / "out"
    assert train("--max-steps", 2, output=output, data=sentiment) == 0
    capsys.readouterr()
    texts = [line.rsplit(",", 1)[0] for line in sentiment[1].read_text().splitlines()[1:]]
    (tmp_path / "texts.txt").write_text("\n".join(texts[:3]) + "\n\n" + "\n".join(texts[3:]) + "\n")
    assert cli.main(["predict", "--model", str(output), "--data", str(tmp_path / "texts.txt")]) == 0
    from_text = capsys.readouterr().out
    assert cli.main(["predict", "--model", str(output), "--data", str(sentiment[1])]) == 0
    assert from_text == capsys.readouterr().out and len(from_text.splitlines()) == 16
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts) + "\n"))
    assert cli.main(["predict", "--model", str(output), "--data", "-"]) == 0
    assert capsys.readouterr().out == from_text
    assert cli.main(["evaluate", "--model", str(output), "--data", str(tmp_path / "texts.txt")]) == 2
    assert "texts a line, without labels; evaluate needs labeled data" in capsys.readouterr().err
