"""minisft.engine.runtime: blocks cover the rows, errors surface, and a training step gives
bit-identical results whatever the thread count."""
import threading

import numpy as np
import pytest

import minisft
from minisft.engine import runtime
from minisft.models.bert import BertForSequenceClassification
from minisft.optim import AdamW
from conftest import FIXTURES


@pytest.fixture
def threads(monkeypatch):
    """Set the thread count and let any block size use the pool; restore afterwards."""
    monkeypatch.setattr(runtime, "MIN_BLOCK_ELEMENTS", 1)
    before = runtime.get_num_threads()
    yield runtime.set_num_threads
    runtime.set_num_threads(before)


def test_blocks_cover_the_rows_in_order_on_several_threads(threads):
    threads(3)
    seen = []
    results = runtime.for_blocks(lambda start, stop: seen.append(threading.get_ident()) or (start, stop), 10)
    assert results == [(0, 3), (3, 6), (6, 10)]
    assert len(set(seen)) >= 2  # the caller and the pool (a worker may take two blocks)


def test_nested_calls_run_inline_and_errors_surface_after_every_block(threads):
    threads(2)
    inner = runtime.for_blocks(lambda start, stop: runtime.for_blocks(lambda a, b: (a, b), 8), 4)
    assert inner == [[(0, 8)], [(0, 8)]]
    finished = []

    def kernel(start, stop):
        if start == 0:
            raise ValueError("first block failed")
        finished.append(stop)
    with pytest.raises(ValueError, match="first block failed"):
        runtime.for_blocks(kernel, 4)
    assert finished == [4]


def test_thread_count_validation(monkeypatch):
    with pytest.raises(ValueError, match="at least 1"):
        runtime.set_num_threads(0)
    monkeypatch.setenv("MINISFT_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="MINISFT_NUM_THREADS='two'"):
        runtime._default_threads()
    monkeypatch.setenv("MINISFT_NUM_THREADS", "3")
    assert runtime._default_threads() == 3


def _training_step(seed=0):
    """Loss, logits and every gradient of one training step of the tiny BERT with dropout,
    then the weights after an AdamW step."""
    minisft.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(FIXTURES / "tiny-bert", num_labels=3).train()
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 64, (5, 13))  # odd sizes: blocks of unequal length
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    out = model(ids, attention_mask=mask, labels=rng.integers(0, 3, 5))
    out.loss.backward()
    grads = {name: p.grad.copy() for name, p in model.named_parameters()}
    AdamW(model.parameters(), lr=1e-3).step()
    return out.loss.numpy(), out.logits.numpy(), grads, {n: p.numpy() for n, p in model.named_parameters()}


def test_training_step_is_bit_identical_for_any_thread_count(threads):
    threads(1)
    reference = _training_step()
    for count in (2, 3):
        threads(count)
        loss, logits, grads, weights = _training_step()
        assert loss == reference[0] and (logits == reference[1]).all()
        for name in grads:
            assert (grads[name] == reference[2][name]).all(), name
            assert (weights[name] == reference[3][name]).all(), name


def test_a_forked_child_gets_a_new_pool(threads):
    import os

    threads(2)
    runtime.for_blocks(lambda start, stop: None, 4)  # the parent's pool exists
    pid = os.fork()
    if pid == 0:
        ok = runtime.for_blocks(lambda start, stop: (start, stop), 4) == [(0, 2), (2, 4)]
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0


def test_dropout_masks_drawn_in_blocks_are_one_sequential_draw(threads):
    from minisft.engine import random

    threads(3)
    minisft.manual_seed(11)
    masks = [random.keep_mask((7, 13), 0.25), random.keep_mask((5,), 0.5)]
    reference = np.random.default_rng(11).bit_generator
    for mask, p in zip(masks, (0.25, 0.5)):
        bits = reference.random_raw((mask.size + 3) // 4).view(np.uint16)[:mask.size]
        assert (mask == (bits >= round(p * 65536)).reshape(mask.shape)).all()
    assert random.generator("cpu").bit_generator.random_raw() == reference.random_raw()


def test_matrix_products_in_tiles_are_bit_identical_for_any_thread_count(threads):
    from minisft.kernels import fast

    rng = np.random.default_rng(5)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((1000, 64), (300, 64), (300,)))
    g = rng.standard_normal((1000, 300)).astype(np.float32)
    results = []
    for count in (1, 2, 3):
        threads(count)
        results.append([fast.linear_forward(x, w, b), *fast.linear_backward(g, x, w, (True, True, True))])
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert (a == b_).all()


def test_the_blas_runs_on_one_thread_inside_the_fast_kernels_and_is_restored(threads):
    blas = np.__config__.CONFIG.get("Build Dependencies", {}).get("blas", {}).get("name", "")
    if "openblas" not in blas and "mkl" not in blas:
        pytest.skip(f"NumPy's BLAS ({blas or 'unknown'}) is neither OpenBLAS nor MKL")
    control = runtime.blas_threads_control()
    assert control is not None, "NumPy's OpenBLAS/MKL was not found among the loaded libraries"
    threads(2)
    set_threads, get_threads = control
    before = get_threads()
    set_threads(2)
    try:
        with runtime.one_blas_thread() as pinned:
            assert pinned and get_threads() == 1
        assert get_threads() == 2
    finally:
        set_threads(before)


def test_free_memory_goes_back_to_the_os_under_glibc():
    import platform

    assert runtime.release_free_memory() is (platform.libc_ver()[0] == "glibc")


def test_products_on_the_blas_threads_equal_the_tiled_ones_within_float32_rounding():
    """set_products("blas") runs a Linear layer's products in one call: the same sums of K terms,
    in another order, so within K float32 roundings of the terms' magnitude."""
    from minisft.kernels import fast

    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(shape).astype(np.float32) for shape in ((600, 96), (80, 96), (600, 80)))
    tiled = fast.linear_forward(x, w, None), *fast.linear_backward(g, x, w, (True, True, True))
    runtime.set_products("blas")
    try:
        whole = fast.linear_forward(x, w, None), *fast.linear_backward(g, x, w, (True, True, True))
    finally:
        runtime.set_products("tiles")
    for a, b, k in zip(tiled, whole, (96, 80, 600, 600)):
        assert np.abs(a - b).max() <= k * np.finfo(np.float32).eps * np.abs(a).max()
    with pytest.raises(ValueError, match="use 'tiles' or 'blas'"):
        runtime.set_products("fastest")
    assert runtime.get_products() == "tiles"
