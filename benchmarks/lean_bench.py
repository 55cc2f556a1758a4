"""Lean fine-tuning on all-MiniLM-L6-v2: step time and peak memory of full fine-tuning, LoRA
r=8 (alpha 16, query and value), frozen embeddings and LoRA with gradient checkpointing at
32x128, and of gradient checkpointing
and of block attention against whole (L, L) attention at 8x512, for minisft and for
transformers (+ peft for LoRA), and minisft's lean modes against its own full fine-tuning
(which uses block attention from 128 tokens on), whose steps are timed alternately with each
mode's. Memory is the peak RSS of each mode in a process of its own, and for minisft also the
peak of allocated memory (memory_bench)."""
from benchmarks.common import Figure, alternate
from benchmarks.memory_bench import peak_mb
from benchmarks.workloads import LORA_ALPHA, LORA_R, Minisft, Reference

NAMES = {"full": "full fine-tuning", "lora": f"LoRA r={LORA_R} alpha {LORA_ALPHA}",
         "frozen-embeddings": "frozen embeddings", "checkpointing": "gradient checkpointing",
         "lora-checkpointing": f"LoRA r={LORA_R} + gradient checkpointing",
         "whole-attention": "whole (L, L) attention"}


def run(env, quick):
    ours, theirs = libraries(env)
    figures = _compare(env, ours, theirs, ("full", "lora", "frozen-embeddings", "lora-checkpointing"),
                       *((4, 32) if quick else (32, 128)),
                       quick)
    return figures + long_inputs(env, quick, ("full", "checkpointing", "whole-attention"), ours, theirs)


def libraries(env):
    """minisft, and transformers where the reference extra is installed (else None)."""
    return Minisft(env.model_dir), Reference(env.model_dir) if env.reference else None


def long_inputs(env, quick, modes, ours, theirs):
    """_compare's figures for `modes` at 8x512, the longest input MiniLM takes (2x512 quick)."""
    return _compare(env, ours, theirs, modes, *((2, 512) if quick else (8, 512)), quick)


def _compare(env, ours, theirs, modes, batch, length, quick):
    times, memory = {}, {}
    full = ours.train_step(batch, length, "full")
    for mode in modes:
        functions = {"ours": full if mode == "full" else ours.train_step(batch, length, mode)}
        if mode != "full":  # timed alternately with the mode: a ratio's two times come from the same minutes
            functions["full"] = full
        if theirs is not None:
            functions["reference"] = theirs.train_step(batch, length, mode)
        times[mode] = alternate(functions, repeats=2 if quick else 5)
        memory[mode] = {"ours": [peak_mb(env, "minisft", batch, length, mode)],
                        "reference": [peak_mb(env, "torch", batch, length, mode)] if theirs is not None else None,
                        "allocated": [peak_mb(env, "minisft", batch, length, mode, allocated=True)]}
    size = f"{batch}x{length}"
    figures = []
    for mode in modes:
        figures.append(Figure(f"training step {size}, {NAMES[mode]}", "s", times[mode]["ours"],
                              times[mode].get("reference"), note="reference: transformers" +
                              (" + peft" if mode.startswith("lora") else "")))
        figures.append(Figure(f"peak RSS, 5 steps {size}, {NAMES[mode]}", "MB", memory[mode]["ours"],
                              memory[mode]["reference"], note="each in its own process"))
    for mode in modes[1:]:
        figures.append(Figure(f"minisft {NAMES[mode]} / full: step {size}", "s", times[mode]["ours"],
                              times[mode]["full"], note="reference column: minisft's full fine-tuning, "
                                                        "timed alternately with the mode"))
        figures.append(Figure(f"minisft {NAMES[mode]} / full: peak RSS {size}", "MB", memory[mode]["ours"],
                              memory["full"]["ours"], note="reference column: minisft's full fine-tuning"))
        figures.append(Figure(f"minisft {NAMES[mode]} / full: peak allocated memory {size}", "MB",
                              memory[mode]["allocated"], memory["full"]["allocated"],
                              note="tracemalloc's high-water (arrays and objects), as torch.cuda.max_memory_allocated"))
    return figures
