"""minisft on one NVIDIA GPU against PyTorch on the same GPU: a 32x128 fine-tuning step of
all-MiniLM-L6-v2 (forward, cross-entropy, backward, clipping, AdamW) in float32 and in
mixed precision, and the float32 forward pass. The reference runs transformers' eager
attention and its SDPA attention (fused kernels), float32 and torch.autocast float16 with
GradScaler; minisft runs its cuda kernel set, float32 and minisft.engine.amp (--fp16). Each timed
call ends by reading a value back from the GPU, so it includes every kernel it launched.
Runs only when named (`--only gpu_bench`) on a machine whose CuPy and torch see a GPU.
"""
from benchmarks.common import Figure, alternate
from benchmarks.workloads import Minisft, Reference


def device_name():
    """The GPU's name as the driver gives it (RESULTS.md's section for this benchmark)."""
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()


def describe():
    """RESULTS.md's line for the GPU and its CuPy."""
    import cupy

    return f"- GPU: {device_name()}; CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"


def run(env, quick):
    import minisft

    if not minisft.cuda_available():
        raise RuntimeError("gpu_bench needs CuPy and an NVIDIA GPU (pip install -e '.[gpu]')")
    if not env.reference:
        raise RuntimeError("gpu_bench compares with torch on the same GPU: pip install -e '.[reference]' with a CUDA "
                           "build of torch")
    batch, length, repeats = (4, 32, 3) if quick else (32, 128, 20)
    ours = Minisft(env.model_dir, "cuda")
    eager, sdpa = Reference(env.model_dir, "cuda", "eager"), Reference(env.model_dir, "cuda", "sdpa")
    steps = alternate({"minisft float32": ours.train_step(batch, length), "minisft fp16": ours.train_step(
        batch, length, "fp16"), "eager float32": eager.train_step(batch, length), "sdpa float32": sdpa.train_step(
        batch, length), "eager fp16": eager.train_step(batch, length, "fp16"), "sdpa fp16": sdpa.train_step(
        batch, length, "fp16")}, repeats=repeats, warmup=3)
    forward = alternate({"minisft": ours.forward(batch, length), "eager": eager.forward(batch, length),
                         "sdpa": sdpa.forward(batch, length)}, repeats=repeats, warmup=3)
    size = f"{batch}x{length}"
    name = device_name()
    figures = []
    for precision in ("float32", "fp16"):
        for attention in ("eager", "sdpa"):
            note = f"{name}; reference: torch {attention} attention" + (
                ", autocast float16 + GradScaler" if precision == "fp16" else "")
            figures.append(Figure(f"GPU training step {size}, {precision}", "s", steps[f"minisft {precision}"],
                                  steps[f"{attention} {precision}"], note=note))
    for attention in ("eager", "sdpa"):
        figures.append(Figure(f"GPU forward {size}, float32", "s", forward["minisft"], forward[attention],
                              note=f"{name}; reference: torch {attention} attention"))
    return figures
