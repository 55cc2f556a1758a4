"""What real runs meet: SIGTERM mid-run, a failed write, a non-finite loss, a damaged
checkpoint, a bug inside the engine, a closed pipe, a missing extra."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from minisft import cli
from minisft.files.weights import load_safetensors
from minisft.training import checkpoints
from conftest import ROOT
from test_trainer import TINY, sentiment, train  # noqa: F401 (sentiment: a fixture)

def weights(path):
    return load_safetensors(path)


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_sigterm_during_a_step_checkpoints_that_step_and_resume_is_bit_identical(tmp_path, sentiment, capsys,
                                                                                  monkeypatch):
    """SIGTERM arrives inside step 5's forward pass (dropout on): the run ends 143 with
    checkpoint-5, and --resume ends with the weights of an uninterrupted run."""
    args = ("--max-steps", 9, "--eval-steps", 4)
    straight = tmp_path / "straight"
    assert train(*args, output=straight, data=sentiment) == 0
    from minisft.training import trainer as trainer_module

    real = trainer_module.Trainer._local_loss
    calls = []

    def signalled(self, indices, scale):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, indices, scale)

    monkeypatch.setattr(trainer_module.Trainer, "_local_loss", signalled)
    stopped = tmp_path / "stopped"
    capsys.readouterr()
    assert train(*args, output=stopped, data=sentiment) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 5" in err and "checkpoint-5" in err and "--resume" in err
    assert checkpoints.latest(stopped).name == "checkpoint-5"
    monkeypatch.setattr(trainer_module.Trainer, "_local_loss", real)
    assert train(*args, "--resume", output=stopped, data=sentiment) == 0
    assert_same_weights(straight / "model.safetensors", stopped / "model.safetensors")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_a_flipped_byte_is_named_and_the_output_directory_falls_back(tmp_path, sentiment, capsys):
    output = tmp_path / "out"
    assert train("--max-steps", 6, "--save-steps", 2, "--save-total-limit", 0, output=output, data=sentiment) == 0
    damaged = output / "checkpoint-6" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(data)
    capsys.readouterr()
    assert train("--max-steps", 8, "--resume", str(output / "checkpoint-6"), output=output, data=sentiment) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("minisft train: error:") and str(damaged) in last and "sha256" in last
    assert train("--max-steps", 8, "--resume", str(output), output=output, data=sentiment) == 0
    err = capsys.readouterr().err
    assert "resuming from checkpoint-4 instead" in err and "resumed from" in err and "at step 4" in err


def test_an_inf_batch_stops_naming_its_rows_and_nothing_non_finite_is_written(tmp_path, capsys):
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "the film was good,1.0\n" * 8 + "the film was bad,1e30\n" * 8)  # (1e30)^2: inf
    output = tmp_path / "out"
    base = ["train", "--model", str(TINY), "--train", str(data), "--task", "regression", "--batch-size", "4",
            "--no-group-by-length", "--max-steps", "6", "--save-steps", "1", "--logging-steps", "1"]
    assert cli.main([*base, "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert "the loss was inf" in err and f"{data} line" in err and "checkpoint-" in err
    assert_all_files_finite(output)
    skipping = tmp_path / "skipping"
    assert cli.main([*base, "--output", str(skipping), "--skip-nonfinite-steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "skipped, 1 of the 6" in err
    assert_all_files_finite(skipping)


def assert_all_files_finite(directory):
    for path in directory.rglob("*"):
        if path.suffix == ".safetensors":
            assert all(np.isfinite(v).all() for v in weights(path).values()), path
        elif path.suffix in (".json", ".jsonl"):
            text = path.read_text()
            assert "NaN" not in text and "Infinity" not in text, path


@pytest.mark.parametrize("target", ["checkpoint", "final", "metrics"])
def test_a_failed_write_says_which_file_and_leaves_nothing_partial(tmp_path, sentiment, capsys, monkeypatch, target):
    """ENOSPC injected into the second checkpoint's optimizer state, the final model's
    weights, or the third metrics line."""
    import errno

    from minisft.files import atomic
    from minisft.training import checkpoints as module

    output = tmp_path / "out"
    calls = []

    def failing(real, when):
        def call(*args, **kwargs):
            calls.append(args)
            if when(args):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)
        return call

    if target == "checkpoint":
        monkeypatch.setattr(module, "save_safetensors",
                            failing(module.save_safetensors, lambda args: "checkpoint-4" in str(args[1])))
    elif target == "final":
        from minisft.models import bert
        monkeypatch.setattr(bert, "save_safetensors", failing(bert.save_safetensors, lambda args: ".best.tmp" in str(args[1])))  # the final model is best/'s, moved
    else:
        monkeypatch.setattr(atomic.os, "write", failing(os.write, lambda args: len(calls) == 3))
    capsys.readouterr()
    code = train("--max-steps", 6, "--save-steps", 2, output=output, data=sentiment)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("minisft train: error: cannot write") and "No space left" in err[-1]
    assert not list(output.rglob("*.tmp")) and not list(output.rglob(".*.tmp"))
    if target == "checkpoint":
        checkpoints.verify(output / "checkpoint-2")
    if target == "metrics":
        lines = (output / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2 and all(json.loads(line) for line in lines)


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs (root only; else skipped): room for one checkpoint of the tiny model
    (244 KiB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'}); the injected "
                    "ENOSPC cases stand in")
    yield disk
    subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_disk_that_fills_up_says_which_file_and_leaves_the_last_checkpoint(small_disk, sentiment, capsys):
    output = small_disk / "out"
    capsys.readouterr()
    code = train("--max-steps", 6, "--save-steps", 2, output=output, data=sentiment)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("minisft train: error: cannot write") and "No space left" in err[-1], err
    assert str(output) in err[-1]
    assert not list(output.rglob("*.tmp")) and not list(output.rglob(".*.tmp"))
    assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-2"]
    checkpoints.verify(output / "checkpoint-2")
    lines = (output / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)


def test_a_soak_of_3000_steps_does_not_grow_and_keeps_two_checkpoints(tmp_path):
    """benchmarks/soak_bench.py's run (the tiny BERT, eval and a checkpoint every 100 steps,
    --save-total-limit 2), held to the issue's bounds: resident memory after step 500 grows
    by under 5%, open descriptors do not grow, exactly 2 checkpoints remain."""
    from benchmarks import soak_bench

    m = soak_bench.measure(*soak_bench.soak(tmp_path, soak_bench.STEPS))
    print(m)
    assert m["rss_growth"] < 0.05, m
    assert m["fds_at_end"] <= m["fds"], m
    assert m["checkpoints"] == ["checkpoint-2900", "checkpoint-3000"], m


def test_an_engine_value_error_is_a_bug_with_a_traceback(tmp_path, sentiment, capsys, monkeypatch):
    from minisft.engine import functional

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together with shapes (4,8) (4,9)")

    monkeypatch.setattr(functional, "cross_entropy", broken)
    output = tmp_path / "out"
    assert train("--max-steps", 2, output=output, data=sentiment) == 3
    err = capsys.readouterr().err
    assert "internal error, a bug in minisft (ValueError: operands could not be broadcast" in err
    log = output / "minisft-error.log"
    assert log.is_file() and "Traceback" in log.read_text()


def test_predict_into_head_ends_quietly_and_cuda_without_cupy_is_an_install(tmp_path, sentiment):
    import minisft

    model = tmp_path / "model"
    assert train("--max-steps", 1, output=model, data=sentiment) == 0
    many = tmp_path / "many.txt"
    many.write_text("the film was good\n" * 20000)
    done = subprocess.run(f"{sys.executable} -m minisft predict --model {model} --data {many} | head -1",
                          shell=True, capture_output=True, text=True, cwd=ROOT)
    assert done.stderr == "" and len(done.stdout.splitlines()) == 1
    if not minisft.cuda_available():
        code = train("--max-steps", 1, "--device", "cuda", output=tmp_path / "gpu", data=sentiment)
        assert code == 2


@pytest.mark.parametrize("option", [("--lora-alpha", "16"), ("--lora-dropout", "0.2"), ("--merge-adapters",),
                                    ("--eval-steps", "2"), ("--early-stopping-patience", "2"), ("--metric", "f1"),
                                    ("--eval-batch-size", "4"), ("--max-eval-examples", "4"),
                                    ("--epochs", "2", "--max-steps", "1"), ("--warmup-ratio", "0.1", "--warmup-steps", "1"),
                                    ("--freeze-embeddings", "--lora-r", "4"), ("--freeze-layers", "1", "--lora-r", "4")])
def test_an_option_without_effect_is_refused_by_name(tmp_path, sentiment, capsys, option):
    capsys.readouterr()
    code = cli.main(["train", "--model", str(TINY), "--train", str(sentiment[0]), "--output", str(tmp_path / "out"),
                     *(() if "--max-steps" in option else ("--max-steps", "1")), *option])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"minisft train: error: {option[0]} ")
    assert "has no effect with" in err[0] and not (tmp_path / "out").exists()
