"""Gradient checkpointing at 8x512 on its own: lean_bench's long-input comparison of full
fine-tuning with and without it (step time, timed alternately, peak RSS, peak allocated
memory, and transformers' figures), without lean_bench's other modes, so that a change to
checkpointing is measured in minutes."""
from benchmarks.lean_bench import libraries, long_inputs


def run(env, quick):
    return long_inputs(env, quick, ("full", "checkpointing"), *libraries(env))
