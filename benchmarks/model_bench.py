"""Engine speed side by side: matmul peak, BERT forward, full fine-tuning steps with the
fraction of the measured matmul peak they reach, and how step time grows with length."""
import json

from benchmarks.common import Figure, alternate
from benchmarks.workloads import Minisft, Reference, model_flops


def _libraries(env, device):
    libraries = [Minisft(env.model_dir, device)]
    if env.reference:
        libraries.append(Reference(env.model_dir, device))
    return libraries


def _time(libraries, make, repeats):
    functions = {lib.name: make(lib) for lib in libraries}
    return alternate(functions, repeats=repeats, warmup=1)


def run(env, quick):
    """CPU figures, and the same on CUDA when both CuPy and torch see a GPU."""
    figures = _run_on(env, quick, "cpu")
    if _gpu_available(env):
        figures += _run_on(env, quick, "cuda")
    return figures


def _gpu_available(env):
    import minisft

    if not minisft.cuda_available():
        return False
    if not env.reference:
        return True
    import torch

    return torch.cuda.is_available()


def _reference_kernels_step(env, size, repeats):
    """minisft's step with the readable reference kernels: what the fast ones buy."""
    import minisft

    before = minisft.get_kernels()
    minisft.set_kernels("reference")
    try:
        times = _time([Minisft(env.model_dir, "cpu")], lambda lib: lib.train_step(*size), repeats)
    finally:
        minisft.set_kernels(before)
    return Figure(f"training step {size[0]}x{size[1]}, reference kernels (cpu)", "s", times["minisft"],
                  note="minisft.set_kernels('reference'); compare with the fast kernels' step above")


def _blas_products_step(env, size, repeats):
    """minisft's step with a Linear layer's products in one call on the BLAS's own threads
    (minisft.engine.runtime.set_products("blas")) instead of fixed tiles on minisft's threads."""
    from minisft.engine import runtime

    runtime.set_products("blas")
    try:
        times = _time([Minisft(env.model_dir, "cpu")], lambda lib: lib.train_step(*size), repeats)
    finally:
        runtime.set_products("tiles")
    return Figure(f"training step {size[0]}x{size[1]}, products on the BLAS's threads (cpu)", "s", times["minisft"],
                  note="set_products('blas'); compare with the tiled step above (the default)")


def _run_on(env, quick, device):
    libraries = _libraries(env, device)
    config = json.loads((env.model_dir / "config.json").read_text())
    repeats = 2 if quick else 5
    figures, peaks = [], {}
    n = 1024 if quick else 2048
    times = _time(libraries, lambda lib: lib.matmul(n), repeats * 4)
    rate = {name: [2 * n ** 3 / t / 1e9 for t in ts] for name, ts in times.items()}
    peaks = {name: max(values) for name, values in rate.items()}
    figures.append(Figure(f"float32 matmul {n}x{n}x{n} ({device})", "GFLOP/s", rate["minisft"],
                          rate.get("torch"), lower_is_better=False, note="the array library's practical peak"))
    for batch, length in ([(8, 32)] if quick else [(32, 128), (8, 128)]):
        times = _time(libraries, lambda lib, b=batch, n=length: lib.forward(b, n), repeats)
        figures.append(Figure(f"BertModel forward {batch}x{length}, no grad ({device})", "s",
                              times["minisft"], times.get("torch"), note="all-MiniLM-L6-v2"))
    for batch, length in ([(4, 32)] if quick else [(32, 128), (16, 64)]):
        times = _time(libraries, lambda lib, b=batch, n=length: lib.train_step(b, n), repeats)
        flops = model_flops(config, batch, length, training=True)
        fractions = {name: min(ts) and flops / min(ts) / 1e9 / peaks[name] for name, ts in times.items()}
        note = f"{flops / 1e9:.0f} GFLOP/step; fastest step = " + ", ".join(
            f"{name} {100 * f:.0f}%" for name, f in fractions.items()) + " of its matmul peak"
        figures.append(Figure(f"training step {batch}x{length} ({device})", "s", times["minisft"],
                              times.get("torch"), note=note))
    if device == "cpu":
        figures.append(_reference_kernels_step(env, (4, 32) if quick else (32, 128), max(2, repeats - 3)))
        figures.append(_blas_products_step(env, (4, 32) if quick else (32, 128), repeats))
    for length in ([32, 64] if quick else [64, 128, 256, 512]):
        times = _time(libraries, lambda lib, n=length: lib.train_step(8, n), max(2, repeats - 2))
        figures.append(Figure(f"training step 8x{length} ({device})", "s", times["minisft"], times.get("torch"),
                              note="step time against sequence length"))
    return figures
