"""The options that `minisft train` and the inference commands share with their checks: ranges
(minisft.training.options), and no parser default for an option that acts only in some
combinations, so that a given one can be told from a default."""
import dataclasses

from minisft import tasks
from minisft.training import options


# options that act only in some combinations: no parser default, so that a given one is found
CONDITIONAL = {*options.NEEDS, *options.OVERRIDDEN,
               *(field for task in tasks.TASKS.values() for field in task.own_options)}


def training_options(parser):
    from minisft.training.trainer import TrainingArguments

    d = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    add = parser.add_argument

    def number(field, help=None):
        """An option with a declared range (minisft.training.options.TRAINING), checked as it is
        parsed; one that acts only in some combinations (CONDITIONAL) is None
        unless given, and --help names its default."""
        conditional = field in CONDITIONAL
        default = f"default {d[field]:g}; " if conditional and d[field] else ""
        add(options.flag(field), dest=field, type=options.TRAINING[field], default=None if conditional else d[field],
            help=(help + "; " if help else "") + default + options.TRAINING[field].describe())

    add("--model", required=True, type=options.Text("model directory or name"),
        help="checkpoint directory, fetchable name (all-MiniLM-L6-v2), or Hugging Face name ORG/NAME (from the "
             "Hugging Face cache, else downloaded with the hub extra)")
    add("--revision", type=options.Text("revision"),
        help="with a Hugging Face name: its branch, tag or commit (default main)")
    add("--train", required=True, type=options.Text("training file or data set name"),
        help="training file (.csv/.tsv/.jsonl/.conll) or data set name (rotten-tomatoes)")
    add("--eval", type=options.Text("evaluation file or data set name"),
        help="evaluation file or data set name[:split] (default for a data set name: its dev split)")
    add("--test", type=options.Text("test file or data set name"),
        help="file or data set name[:split] evaluated once at the end (default for a data set: none)")
    add("--task", choices=list(tasks.TASKS), help="default: the one the training file's format implies "
        "(.conll: token-classification), else classification; "
        + "; ".join(f"{task.name}: {task.description}" for task in tasks.TASKS.values()))
    add("--output", required=True, type=options.Text("output directory"),
        help="output directory (must not exist unless --resume or --overwrite-output-dir)")
    add("--text-column", type=options.Text("column name"),
        help="column with the text (default: text, sentence, sentence1, ...; tokens for jsonl NER)")
    add("--text-pair-column", type=options.Text("column name"),
        help="column with the second text (default: text_pair, sentence2, ...)")
    add("--label-column", type=options.Text("column name"), help="column with the label (default: label)")
    number("learning_rate")
    number("batch_size")
    number("eval_batch_size")
    number("num_train_epochs")
    number("max_steps", "stop after this many optimiser steps")
    add("--max-length", type=options.TRAINING["max_length"], default=None,
        help=f"truncate inputs to this many tokens (default {d['max_length']}, or the model's positions if fewer); "
             + options.TRAINING["max_length"].describe())
    number("gradient_accumulation_steps")
    number("warmup_steps")
    number("warmup_ratio", "warmup as a fraction of the steps, instead of --warmup-steps")
    number("weight_decay", "AdamW decay (not on biases/LayerNorm)")
    number("max_grad_norm", "0 disables clipping")
    add("--scheduler", choices=["linear", "cosine", "constant"], default=d["lr_scheduler_type"],
        dest="lr_scheduler_type")
    number("eval_steps", "evaluate every N steps (0: each epoch end)")
    number("save_steps", "checkpoint every N steps (0: each epoch end)")
    number("save_total_limit", "checkpoints kept, the newest (0: all; the default 2 keeps one to fall back on "
                               "if the newest is damaged); an old one goes only once the new one is complete")
    number("logging_steps")
    add("--metric", dest="metric_for_best_model", type=options.Text("metric name"),
        help="metric that picks the best model (default: accuracy; pearson for regression; f1 for token "
             "classification and question answering; mrr@10 for embeddings)")
    number("early_stopping_patience", "stop after N evaluations without improvement (0: never)")
    number("seed")
    add("--no-group-by-length", action="store_false", dest="group_by_length",
        help="plain shuffled batches instead of length-grouped ones")
    add("--label-all-tokens", action="store_true", default=None, help="token classification: label every sub-token")
    add("--resume", nargs="?", const="latest", type=options.Text("checkpoint directory"),
        help="resume from the latest checkpoint in --output (or a given one)")
    add("--overwrite-output-dir", action="store_true")
    add("--device", default="cpu", type=options.device, help="cpu or cuda[:N]")
    add("--freeze-embeddings", action="store_true", default=None, help="freeze the embeddings (no gradient, no optimizer state)")
    number("freeze_layers", "freeze the lowest N encoder layers")
    number("lora_r", "train LoRA adapters of this rank instead of every weight (0: off); the task head stays trainable")
    number("lora_alpha", "LoRA scaling numerator: the update is (alpha / r) B A x")
    number("lora_dropout", "dropout on the adapters' input")
    add("--lora-target-modules", nargs="+", action=options.Names, default=None,
        help="Linear layers to adapt, by name, spaced or comma-separated (default: the family's: query,value "
             "for BERT)")
    add("--gradient-checkpointing", action="store_true",
        help="keep only the input of each encoder layer but the last and recompute the layer in backward "
             "(less memory, about 1/3 more time)")
    add("--fp16", action="store_true",
        help="mixed precision on a GPU: float16 matrix products over float32 weights, dynamic loss scaling")
    add("--merge-adapters", action="store_true", default=None,
        help="write a plain checkpoint with the adapters merged into its weights instead of the adapter")
    number("doc_stride", "question answering: tokens that the windows of a long context overlap")
    add("--skip-misaligned", action="store_true", default=None,
        help="question answering: leave out questions whose answer is not at its answer_start (counted)")
    add("--class-weights", type=options.Text("class weights"),
        help="classification and token classification: weigh each class in the cross-entropy, as torch's "
             "CrossEntropyLoss(weight=...): 'balanced' (n / (classes x n_class), over the training labels) or "
             "LABEL=W,... (other classes 1); recorded in training_args.json")
    add("--label-separator", type=options.Text("separator"),
        help="multi-label classification: what joins a CSV/TSV cell's class names (default ';'; in JSON lines "
             "the label is a list)")
    threshold_option(parser)
    add("--matryoshka-dims", type=options.dimensions,
        help="embedding: train with MatryoshkaLoss around MultipleNegativesRankingLoss at these leading dimensions "
             "(e.g. 384,256,128,64), and report the retrieval metrics at each")
    number("skip_nonfinite_steps", "float32: skip up to N steps whose loss or gradient is inf or NaN, each one "
                                   "reported (as torch's GradScaler skips them); beyond N, or with 0, such a step "
                                   "stops the run, naming its rows")
    number("max_train_examples", "train on a deterministic subset of N examples (0: all)")
    number("max_eval_examples", "evaluate on a deterministic subset of N examples of --eval and of --test alike "
                                "(0: all)")
    add("--report-to", choices=["none", "tensorboard"], dest="report_to",
        help="tensorboard: every scalar of metrics.jsonl also as TensorBoard events in OUTPUT/runs/ (needs the log "
             "extra: pip install -e '.[log]')")
    add("--plot", action="store_true", help="draw the training curves into OUTPUT/curves.png at each evaluation "
                                            "and at the end (needs the viz extra: pip install -e '.[viz]')")


def threshold_option(parser):
    parser.add_argument("--threshold", type=options.TRAINING["threshold"],
                        help="multi-label classification: a class is predicted where its probability (sigmoid) "
                             "reaches this (default 0.5, or the one the model was trained with); "
                             + options.TRAINING["threshold"].describe())


def inference_options(parser, data_help, model_help="a directory written by `minisft train`, or a file by `minisft export`"):
    """The options evaluate, predict and embed share."""
    parser.add_argument("--model", required=True, type=options.Text("model directory"), help=model_help)
    parser.add_argument("--data", required=True, type=options.Text("data file or data set name"), help=data_help)
    parser.add_argument("--batch-size", type=options.TRAINING["eval_batch_size"], default=64,
                        help=options.TRAINING["eval_batch_size"].describe())
    parser.add_argument("--device", default="cpu", type=options.device, help="cpu or cuda[:N]")
