"""What the command line's train, evaluate and predict do, from files to results: read and
encode data, build the model for the task, run the Trainer. Kept apart from argument
parsing so that scripts can call the same steps."""
import dataclasses
import json
import pathlib
import sys

import numpy

from minisft import lean, tasks
from minisft.cli.fetch import FetchError, resolve_data, resolve_model
from minisft.cli.serving import embedding_task, exported_embedder, load_exported
from minisft.engine import random, runtime
from minisft.engine.errors import MissingFile, UsageError
from minisft.engine.backend import Device
from minisft.lean import peft
from minisft.models.auto import AutoConfig, AutoTokenizer
from minisft.tasks.data import DataError, LabelVocab, read_text
from minisft.training import checkpoints, distributed
from minisft.training.options import NEEDS, OVERRIDDEN, OptionError, flag
from minisft.training.stopping import SignalStop
from minisft.training.trainer import Trainer, TrainingArguments, TrainingError


def _read(path, args, task, require_labels=True, limit=0):
    examples = task.read(path, args.text_column, args.text_pair_column, args.label_column,
                         require_labels=require_labels, skip_misaligned=args.skip_misaligned, **task.read_options(args))
    return task.subset(examples, limit, args.seed) if limit else examples


def _encode(task, examples, tokenizer, labels, args, path):
    """The task's features, each with "row": where in `path` it came from, for messages
    (a question's windows name their question)."""
    features = task.encode(examples, tokenizer, labels, args.max_length, args.label_all_tokens, source=path,
                           doc_stride=args.doc_stride)
    if len(features) == len(examples):
        for feature, example in zip(features, examples):
            feature["row"] = f"{path} line {example.line}"
    else:
        for feature in features:
            feature["row"] = f"{path} question {feature['example_id']}"
    return features


def train(options):
    """Fine-tune as `minisft train` does; returns the final metrics (eval_*, test_*).
    Started by mpiexec with several ranks: data-parallel (see minisft.training.distributed)."""
    comm = distributed.world()
    say = (lambda message: print(message, file=sys.stderr)) if comm.rank == 0 else (lambda message: None)
    if comm.size > 1:
        threads = distributed.threads_per_rank(comm)
        if threads:
            runtime.set_num_threads(threads)
        threads = runtime.get_num_threads()
        say(f"data-parallel on {comm.size} ranks, {threads} thread{'s' * (threads > 1)} each")
    output = pathlib.Path(options.output)
    if output.exists() and not output.is_dir():
        raise OptionError("--output", options.output, "is a file, not a directory", "give a directory path")
    if output.exists() and any(output.iterdir()) and not options.resume and not options.overwrite_output_dir:
        raise UsageError(f"{output} exists and is not empty: choose a new --output, add --resume to "
                         "continue its training, or --overwrite-output-dir to replace it")
    if getattr(options, "fp16", False) and Device(options.device).type != "cuda":
        raise OptionError("--fp16", True, "mixed precision needs a GPU (NumPy has no fast float16 matrix product)",
                          "add --device cuda, or leave out --fp16")
    draw = _curves_drawer(output) if getattr(options, "plot", False) else None
    model_dir = resolve_model(options.model, revision=options.revision)
    train_path, fetched = resolve_data(options.train, "train")
    task = tasks.get(options.task) if options.task else tasks.for_file(train_path)
    _refuse_options_of_other_tasks(vars(options), task)
    eval_spec = options.eval or (f"{options.train}:dev" if fetched and ":" not in options.train else None)
    _refuse_options_without_effect(vars(options), eval_spec)
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    args = TrainingArguments(output_dir=str(output), task=task.name,
                             **{k: v for k, v in vars(options).items()
                                if k in fields and k not in ("output_dir", "task") and v is not None})
    length_given = getattr(options, "max_length", None) is not None
    if not length_given and task.default_max_length:
        args.max_length = task.default_max_length
    _check_against_task_and_model(args, model_dir, length_given)
    if options.resume not in (None, "latest") and not pathlib.Path(options.resume).is_dir():
        raise OptionError("--resume", options.resume, "no such checkpoint directory",
                          f"give a checkpoint-STEP directory of {output}, or --resume alone for the latest")
    random.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_examples = _read(train_path, args, task, limit=args.max_train_examples)
    task.check_training_examples(train_path, train_examples)
    if args.batch_size > len(train_examples):
        raise OptionError("--batch-size", args.batch_size, f"more than the {len(train_examples)} training "
                          f"examples in {train_path}", f"use --batch-size {len(train_examples)} or less")
    labels = task.label_vocab(train_examples)

    def evaluation_features(path, purpose):
        """--eval's or --test's features, their count said (--max-eval-examples takes a subset)."""
        examples = _read(path, args, task, limit=args.max_eval_examples)
        say(f"{purpose} on {path} ({len(examples)} examples)")
        return _encode(task, examples, tokenizer, labels, args, path)

    train_features = _encode(task, train_examples, tokenizer, labels, args, train_path)
    eval_features = evaluation_features(resolve_data(eval_spec, "dev")[0], "evaluating") if eval_spec else None
    test_path = resolve_data(options.test, "test")[0] if options.test else None
    device = distributed.rank_device(comm, options.device)
    model = task.model(model_dir, labels)  # the lean passes' defaults applied (models.auto)
    model.config._name_or_path = options.model  # what it was loaded from, kept in the saved config.json
    if args.gradient_checkpointing:
        lean.gradient_checkpointing(model)
    model = _placed(peft.prepare(model, args, _base_name(options.model, model_dir)), device)
    resume = _checkpoint_to_resume(options.resume, output, say)
    report = model.loading_report()
    if report:
        say(report)
    windows = f" in {len(train_features)} windows" if len(train_features) != len(train_examples) else ""
    say(f"training {task.name} on {train_path} ({len(train_examples)} examples{windows}"
        + (f", {len(labels)} labels" if len(labels) else "") + f") from {model_dir}")
    trainer = Trainer(model, args, train_features, eval_features, labels.names, tokenizer, on_evaluate=draw)
    try:
        with SignalStop(say) as stop:
            metrics = trainer.train(resume_from=resume, stop=stop)
        if test_path is not None:
            test = trainer.evaluate(evaluation_features(test_path, "testing"), prefix="test")
            trainer._append_metrics({"step": trainer.state.global_step, **test})
            metrics = {**metrics, **test}
        if draw is not None and trainer.is_main and (test_path is not None or eval_features is None):
            draw()  # with the test scores, or the loss alone (the last evaluation drew the rest)
    finally:
        trainer.close()
    if comm.rank == 0:  # another rank's look could meet best/ half moved
        say(f"the model is in {output}{'' if metrics else ' (no --eval or --test: no metrics to report)'}; "
            f"{disk_use(output)}")
    return metrics


def _checkpoint_to_resume(given, output, say):
    """--resume's checkpoint: a checkpoint directory as given (verified when loaded), or,
    for --resume alone or the output directory itself, its newest checkpoint that verifies."""
    if not given:
        return None
    if given != "latest" and pathlib.Path(given).resolve() != output.resolve():
        return pathlib.Path(given)
    if not checkpoints.all_in(output):
        raise TrainingError(f"--resume: {output} has no checkpoint-STEP directory to resume from")
    return checkpoints.newest_verified(output, say)


def disk_use(output):
    """'N MB on disk: the model M MB, checkpoint-S K MB, ...' for a run directory."""
    def size(path):
        return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    output = pathlib.Path(output)
    parts = [(p.name, size(p)) for p in sorted(output.iterdir()) if p.is_dir()]
    model = sum(size(p) for p in output.iterdir() if p.is_file())
    total = model + sum(s for _, s in parts)
    return ", ".join([f"{_megabytes(total)} on disk: the model and logs {_megabytes(model)}",
                      *(f"{name}/ {_megabytes(s)}" for name, s in parts)])


def _megabytes(count):
    return f"{count / 1e6:.1f} MB"


def _base_name(given, model_dir):
    """How an adapter names its base: the fetchable name as given, else the absolute path."""
    return given if not pathlib.Path(given).exists() else str(pathlib.Path(model_dir).resolve())


def _curves_drawer(output):
    """--plot: a function that draws OUTPUT/curves.png; checked for the viz extra before training."""
    from minisft.inspect import viz

    viz.require_drawing()
    return lambda: viz.draw_curves([output], pathlib.Path(output) / "curves.png")


def _check_against_task_and_model(args, model_dir, length_given):
    """The options that depend on the task and the checkpoint: the best-model metric, and the
    input length against the model's position embeddings (a default longer than those is
    shortened to fit, as transformers' run_glue does; a given one is an error)."""
    task = tasks.get(args.task)
    if args.metric_for_best_model and args.metric_for_best_model not in task.metrics:
        raise OptionError("--metric", args.metric_for_best_model, f"{task.name} computes {', '.join(task.metrics)}",
                          f"use one of them, e.g. --metric {task.default_metric}")
    config = AutoConfig.from_pretrained(model_dir)
    too_wide = [d for d in args.matryoshka_dims or () if d > config.hidden_size]
    if too_wide:
        raise OptionError("--matryoshka-dims", ",".join(map(str, args.matryoshka_dims)), f"{too_wide[0]} is more than "
                          f"the {config.hidden_size} dimensions of {model_dir}'s embeddings",
                          f"use dimensions up to {config.hidden_size}")
    positions = config.max_position_embeddings
    if args.max_length > positions:
        if length_given:
            raise OptionError("--max-length", args.max_length, f"longer than the {positions} positions of {model_dir} "
                              "(max_position_embeddings in config.json)", f"use --max-length {positions} or less")
        args.max_length = positions


def _refuse_options_without_effect(given, eval_spec):
    """An option given (not None) that this combination would ignore (options.NEEDS,
    options.OVERRIDDEN): an OptionError naming the option it needs, or the one that overrides it."""
    present = {"lora_r": bool(given.get("lora_r")), "eval": bool(eval_spec),
               "evaluation": bool(eval_spec or given.get("test")), "max_steps": (given.get("max_steps") or -1) > 0,
               "warmup_steps": bool(given.get("warmup_steps"))}
    for field, (needed, fix) in NEEDS.items():
        if given.get(field) is not None and not present[needed]:
            needs = "--eval or --test" if needed == "evaluation" else flag(needed)
            raise OptionError(flag(field), given[field], f"has no effect without {needs}",
                              f"{fix}, or leave {flag(field)} out")
    for field, (other, why) in OVERRIDDEN.items():
        if given.get(field) is not None and present[other]:
            raise OptionError(flag(field), given[field], f"has no effect with {flag(other)} ({why})",
                              f"leave out {flag(field)} or {flag(other)}")


def _refuse_options_of_other_tasks(given, task):
    """An option only another task reads, given (not None) for this one: an OptionError."""
    for other in tasks.TASKS.values():
        for field in other.own_options:
            if given.get(field) is not None and field not in task.own_options:
                raise OptionError(flag(field), given[field], f"applies to {other.name} only, not {task.name}",
                                  f"add --task {other.name}, or leave {flag(field)} out")


def _placed(model, device):
    """The model moved to `device`, made the process's current device (one GPU a process)."""
    return model.to(Device(device).activate())


def _load_finetuned(model_dir, device, lean=True):
    """(training arguments, task, model, labels, tokenizer) of a directory `minisft train` wrote
    (lean=False: the plain model, no pass applied), or of a file `minisft export` wrote (.onnx,
    run by onnxruntime)."""
    model_dir = pathlib.Path(model_dir)
    if model_dir.suffix == ".onnx":
        return load_exported(model_dir)
    if not model_dir.is_dir():
        raise MissingFile(f"--model {model_dir}: not a directory; give a directory written by `minisft train`")
    try:
        saved = json.loads((model_dir / "training_args.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFile(f"{model_dir / 'training_args.json'} does not exist: --model must be a "
                                "directory written by `minisft train`") from None
    args = TrainingArguments(**{k: v for k, v in saved.items()
                                if k in {f.name for f in dataclasses.fields(TrainingArguments)}})
    config = AutoConfig.from_pretrained(model_dir)
    task = tasks.get(args.task)
    labels = LabelVocab([config.id2label[i] for i in range(config.num_labels)])
    if peft.is_adapter(model_dir):
        _, base = peft.read_adapter_config(model_dir)
        try:  # a relative path: from the adapter's directory first
            if not base:
                raise FetchError("no base named")
            base_dir = model_dir / base if (model_dir / base).is_dir() else resolve_model(base)
        except FetchError:
            raise MissingFile(f"{model_dir / peft.ADAPTER_CONFIG}: its base checkpoint "
                                    f"(base_model_name_or_path) {base!r} cannot be found; put the base there or "
                                    "edit the field to its directory") from None
        model = peft.load_adapter(task.model(base_dir, labels, lean=lean), model_dir, base)
    else:
        model = task.model(model_dir, labels, lean=lean)
    model = _placed(model, device).eval()
    return args, task, model, labels, AutoTokenizer.from_pretrained(model_dir)


def export(model_dir, output, quantize=None, merge_adapters=False):
    """Write the model of directory `model_dir` (as `minisft train` wrote it; or any checkpoint,
    a fetchable or Hugging Face name too, as sentence embeddings: its sentence-transformers
    pooling, else mean pooling, normalised) as the ONNX file `output`, with its tokenizer files
    and labels.json beside it."""
    from minisft.export import exporter
    from minisft.models.sentence import SentenceEmbedder

    output = pathlib.Path(output)
    if output.suffix != ".onnx":
        raise OptionError("--output", str(output), "is not a .onnx file name", f"give {output.with_suffix('.onnx')}")
    if not output.parent.is_dir():
        raise OptionError("--output", str(output), f"its directory {output.parent} does not exist",
                          f"create it first (mkdir -p {output.parent}), or give a path in an existing directory")
    adapter = pathlib.Path(model_dir).is_dir() and peft.is_adapter(model_dir)
    if adapter and not merge_adapters:
        raise OptionError("--model", str(model_dir), "holds LoRA adapters, not a whole model",
                          "add --merge-adapters to merge them into the weights as the file is written (or train "
                          "with --merge-adapters)")
    if pathlib.Path(model_dir).suffix == ".onnx":
        raise OptionError("--model", str(model_dir), "is an exported file already", "give the directory it came from")
    if not (pathlib.Path(model_dir) / "training_args.json").is_file() and not adapter:  # a checkpoint: embeddings
        model_dir = resolve_model(model_dir)
        model = SentenceEmbedder.from_pretrained(model_dir, lean=False)
        return exporter.save(model.eval(), embedding_task(), output, model_dir,
                             {"max_length": model.max_seq_length, **embedding_task().export_settings(model)}, quantize)
    args, task, model, labels, _ = _load_finetuned(model_dir, "cpu", lean=False)
    if adapter:
        model = model.merge_and_unload()
    settings = {"max_length": args.max_length, "threshold": args.threshold, "label_all_tokens": args.label_all_tokens,
                "doc_stride": args.doc_stride}
    return exporter.save(model.eval(), task, output, model_dir, {**settings, **task.export_settings(model)}, quantize)


def _inference_settings(args, task, batch_size, threshold):
    args.eval_batch_size = batch_size
    _refuse_options_of_other_tasks({"threshold": threshold}, task)
    if threshold is not None:
        args.threshold = threshold


def evaluate(model_dir, data, batch_size=64, device="cpu", threshold=None):
    """Metrics of a fine-tuned model directory on a labeled file or data set split;
    threshold: multi-label's, instead of the one it was trained with."""
    args, task, model, labels, tokenizer = _load_finetuned(model_dir, device)
    _inference_settings(args, task, batch_size, threshold)
    if is_text_lines(data):
        raise DataError(f"{data}: texts a line, without labels; evaluate needs labeled data (.csv, .tsv, .jsonl or "
                        ".conll); `minisft predict` takes a .txt file")
    path, _ = resolve_data(data, "test")
    features = _encode(task, _read(path, args, task), tokenizer, labels, args, path)
    return Trainer(model, args, label_names=labels.names, tokenizer=tokenizer).evaluate(features, prefix="")


def _line_examples(task, data):
    """Examples from standard input (data "-") or a .txt file, a line each, as the task reads
    a line (a text, a text and its pair after a tab, words, or a JSON object)."""
    if data == "-":
        where, lines = "standard input", sys.stdin
    else:
        where, lines = data, read_text(data).splitlines()
    examples = [task.stdin_example(line.rstrip("\n"), number) for number, line in enumerate(lines, 1) if line.strip()]
    if not examples:
        raise DataError(f"{where}: no lines to predict")
    return examples


def is_text_lines(data):
    """Whether `data` names standard input or a .txt file: texts a line, no labels."""
    return data == "-" or str(data).lower().endswith(".txt")


def predict(model_dir, data, batch_size=64, device="cpu", threshold=None):
    """One record per input: label and probabilities (multi-label: the labels at or above the
    threshold, and every probability), a score, or tags per word."""
    args, task, model, labels, tokenizer = _load_finetuned(model_dir, device)
    _inference_settings(args, task, batch_size, threshold)
    if is_text_lines(data):
        examples = _line_examples(task, data)
    else:
        examples = _read(resolve_data(data, "test")[0], args, task, require_labels=False)
    for example in examples:
        example.label = None
    features = _encode(task, examples, tokenizer, labels, args, "the data")
    outputs = Trainer(model, args, label_names=labels.names, tokenizer=tokenizer).predict(features)
    yield from task.predictions(examples, features, outputs, labels.names, **task.output_options(args))


def rerank(model_dir, data, batch_size=64, device="cpu"):
    """Each query's candidates of `data` ((query, passage[, label]) rows) in the order a
    reranking model scores them: {"query", "ranking": [{"passage", "score"[, "label"]}, ...]}."""
    args, task, model, labels, tokenizer = _load_finetuned(model_dir, device)
    if task.rankings is None:
        raise OptionError("--model", str(model_dir), f"a {task.name} model, not a reranker",
                          "give a directory that `minisft train --task reranking` wrote")
    args.eval_batch_size = batch_size
    examples = _read(resolve_data(data, "test")[0], args, task, require_labels=False)
    features = _encode(task, examples, tokenizer, labels, args, data)
    logits = Trainer(model, args, label_names=labels.names, tokenizer=tokenizer).predict(features)
    scores = [task.prediction(e, f, row, labels.names)["score"] for e, f, row in zip(examples, features, logits)]
    for query, candidates in task.rankings(examples, scores).items():
        yield {"query": query, "ranking": [{"passage": passage, "score": score,
                                            **({} if label is None else {"label": label})}
                                           for passage, score, label in candidates]}


def embed(model, data, batch_size=64, device="cpu", max_length=None, pooling=None):
    """Sentence embeddings (N, H), in input order, of the texts of `data`: a .txt file (a text a
    line), a CSV/TSV/JSON lines file (its text column), or - (standard input), by a
    sentence-transformers directory or any checkpoint (mean pooling, normalised)."""
    from minisft.tasks.data import TEXT_COLUMNS, pick_column, read_records

    if is_text_lines(data):
        lines = sys.stdin if data == "-" else read_text(data).splitlines()
        texts = [line.rstrip("\n") for line in lines if line.strip()]
    else:
        path = resolve_data(data, "test")[0]
        records = read_records(path)
        column = pick_column(path, list(records[0][1]), None, TEXT_COLUMNS + ("anchor",), "text", "a text column")
        texts = [str(record[column]) for _, record in records]
    if not texts:
        raise DataError(f"{data}: no texts to embed")
    return _embedder(model, batch_size, device, max_length, pooling)(texts)


def _embedder(model, batch_size, device, max_length=None, pooling=None):
    """texts -> their (N, H) embeddings, in order, by `model` (a sentence-transformers
    directory, or any checkpoint: mean pooling, normalised)."""
    from minisft.engine.tensor import no_grad
    from minisft.models.sentence import SentenceEmbedder
    from minisft.tasks.data import collate, eval_order

    if str(model).endswith(".onnx"):
        embedder, tokenizer = exported_embedder(pathlib.Path(model), pooling)
    else:
        model_dir = resolve_model(model)
        embedder = _placed(SentenceEmbedder.from_pretrained(model_dir, pooling=pooling), device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def run(texts):
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length or embedder.max_seq_length,
                            return_tensors=None)
        features = [{"input_ids": ids, "token_type_ids": types}
                    for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"])]
        embeddings = None
        with no_grad():
            for indices in eval_order(features, batch_size):
                batch = collate([features[i] for i in indices], tokenizer.pad_token_id)
                out = embedder(batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"]).logits.numpy()
                if embeddings is None:
                    embeddings = numpy.empty((len(texts), out.shape[-1]), dtype=out.dtype)
                embeddings[indices] = out
        return embeddings
    return run


def mine_hard_negatives(model, data, output, settings, batch_size=64, device="cpu", max_length=None):
    """Write `output` (.csv, .tsv or .jsonl): the (anchor, positive) pairs of `data` with hard
    negatives mined by `model` (see minisft.cli.mining). Returns (rows written, pairs that got
    fewer negatives than asked for, distinct anchors)."""
    from minisft.cli import mining
    from minisft.files.atomic import write_text_atomic
    from minisft.tasks.data import ANCHOR_COLUMNS, POSITIVE_COLUMNS, pick_columns, read_records, rows_error

    target = pathlib.Path(output)
    if target.suffix.lower() not in (".csv", ".tsv", ".jsonl"):
        raise OptionError("--output", output, "not a .csv, .tsv or .jsonl file", "name the output FILE.csv")
    if not target.parent.is_dir():
        raise OptionError("--output", output, f"its directory {target.parent} does not exist", "create it first")
    path = resolve_data(data, "train")[0]
    records = read_records(path)
    names = list(records[0][1])
    anchor, positive = pick_columns(path, names, (None, ANCHOR_COLUMNS, "anchor", "the file's header"),
                                    (None, POSITIVE_COLUMNS, "positive", "the file's header"))
    pairs = [(str(r.get(anchor) or ""), str(r.get(positive) or "")) for _, r in records]
    empty = [n for (n, _), (a, p) in zip(records, pairs) if not a.strip() or not p.strip()]
    if empty:
        raise rows_error(path, empty, f"have an empty {anchor!r} or {positive!r}", "fill them in or remove them")
    embed = _embedder(model, batch_size, device, max_length)
    rows, short = mining.mine([a for a, _ in pairs], [p for _, p in pairs], embed, settings)
    header = mining.columns(anchor, positive, settings)
    write_text_atomic(_table(target, header, rows), target)
    return len(rows), short, len(set(a for a, _ in pairs))


def _table(path, header, rows):
    """rows under header as CSV/TSV, or as JSON lines, by path's suffix."""
    import csv
    import io

    if path.suffix.lower() == ".jsonl":
        return "".join(json.dumps(dict(zip(header, row)), ensure_ascii=False) + "\n" for row in rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
