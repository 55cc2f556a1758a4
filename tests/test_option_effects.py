"""No option is silently ignored: hypothesis draws combinations of `minisft train` options, and
each combination is either refused by name (exit 2, one line naming a given option) or, when
accepted, every option in it changes what the run produces: remove it and the weights, metrics,
files or console lines differ (or the rest is refused).

What a run produces, for this comparison: every file of --output with its bytes (JSON without
the arguments that training_args.json and trainer_state.json record, and without it_per_s;
sha256sums.json left out, as its digests are of files compared anyway), and
the console with its timings and the output path taken out. A few options act only when the run
reaches a bound; for those, the run without the option says whether it would have:
- --save-total-limit 1 acts only where more than one checkpoint was written;
- --metric acts only where it picks another evaluation as the best;
- --early-stopping-patience 1 acts only where an evaluation before the last one does not improve;
- an option of the optimisation (OPTIMISATION) can act on the steps after the returned model
  alone, where the run stops early: step 2's update with --warmup-steps 1 (step 1's learning
  rate 0) and --eval-steps 1, say; where the run without it stopped early, it is not compared.

Not drawn, with where they are tested instead: --gradient-checkpointing and --eval-batch-size
change only memory and time, and their results are held equal (test_lean, test_trainer);
--skip-nonfinite-steps acts only on a non-finite step (test_faults gives it one); --resume and
--overwrite-output-dir act on an existing output directory (test_trainer); --device is the
machine."""
import contextlib
import hashlib
import io
import json
import pathlib
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minisft import cli
from minisft.inspect import viz
from conftest import FIXTURES
from helpers import NEGATIVE, POSITIVE

TINY = FIXTURES / "tiny-bert"
# (flag, values): a value unlike the default, so that it can act (the warmups leave at least 3 steps of
# decay, where a linear and a cosine schedule differ: over 2 they meet at 1, 1/2 and 0)
POOL = [("--eval", ["DEV"]), ("--test", ["DEV"]), ("--learning-rate", ["0.05"]), ("--batch-size", ["4"]),
        ("--epochs", ["2"]), ("--max-steps", ["5"]), ("--gradient-accumulation-steps", ["2"]),
        ("--warmup-steps", ["1"]), ("--warmup-ratio", ["0.25"]), ("--weight-decay", ["0.1"]),
        ("--max-grad-norm", ["1e-4"]), ("--scheduler", ["cosine", "constant"]), ("--eval-steps", ["1"]),
        ("--save-steps", ["2"]), ("--save-total-limit", ["1"]), ("--logging-steps", ["1"]),
        ("--metric", ["f1", "mcc"]), ("--early-stopping-patience", ["1"]), ("--seed", ["7"]),
        ("--no-group-by-length", []), ("--max-length", ["6"]), ("--freeze-embeddings", []),
        ("--freeze-layers", ["1"]), ("--lora-r", ["4"]), ("--lora-alpha", ["4"]), ("--lora-dropout", ["0.3"]),
        ("--lora-target-modules", ["query,key,value"]), ("--merge-adapters", []),
        ("--class-weights", ["positive=3", "balanced"]), ("--text-column", ["review"]),
        ("--text-pair-column", ["review"]), ("--label-column", ["stars"]), ("--max-train-examples", ["20"]),
        ("--max-eval-examples", ["8"]), ("--report-to", ["tensorboard"]), ("--plot", [])]
# options that cannot act here: a GPU's, and other tasks' (each one refused for classification)
FOREIGN = [("--fp16", []), ("--label-all-tokens", []), ("--doc-stride", ["64"]), ("--skip-misaligned", []),
           ("--threshold", ["0.3"]), ("--label-separator", ["|"]), ("--matryoshka-dims", ["16,8"])]
# what makes a drawn combination one that can be accepted: an option's prerequisite added, or
# the option that another overrides left out
PREREQUISITE = {**dict.fromkeys(["--lora-alpha", "--lora-dropout", "--lora-target-modules", "--merge-adapters"],
                                ("--lora-r", "4")),
                **dict.fromkeys(["--eval-steps", "--early-stopping-patience", "--metric", "--max-eval-examples"],
                                ("--eval", "DEV"))}
OVERRIDES = {"--epochs": "--max-steps", "--warmup-ratio": "--warmup-steps", "--freeze-embeddings": "--lora-r",
             "--freeze-layers": "--lora-r"}
OPTIMISATION = {"--learning-rate", "--batch-size", "--gradient-accumulation-steps", "--warmup-steps", "--warmup-ratio",
                "--weight-decay", "--max-grad-norm", "--scheduler", "--seed", "--no-group-by-length", "--freeze-embeddings",
                "--freeze-layers", "--lora-alpha", "--lora-dropout", "--class-weights", "--max-train-examples"}
FLAGS = [flag for flag, _ in POOL + FOREIGN]
# the arguments as given (the option itself), and a checkpoint's digests of files compared anyway
UNCOMPARED = ("training_args.json", "sha256sums.json")
TIMINGS = re.compile(r"[\d.]+ it/s|ETA [\d:]+")


def write_rows(path, count, rng):
    """Reviews of 1-4 words (lengths differ, so length grouping acts), a second text column
    `review` and a second label column `stars` (the same classes, drawn at random), all in the tiny
    vocabulary."""
    rows = ["text,review,label,stars"]
    for _ in range(count):
        positive = rng.random() < 0.5
        words = " and ".join(rng.choice(POSITIVE if positive else NEGATIVE, rng.integers(1, 5)))
        other = " ".join(rng.choice(POSITIVE + NEGATIVE, rng.integers(2, 6)))
        rows.append(f"the film was {words},it was {other},{'positive' if positive else 'negative'},"
                    f"{rng.choice(['positive', 'negative'])}")
    path.write_text("\n".join(rows) + "\n")
    return path


class Runs:
    """`minisft train` on the base command plus some options, each combination run once."""

    def __init__(self, root):
        rng = np.random.default_rng(0)
        self.root, self.done = root, {}
        self.train, self.dev = write_rows(root / "train.csv", 24, rng), write_rows(root / "dev.csv", 16, rng)

    def __call__(self, options):
        """options: a frozenset of (flag, value or None) -> the run's outcome."""
        if options not in self.done:
            self.done[options] = self._run(options)
        return self.done[options]

    def _run(self, options):
        output = self.root / f"run-{len(self.done)}"
        argv = ["train", "--model", str(TINY), "--train", str(self.train), "--output", str(output), "--batch-size", "8"]
        for flag, value in sorted(options):
            argv += [flag] + ([] if value is None else [str(self.dev) if value == "DEV" else value])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
        console = TIMINGS.sub("", (out.getvalue() + err.getvalue()).replace(str(output), "OUT"))
        return Outcome(code, console, output)


class Outcome:
    """What a run produced: its exit code, console, files (path -> digest) and evaluations."""

    def __init__(self, code, console, output):
        self.code, self.console = code, console
        self.error = console.strip().splitlines()[-1] if code else None
        paths = sorted(p for p in output.rglob("*") if p.is_file() and p.name not in UNCOMPARED)
        # TensorBoard's event files hold wall times in their names and records: runs/ is compared by
        # presence (its scalars are metrics.jsonl's)
        self.files = {str(p.relative_to(output)): digest(p) for p in paths if p.parts[len(output.parts)] != "runs"}
        if (output / "runs").is_dir():
            self.files["runs/"] = "present"
        metrics = output / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        self.evaluations = [r for r in records if any(k.startswith("eval_") for k in r)]
        self.checkpoints = [name for name in self.files if re.fullmatch(r"checkpoint-\d+/model.safetensors", name)]

    def observed(self):
        return self.code, self.console, self.files


def digest(path):
    if path.suffix in (".json", ".jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
            if path.suffix == ".jsonl" else [json.loads(path.read_text())]
        data = json.dumps([{k: v for k, v in d.items() if k not in ("args", "it_per_s")} if isinstance(d, dict)
                           else d for d in lines], sort_keys=True).encode()
    else:
        data = path.read_bytes()
    return hashlib.sha256(data).hexdigest()


def best_steps(evaluations, metric):
    """The steps a run marks as its best so far, by eval_METRIC (greater is better)."""
    best, steps = None, []
    for record in evaluations:
        if best is None or record[f"eval_{metric}"] > best:
            best = record[f"eval_{metric}"]
            steps.append(record["step"])
    return steps


def reaches(flag, value, options, without):
    """Whether the run `without` the option reaches the bound that the option acts at."""
    metric = dict(options).get("--metric") or "accuracy"
    if flag in OPTIMISATION and "early stopping at step" in without.console:
        return False
    if flag == "--save-total-limit":
        return len(without.checkpoints) > int(value)
    if flag == "--metric":
        return best_steps(without.evaluations, value) != best_steps(without.evaluations, "accuracy")
    if flag == "--early-stopping-patience":
        improving = set(best_steps(without.evaluations, metric))
        return any(r["step"] not in improving for r in without.evaluations[:-1])
    return True


def record_curves(run_directories, path):
    """viz.draw_curves without the drawing (test_viz looks at pictures): what it would draw."""
    pathlib.Path(path).write_text(json.dumps([viz.read_metrics(d) for d in run_directories]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(viz, "draw_curves", record_curves)
        yield Runs(tmp_path_factory.mktemp("effects"))


def acceptable(options):
    """The combination with each option's prerequisite added and each overridden option left out."""
    options = options | {PREREQUISITE[flag] for flag, _ in options if flag in PREREQUISITE}
    given = {flag for flag, _ in options}
    return frozenset(o for o in options if OVERRIDES.get(o[0]) not in given)


def option(choices):
    """One (flag, value or None) of `choices`, its value drawn."""
    return st.sampled_from(choices).flatmap(
        lambda choice: st.sampled_from(choice[1]).map(lambda v: (choice[0], v)) if choice[1] else st.just((choice[0], None)))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(drawn=st.lists(option(POOL), min_size=1, max_size=8, unique_by=lambda o: o[0]),
       made_acceptable=st.booleans(), foreign=st.lists(option(FOREIGN), max_size=1))
def test_every_accepted_option_changes_what_the_run_produces(runs, drawn, made_acceptable, foreign):
    options = frozenset(drawn)
    options = (acceptable(options) if made_acceptable else options) | set(foreign)
    outcome = runs(options)
    if outcome.code:
        named = re.match(r"minisft train: error: (--[a-z0-9-]+)", outcome.error or "")
        assert outcome.code == 2 and named and named.group(1) in {flag for flag, _ in options}, outcome.console
        assert not made_acceptable or foreign, f"refused: {outcome.error}"
        return
    assert not foreign, f"{foreign[0][0]} accepted for classification"
    for one in options:
        without = runs(options - {one})
        if without.code == 0 and without.observed() == outcome.observed():
            assert not reaches(*one, options, without), f"{one[0]} changes nothing beside {sorted(options - {one})}"


def test_the_pool_draws_every_training_option_but_the_ones_tested_elsewhere():
    """A new option of `minisft train` joins the pool, or the list of those tested elsewhere."""
    from minisft.cli import commands

    parser = commands.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    spelled = {s for action in train._actions for s in action.option_strings if s.startswith("--")}
    elsewhere = {"--help", "--model", "--train", "--output", "--task", "--gradient-checkpointing", "--eval-batch-size",
                 "--skip-nonfinite-steps", "--resume", "--overwrite-output-dir", "--device",
                 "--revision"}  # --revision: test_hub
    assert spelled - elsewhere == set(FLAGS)
