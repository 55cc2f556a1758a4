"""Data-parallel training (minisft.training.distributed): the pieces in one process (sharding, seeds,
the hook that starts a gradient bucket, the checks ranks must pass), then whole runs under
`mpiexec -n 2` (the mpi extra; skipped with the reason when it is absent): equal to one
process with the same global batch, repeatable bit for bit with dropout, resumable with the
same or another number of ranks, ended by a failing rank, and refused when ranks differ."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import minisft
from minisft import tasks
from minisft.files.weights import load_safetensors
from minisft.training import distributed
from conftest import FIXTURES, ROOT
from helpers import NEGATIVE, POSITIVE, write_reviews
from netns import TwoHosts

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
HANG_GUARD_S = 600  # a job that has not ended by then is hung: fail instead of blocking the suite


# --- in one process ---------------------------------------------------------------------------
@pytest.mark.parametrize("count", [8, 5, 1, 0])
def test_shards_cover_a_batch_once_in_order(count):
    batch = list(range(100, 100 + count))
    parts = [distributed.shard(batch, rank, 2) for rank in range(2)]
    assert parts[0] + parts[1] == batch
    assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_batch_size_must_divide_among_ranks():
    assert distributed.per_rank_batch(32, 4) == 8
    with pytest.raises(distributed.DistributedError, match=r"--batch-size 30.*not a multiple of 4.*--batch-size 28"):
        distributed.per_rank_batch(30, 4)


def test_rank_seeds_differ_by_rank_and_step_and_repeat():
    seeds = {distributed.rank_seed(42, rank, step) for rank in range(4) for step in range(50)}
    assert len(seeds) == 200
    assert distributed.rank_seed(42, 1, 7) == distributed.rank_seed(42, 1, 7)


def test_loss_terms_count_labeled_tokens_for_token_classification():
    assert tasks.get("classification").loss_terms({"label": 1}) == 1
    assert tasks.get("token-classification").loss_terms({"label": [-100, 2, -100, 0, 1, -100]}) == 3


def test_fingerprint_changes_with_any_id_or_label():
    features = [{"input_ids": [2, 5, 3], "token_type_ids": [0, 0, 0], "label": 1}]
    same = [{"input_ids": [2, 5, 3], "token_type_ids": [0, 0, 0], "label": 1}]
    assert distributed.fingerprint(features) == distributed.fingerprint(same)
    for key, value in (("input_ids", [2, 6, 3]), ("label", 0)):
        changed = [{**features[0], key: value}]
        assert distributed.fingerprint(changed) != distributed.fingerprint(features)


class _Ranks(distributed.SingleProcess):
    """allgather answers with what each of several ranks would send."""

    def __init__(self, values):
        super().__init__()
        self.values, self.size = values, len(values)

    def allgather(self, value):
        return [("host-a", v) for v in self.values]


def test_ranks_that_differ_are_named():
    comm = _Ranks([{"minisft version": "0.1.0"}, {"minisft version": "0.1.0"}, {"minisft version": "0.2.0"}])
    with pytest.raises(distributed.DistributedError, match=r"minisft version \(ranks 0 \(host-a\), 1 \(host-a\): "
                                                           r"0.1.0; rank 2 \(host-a\): 0.2.0\); install the same"):
        distributed.check_same_everywhere(comm, {"minisft version": ("ignored here", "install the same minisft")})


def test_a_leaf_s_hook_runs_once_when_its_gradient_is_complete():
    w = minisft.tensor(np.ones(3), requires_grad=True)
    seen = []
    w.register_post_accumulate_grad_hook(lambda leaf: seen.append(leaf.grad.copy()))
    x = minisft.tensor(np.array([1.0, 2.0, 3.0]))
    ((w * x).sum() + (w * w).sum() * 0.5 + (w * 0).sum()).backward()  # three uses of w
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], x.numpy() + w.numpy())


@pytest.mark.parametrize("text, seconds", [("", distributed.TIMEOUT_S), (" 7.5 ", 7.5), ("0", None), ("soon", None)])
def test_the_wait_for_other_ranks_comes_from_minisft_mpi_timeout(monkeypatch, text, seconds):
    monkeypatch.setenv("MINISFT_MPI_TIMEOUT", text)
    if seconds is None:
        with pytest.raises(distributed.DistributedError, match="MINISFT_MPI_TIMEOUT"):
            distributed.timeout_from_environment()
    else:
        assert distributed.timeout_from_environment() == seconds


def test_one_process_never_imports_mpi4py():
    code = ("import sys, minisft.training.distributed as d, minisft.training.trainer; c = d.world(); "
            "print(type(c).__name__, c.size, 'mpi4py' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_SIZE_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["SingleProcess", "1", "False"]


# --- under mpiexec -n 2 --------------------------------------------------------------------------
def _mpi_missing():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[mpi]')"
    return None if MPIEXEC else "no mpiexec on PATH or beside this Python (pip install -e '.[mpi]')"


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """45 training reviews: at batch 8 the last batch has 5, shared 3 and 2."""
    root = tmp_path_factory.mktemp("reviews")
    rng = np.random.default_rng(0)
    return write_reviews(root / "train.csv", 45, rng), write_reviews(root / "dev.csv", 16, rng)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """CoNLL sentences whose sentiment words are tagged: sentences of 3 to 9 words, so that
    ranks' shares of a batch hold different numbers of labeled tokens."""
    root = tmp_path_factory.mktemp("tagged")
    rng = np.random.default_rng(0)

    def write(name, count):
        sentences = []
        for _ in range(count):
            words = ["the", "film", "was"] + list(rng.choice(POSITIVE + NEGATIVE, rng.integers(0, 7)))
            sentences.append("\n".join(f"{w}\t{'B-POS' if w in POSITIVE else 'B-NEG' if w in NEGATIVE else 'O'}"
                                       for w in words))
        path = root / name
        path.write_text("\n\n".join(sentences) + "\n")
        return path

    return write("train.conll", 45), write("dev.conll", 16)


@pytest.fixture(scope="module")
def no_dropout(tmp_path_factory):
    """The tiny BERT with its dropout off."""
    model = tmp_path_factory.mktemp("models") / "tiny-bert-no-dropout"
    shutil.copytree(FIXTURES / "tiny-bert", model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    return model


def _train_args(model, data, output, *extra):
    return ["--model", str(model), "--train", str(data[0]), "--eval", str(data[1]), "--output", str(output),
            "--batch-size", "8", "--learning-rate", "1e-3", "--max-steps", "10", "--logging-steps", "5",
            *map(str, extra)]


def _run(command, ranks):
    """Run `command` (after python) alone or under mpiexec -n ranks; returns (process, seconds)."""
    launcher = [MPIEXEC, "-n", str(ranks)] if ranks > 1 else []
    env = {**os.environ, "MINISFT_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run([*launcher, sys.executable, *command], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=HANG_GUARD_S)
    return done, time.perf_counter() - started


def _train(ranks, *args):
    done, _ = _run(["-m", "minisft", "train", *args], ranks)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _weights(directory):
    return load_safetensors(pathlib.Path(directory) / "model.safetensors")


def _assert_weights_close(a, b, rtol):
    """Every tensor within rtol of the other's in the Frobenius norm. (Not entry by entry:
    AdamW divides by sqrt(v) + 1e-8, so a gradient that is zero up to float32 rounding, such
    as a key bias's, moves its entry by rounding noise x lr / 1e-8, different for any other
    order of summation: 3e-6 of the largest entry of a value weight after one step here.)"""
    a, b = _weights(a), _weights(b)
    assert a.keys() == b.keys()
    for key in a:
        error = np.linalg.norm(a[key] - b[key]) / max(np.linalg.norm(b[key]), 1e-12)
        assert error <= rtol, f"{key}: relative difference {error:.3g} > {rtol}"


@needs_mpi
@pytest.mark.parametrize("case", ["classification", "accumulation", "token-classification", "class-weighted tokens"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, data, tagged, no_dropout, case):
    """Token classification weighs each rank's mean by its labeled tokens, not its sentences
    (with class weights: by the sum of its labeled tokens' weights)."""
    extra = {"classification": (), "accumulation": ("--gradient-accumulation-steps", 2),
             "token-classification": ("--task", "token-classification"),
             "class-weighted tokens": ("--task", "token-classification", "--class-weights", "B-POS=3,O=0.5")}[case]
    files = tagged if "tokens" in case or case == "token-classification" else data
    _train(1, *_train_args(no_dropout, files, tmp_path / "one", *extra))
    two = _train(2, *_train_args(no_dropout, files, tmp_path / "two", *extra))
    _assert_weights_close(tmp_path / "two", tmp_path / "one", rtol=1e-6)
    assert "data-parallel on 2 ranks" in two.stderr
    one_metrics = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two_metrics = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one_metrics) == len(two_metrics)  # rank 0 alone wrote the file
    for a, b in zip(one_metrics, two_metrics):  # the global loss and metrics
        for key in ("loss", "eval_accuracy", "eval_f1"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key


@needs_mpi
def test_two_rank_runs_with_dropout_repeat_bit_for_bit(tmp_path, data):
    for name in ("first", "second"):
        _train(2, *_train_args(FIXTURES / "tiny-bert", data, tmp_path / name))
    a, b = _weights(tmp_path / "first"), _weights(tmp_path / "second")
    assert all((a[k] == b[k]).all() for k in a)


@needs_mpi
def test_resume_from_a_two_rank_checkpoint(tmp_path, data, no_dropout):
    """With dropout: 2 ranks resumed equal 2 ranks uninterrupted bit for bit. Without: one
    process resumed from the 2-rank checkpoint ends where 2 ranks do (the global batch is the
    same)."""
    args = ("--save-steps", 4, "--save-total-limit", 0, "--eval-steps", 5)
    for model, ranks_after in ((FIXTURES / "tiny-bert", 2), (no_dropout, 1)):
        straight, resumed = tmp_path / f"straight-{ranks_after}", tmp_path / f"resumed-{ranks_after}"
        _train(2, *_train_args(model, data, straight, *args))
        resumed.mkdir()
        shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
        _train(ranks_after, *_train_args(model, data, resumed, *args, "--resume"))
        if ranks_after == 2:
            a, b = _weights(straight / "checkpoint-8"), _weights(resumed / "checkpoint-8")
            assert all((a[k] == b[k]).all() for k in a)
        else:
            _assert_weights_close(resumed / "checkpoint-8", straight / "checkpoint-8", rtol=1e-6)


@needs_mpi
def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step_and_resume_is_bit_identical(tmp_path, data):
    """SIGTERM reaches rank 1 alone, in step 4's forward pass (dropout on): both ranks stop
    after step 4, rank 0 writes checkpoint-4, and 2 ranks resumed end where 2 ranks
    uninterrupted do, bit for bit."""
    args = ("--eval-steps", 5)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _train(2, *_train_args(FIXTURES / "tiny-bert", data, straight, *args))
    worker = ["tests/mpi_worker.py", "--rank", "1", "--sigterm-at-step", "4", "--"]
    done, _ = _run([*worker, *_train_args(FIXTURES / "tiny-bert", data, stopped, *args)], 2)
    assert done.returncode == 143, done.stderr[-3000:]
    assert "stopped by SIGTERM after step 4" in done.stderr and "--resume" in done.stderr
    assert [p.name for p in stopped.glob("checkpoint-*")] == ["checkpoint-4"]
    _train(2, *_train_args(FIXTURES / "tiny-bert", data, stopped, *args, "--resume"))
    a, b = _weights(straight), _weights(stopped)
    assert all((a[k] == b[k]).all() for k in a)


@needs_mpi
def test_a_failing_rank_ends_every_rank_and_names_itself(tmp_path, data):
    worker = ["tests/mpi_worker.py", "--rank", "1", "--fail-at-step", "3", "--"]
    done, seconds = _run([*worker, *_train_args(FIXTURES / "tiny-bert", data, tmp_path / "out")], 2)
    assert done.returncode != 0
    assert "rank 1 of 2" in done.stderr and "a failure on purpose at step 3" in done.stderr, done.stderr[-2000:]
    print(f"the job ended {seconds:.1f} s after it started")


@needs_mpi
@pytest.mark.parametrize("case", ["batch", "data", "version"])
def test_ranks_that_cannot_train_together_are_refused_before_training(tmp_path, data, case):
    output = tmp_path / "out"
    args = _train_args(FIXTURES / "tiny-bert", data, output)
    if case == "batch":
        args[args.index("--batch-size") + 1] = "7"
        command, expected = ["-m", "minisft", "train", *args], "--batch-size 7"
    elif case == "data":
        other = write_reviews(tmp_path / "other.csv", 45, np.random.default_rng(1))
        command, expected = ["tests/mpi_worker.py", "--rank", "1", "--train", str(other), "--", *args], "training data"
    else:
        command, expected = ["tests/mpi_worker.py", "--rank", "1", "--version", "9.9", "--", *args], "minisft version"
    done, _ = _run(command, 2)
    assert done.returncode != 0 and expected in done.stderr, done.stderr[-2000:]
    assert not output.exists()


# --- two hosts: network namespaces joined by veth (tests/netns.py) -------------------------------
needs_hosts = pytest.mark.skipif(_mpi_missing() is not None or TwoHosts.unavailable() is not None,
                                 reason=str(_mpi_missing() or TwoHosts.unavailable()))
LOST_HOST_LIMIT_S = 30  # the bound on how long a job with a lost host may take to end


@needs_hosts
def test_two_hosts_equal_one_process(tmp_path, data, no_dropout):
    _train(1, *_train_args(no_dropout, data, tmp_path / "one"))
    with TwoHosts(tmp_path) as hosts:
        command = hosts.mpiexec(MPIEXEC, [sys.executable, "-m", "minisft", "train",
                                          *_train_args(no_dropout, data, tmp_path / "two")])
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD_S,
                              env={**os.environ, "MINISFT_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data-parallel on 2 ranks" in done.stderr
    _assert_weights_close(tmp_path / "two", tmp_path / "one", rtol=1e-6)


@needs_hosts
def test_a_host_that_drops_off_the_network_ends_the_job_naming_it(tmp_path, data):
    """host-b's link goes down while the job trains (after its first log line): rank 0 waits
    MINISFT_MPI_TIMEOUT (10 s) for the gradient sum, pings, and ends the job naming rank 1
    and host-b; rank 1, whose output can no longer reach the launcher, ends on its own."""
    output = tmp_path / "out"
    args = ["--model", str(FIXTURES / "tiny-bert"), "--train", str(data[0]), "--output", str(output),
            "--batch-size", "8", "--max-steps", "100000", "--logging-steps", "5", "--save-steps", "100000"]
    env = {**os.environ, "MINISFT_NUM_THREADS": "1", "MINISFT_MPI_TIMEOUT": "10"}
    with TwoHosts(tmp_path) as hosts:
        job = subprocess.Popen(hosts.mpiexec(MPIEXEC, [sys.executable, "-m", "minisft", "train", *args]), cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        began = time.monotonic()
        while not (output / "metrics.jsonl").exists() and job.poll() is None and time.monotonic() - began < 300:
            time.sleep(0.1)
        assert job.poll() is None, job.communicate()[1][-3000:]
        hosts.link_down()
        down = time.monotonic()
        try:
            _, stderr = job.communicate(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            job.kill()
            pytest.fail(f"the job still ran {HANG_GUARD_S} s after host-b's link went down")
        ended = time.monotonic() - down
        while any(" -m minisft " in line for line in hosts.processes(hosts.b).values()) and time.monotonic() - down < 120:
            time.sleep(0.1)
        rank_1_ended = time.monotonic() - down
    print(f"the job ended {ended:.1f} s after the link went down, rank 1 {rank_1_ended:.1f} s after")
    assert job.returncode != 0
    assert "no answer from rank 1 (host host-b)" in stderr, stderr[-3000:]
    assert ended <= LOST_HOST_LIMIT_S and rank_1_ended <= LOST_HOST_LIMIT_S
