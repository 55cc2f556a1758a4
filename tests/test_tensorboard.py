"""--report-to tensorboard: TensorBoard's own reader finds every scalar of metrics.jsonl under
the same name and step; without the log extra, one line naming the install."""
import json
import sys

import numpy as np
import pytest

from minisft import cli
from conftest import FIXTURES
from helpers import write_reviews


def _train(tmp_path, *extra):
    rng = np.random.default_rng(0)
    train, dev = write_reviews(tmp_path / "train.csv", 16, rng), write_reviews(tmp_path / "dev.csv", 8, rng)
    return cli.main(["train", "--model", str(FIXTURES / "tiny-bert"), "--train", str(train), "--eval", str(dev),
                     "--test", str(dev), "--output", str(tmp_path / "out"), "--batch-size", "4", "--max-steps", "4",
                     "--logging-steps", "1", "--eval-steps", "2", *extra])


def test_every_scalar_of_metrics_jsonl_is_an_event(tmp_path):
    pytest.importorskip("tensorboardX")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    assert _train(tmp_path, "--report-to", "tensorboard") == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    expected = {}
    for record in records:
        for name, value in record.items():
            if name != "step":
                expected.setdefault(name, []).append((record["step"], value))
    assert {"loss", "learning_rate", "epoch", "eval_accuracy", "test_accuracy"} <= set(expected)
    events = accumulator.EventAccumulator(str(tmp_path / "out" / "runs"), size_guidance={accumulator.SCALARS: 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, points in expected.items():
        found = [(e.step, e.value) for e in events.Scalars(name)]
        # TensorBoard keeps a scalar as a float32
        assert found == [(step, float(np.float32(value))) for step, value in points], name


def test_without_the_log_extra_the_run_stops_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX raises ImportError
    assert _train(tmp_path, "--report-to", "tensorboard") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("minisft train: error: --report-to 'tensorboard': needs tensorboardX, which the log extra "
                       "installs; pip install -e '.[log]', or leave --report-to out")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
