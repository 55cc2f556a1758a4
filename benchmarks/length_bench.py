"""Step time and peak memory against input length (batch 8, lengths 128 to 512) for full
fine-tuning of all-MiniLM-L6-v2, minisft (block attention from 128 tokens on) beside
transformers."""
from benchmarks.common import Figure, alternate
from benchmarks.memory_bench import peak_mb
from benchmarks.workloads import Minisft, Reference

BATCH, LENGTHS = 8, (128, 256, 384, 512)


def run(env, quick):
    batch, lengths = (2, (32, 64)) if quick else (BATCH, LENGTHS)
    ours, theirs = Minisft(env.model_dir), Reference(env.model_dir) if env.reference else None
    figures = []
    for length in lengths:
        functions = {"ours": ours.train_step(batch, length)}
        if theirs is not None:
            functions["reference"] = theirs.train_step(batch, length)
        times = alternate(functions, repeats=2 if quick else 3)
        figures.append(Figure(f"training step {batch}x{length}", "s", times["ours"], times.get("reference"),
                              note="full fine-tuning; reference: transformers"))
        figures.append(Figure(f"peak RSS, 5 steps {batch}x{length}", "MB", [peak_mb(env, "minisft", batch, length)],
                              [peak_mb(env, "torch", batch, length)] if theirs is not None else None,
                              note="each in its own process"))
    return figures
