"""`minisft mine-hard-negatives` against sentence-transformers' mine_hard_negatives
(tests/fixtures/make_sentence_fixtures.py: the same tiny model, pairs and settings), and
the command line."""
import csv
import json

import pytest

from minisft import cli
from minisft.cli import mining, workflows
from conftest import FIXTURES

CASES = json.loads((FIXTURES / "hard_negatives_cases.json").read_text())
TINY = FIXTURES / "tiny-bert"


@pytest.mark.parametrize("case", CASES["cases"], ids=[json.dumps(c["settings"]) for c in CASES["cases"]])
def test_the_mined_rows_are_sentence_transformers(case):
    settings = mining.Mining(**case["settings"])
    anchors, positives = zip(*CASES["pairs"])
    rows, _ = mining.mine(list(anchors), list(positives), workflows._embedder(str(TINY), 64, "cpu"), settings)
    assert mining.columns("anchor", "positive", settings) == case["columns"]
    assert [list(row) for row in rows] == case["rows"]


def _pairs(path):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("anchor", "positive"), *CASES["pairs"]])
    return path


def test_the_command_writes_triplets_that_train(tmp_path, capsys):
    output = tmp_path / "triplets.csv"
    assert cli.main(["mine-hard-negatives", "--model", str(TINY), "--data", str(_pairs(tmp_path / "pairs.csv")),
                     "--output", str(output), "--num-negatives", "2", "--output-format", "n-tuple"]) == 0
    assert f"wrote {output}: 14 rows for 12 anchors" in capsys.readouterr().err
    with open(output, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["anchor", "positive", "negative_1", "negative_2"] and len(rows) == 15
    assert cli.main(["train", "--model", str(TINY), "--task", "embedding", "--train", str(output), "--output",
                     str(tmp_path / "emb"), "--batch-size", "4", "--max-steps", "2"]) == 0


@pytest.mark.parametrize("extra, message", [
    (("--output", "missing/t.csv"), "--output 'missing/t.csv': its directory missing does not exist"),
    (("--output", "t.parquet"), "not a .csv, .tsv or .jsonl file"),
    (("--output", "t.csv", "--range-min", "5", "--range-max", "5"), "--range-min 5: not below --range-max 5"),
    (("--output", "t.csv", "--num-negatives", "4", "--range-max", "3"), "--num-negatives 4: more than the 3"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["mine-hard-negatives", "--model", str(TINY), "--data", str(_pairs(tmp_path / "pairs.csv")), *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "t.csv").exists()
