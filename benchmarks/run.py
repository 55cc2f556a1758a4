"""Entry point: `python -m benchmarks [--quick] [--only NAME ...]`.

Runs each benchmark for minisft and, when the `reference` extra (torch + transformers) is
installed, for the reference in the same process, alternating, after warm-up. Prints a
table of medians (min-max) with the minisft / reference ratio, and writes it, with the
machine, library versions, BLAS and thread counts, to benchmarks/RESULTS.md.
"""
import os
import sys

THREADS = str(os.cpu_count() or 1)
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, THREADS)
# Some machines set OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE to work around old OpenBLAS bugs;
# they pin current NumPy to a slower kernel. Benchmarks measure the machine as it is.
os.environ.pop("OPENBLAS_CORETYPE", None)
os.environ.pop("OPENBLAS_L2_SIZE", None)
import minisft  # noqa: E402, F401

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402

from benchmarks.common import TABLE_HEADER  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# finetune_bench (the README job, ~20 minutes), qa_bench and retrieval_bench (one to two hours each),
# multilabel_bench, rerank_bench and matryoshka_bench (issue 29's quality figures, minutes each),
# soak_bench (3,000 steps of the tiny model watched for leaks, issue 30's figures, about 20 s),
# export_bench (the README job's model served by minisft, torch and onnxruntime, about 5 minutes),
# checkpoint_bench (a part of lean_bench) and gpu_bench (a GPU's, benchmarks/gpu_check.sh) run only
# when named with --only
BENCHMARKS = ["model_bench", "op_bench", "encoder_bench", "memory_bench", "tokenizer_bench", "import_bench", "import_order_bench",
              "lean_bench", "length_bench", "distributed_bench", "finetune_bench", "qa_bench", "retrieval_bench",
              "multilabel_bench", "rerank_bench", "matryoshka_bench", "soak_bench", "export_bench", "checkpoint_bench",
              "gpu_bench"]
DEFAULT = BENCHMARKS[:BENCHMARKS.index("finetune_bench")]


class Environment:
    """What every benchmark needs: fetched files, and whether the reference is installed."""

    def __init__(self, reference):
        from minisft.cli.fetch import fetch

        self.reference = reference
        self.root = ROOT
        self.model_dir = fetch("all-MiniLM-L6-v2", root=ROOT / "weights")
        self._fetch = fetch

    def data(self, name):
        return self._fetch(name, root=ROOT / "data")


def _reference_available():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


ISA_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "avx512_vnni", "avx2", "fma", "avx", "sse4_2", "asimd", "sve")


def cpu_info():
    """(vendor, model name, the ISA flags that pick BLAS kernels) from /proc/cpuinfo."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return (fields.get("vendor_id", platform.machine()), fields.get("model name", platform.processor() or "unknown CPU"),
            [flag for flag in ISA_FLAGS if flag in flags])


def cpu_key():
    """What names a RESULTS.md section's machine: model name and its widest vector ISA (the
    same model name can come with or without AVX-512 on virtual machines)."""
    _, model, flags = cpu_info()
    widest = {"avx512f": "AVX-512", "avx2": "AVX2", "avx": "AVX", "asimd": "NEON"}
    return f"{model}, " + next((name for flag, name in widest.items() if flag in flags), "no vector ISA flags")


def describe_machine(reference):
    import numpy

    vendor, model, flags = cpu_info()
    lines = [f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- CPU: {vendor}, {model}, {os.cpu_count()} logical CPUs; ISA flags: {' '.join(flags) or 'none found'}",
             f"- {platform.platform()}",
             f"- python {platform.python_version()}, numpy {numpy.__version__}",
             f"- minisft kernels: {minisft.get_kernels() or 'fast (default on the CPU)'}"]
    try:
        import threadpoolctl

        for pool in threadpoolctl.threadpool_info():
            lines.append(f"- {pool['user_api']}: {pool['internal_api']} {pool.get('version')}, "
                         f"kernel {pool.get('architecture')}, {pool['num_threads']} threads")
    except ImportError:
        lines.append("- BLAS: (install threadpoolctl to report it)")
    if reference:
        import torch
        import transformers

        torch.set_num_threads(int(THREADS))
        blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
        blas = blas.group(1) if blas else "unknown"
        lines.append(f"- torch {torch.__version__} ({torch.get_num_threads()} threads; BLAS {blas}, CPU capability "
                     f"{torch.backends.cpu.get_cpu_capability()}), transformers {transformers.__version__}")
    else:
        lines.append("- reference not installed (pip install -e '.[reference]'): minisft figures only")
    lines.append(f"- threads: OMP/OPENBLAS/MKL_NUM_THREADS={THREADS}; minisft's pool "
                 f"{minisft.get_num_threads()}")
    return lines


def write_results(path, command, machine, figures, machine_name=None):
    """Replace this run's section of RESULTS.md (one section per machine - the CPU, or the
    GPU for GPU benchmarks - and set of benchmarks run together), keeping the sections of
    other runs and other machines."""
    machine_name = machine_name or cpu_key()
    key = f"{machine_name} | " + (command.replace("python -m benchmarks", "").replace("--quick", "").strip() or "all")
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    section = "\n".join([begin, f"## {machine_name}: `{command}`", "", *machine, "", TABLE_HEADER,
                         *[f.row() for f in figures], end])
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        if not text:
            text = "# Benchmark results\n\nWritten by `python -m benchmarks`; never edited by hand.\n"
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)
    reference = _reference_available()
    env = Environment(reference)
    machine = describe_machine(reference)
    print("\n".join(machine))
    figures = []
    for name in args.only or DEFAULT:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"running {name} ...", flush=True)
        for figure in module.run(env, args.quick):
            print(figure.row(), flush=True)
            figures.append(figure)
    table = "\n".join([TABLE_HEADER] + [f.row() for f in figures])
    print(table)
    command = "python -m benchmarks" + (" --quick" if args.quick else "") + (
        f" --only {' '.join(args.only)}" if args.only else "")
    gpu = None
    if "gpu_bench" in (args.only or ()):
        from benchmarks.gpu_bench import describe, device_name

        gpu = device_name()
        machine.insert(1, describe())
    write_results(pathlib.Path(args.output), command, machine, figures, machine_name=gpu)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
