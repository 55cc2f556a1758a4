"""The fine-tuning loop: batches -> loss -> backward -> clip -> AdamW -> schedule, with
evaluation, best-model selection, early stopping, progress, metrics as JSON lines, and
checkpoints that resume exactly.

Output directory layout:
    config.json, model.safetensors, vocab.txt, tokenizer_config.json   the final (best) model,
                                                                       loadable by transformers
    training_args.json      the arguments of the run (task, columns, labels, hyper-parameters)
    metrics.jsonl           one JSON object per log line and per evaluation
    checkpoint-STEP/        model + optimizer.safetensors + trainer_state.json, for --resume
    best/                   the best model so far, when evaluating

Started by mpiexec with several ranks, the trainer is data-parallel (minisft.training.distributed):
each rank takes its share of every global batch, gradients are summed across ranks during
backward, evaluation is shared out and gathered, and only rank 0 writes files and logs.
"""
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import sys
from dataclasses import dataclass

from minisft import __version__, tasks
from minisft.engine import amp, random
from minisft.engine.backend import Device
from minisft.engine.runtime import keep_freed_memory
from minisft.engine.tensor import no_grad
from minisft.files.atomic import write_json_atomic
from minisft.files.weights import load_safetensors, save_safetensors
from minisft.tasks.data import collate, eval_order, steps_per_epoch, train_order
from minisft.training import class_weights, distributed, tensorboard
from minisft.training.optim import SCHEDULES, AdamW, clip_grad_norm_, parameter_groups
from minisft.training.options import check_training_arguments
from minisft.training.progress import Progress, fmt

class TrainingError(RuntimeError):
    pass


@dataclass
class TrainingArguments:
    """Hyper-parameters, with the defaults of transformers' run_glue."""
    output_dir: str
    task: str = tasks.DEFAULT
    learning_rate: float = 2e-5
    batch_size: int = 32
    eval_batch_size: int = 64
    num_train_epochs: float = 3.0
    max_steps: int = -1                  # > 0 overrides num_train_epochs
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0            # used when warmup_steps is 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0           # 0 disables clipping
    lr_scheduler_type: str = "linear"    # linear, cosine, constant
    eval_steps: int = 0                  # 0: evaluate at each epoch end only
    save_steps: int = 0                  # 0: checkpoint at each epoch end only
    save_total_limit: int = 2
    logging_steps: int = 50
    metric_for_best_model: str = None    # default per task: accuracy, pearson, f1
    early_stopping_patience: int = 0     # evaluations without improvement; 0 disables
    seed: int = 42
    max_length: int = 128
    group_by_length: bool = True
    label_all_tokens: bool = False
    text_column: str = None
    text_pair_column: str = None
    label_column: str = None
    keep_freed_memory: bool = False      # glibc keeps freed memory for reuse (process-wide; the CLI turns it on)
    freeze_embeddings: bool = False      # lean fine-tuning (minisft.peft): frozen embeddings
    freeze_layers: int = 0               # the lowest N encoder layers frozen
    lora_r: int = 0                      # > 0: LoRA adapters of this rank, the rest frozen but the head
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_target_modules: list = None     # default: the family's (query/value)
    merge_adapters: bool = False         # write a plain merged checkpoint instead of the adapter
    fp16: bool = False                   # mixed precision (minisft.engine.amp): float16 products, loss scaling
    gradient_checkpointing: bool = False  # recompute encoder layers in backward: less memory
    doc_stride: int = 128                # question answering: tokens that windows of a long context overlap
    skip_misaligned: bool = False        # question answering: leave out answers not at their answer_start
    max_train_examples: int = 0          # > 0: a deterministic subset of the training examples
    max_eval_examples: int = 0           # > 0: a deterministic subset of the evaluation examples
    class_weights: str = None            # "balanced" or "LABEL=W,...": a weighted cross-entropy (class_weights.py)
    label_separator: str = ";"           # multi-label classification: between a CSV/TSV cell's class names
    threshold: float = 0.5               # multi-label classification: a class is predicted where sigmoid >= this
    report_to: str = "none"              # "tensorboard": metrics.jsonl's scalars also as TensorBoard events in runs/
    matryoshka_dims: list = None         # embedding: MatryoshkaLoss around MNRL at these leading dimensions

    def to_json(self):
        return dataclasses.asdict(self)

    @property
    def best_metric(self):
        return self.metric_for_best_model or tasks.get(self.task).default_metric

    @property
    def greater_is_better(self):
        return not self.best_metric.endswith(("loss", "mse"))


@dataclass
class TrainerState:
    """Where training stands; saved with every checkpoint."""
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float = None
    best_step: int = None
    evaluations_without_improvement: int = 0


class Trainer:
    """Fine-tunes `model` on encoded features (see minisft.tasks.base.Task.encode)."""

    def __init__(self, model, args, train_features=None, eval_features=None, label_names=None,
                 tokenizer=None, log=None, on_evaluate=None, communicator=None):
        """on_evaluate: called with no arguments after each evaluation is written to
        metrics.jsonl (e.g. to draw the curves). communicator: the ranks to train with
        (default distributed.world(): those mpiexec started, or this process alone)."""
        check_training_arguments(args)
        self.comm = communicator or distributed.world()
        self.is_main = self.comm.rank == 0
        self.model = model
        self.args = args
        self.train_features = train_features
        self.eval_features = eval_features
        self.label_names = label_names
        self.tokenizer = tokenizer
        self.output_dir = pathlib.Path(args.output_dir)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer is not None else 0
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        if not self.is_main:
            self.log = lambda message: None
        self.on_evaluate = on_evaluate
        self.state = TrainerState()
        self.scaler = amp.GradScaler() if args.fp16 else None
        self._last_eval_step = None
        self._report = None  # the TensorBoard writer (--report-to tensorboard), made when training starts
        self.class_weights = None
        if args.class_weights and train_features:
            self.class_weights = class_weights.resolve(args.class_weights, args.task, label_names, train_features)
            self.log(f"class weights: {class_weights.describe(self.class_weights, label_names)}")

    # --- setup ----------------------------------------------------------------------------
    def total_steps(self):
        args = self.args
        per_epoch = steps_per_epoch(len(self.train_features), args.batch_size, args.gradient_accumulation_steps)
        if args.max_steps > 0:
            return args.max_steps
        return max(1, math.ceil(args.num_train_epochs * per_epoch))

    def _build_optimizer(self, total):
        args = self.args
        optimizer = AdamW(parameter_groups(self.model, args.weight_decay), lr=args.learning_rate,
                          betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                          weight_decay=args.weight_decay)
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total)
        if args.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"unknown lr_scheduler_type {args.lr_scheduler_type!r}; "
                             f"choose {', '.join(SCHEDULES)}")
        return optimizer, SCHEDULES[args.lr_scheduler_type](optimizer, warmup, total)

    # --- the loop ---------------------------------------------------------------------------
    def train(self, resume_from=None):
        """Train to the end (or early stop); write the final model. Returns the last
        evaluation's metrics (or {} without eval data)."""
        args = self.args
        if not self.train_features:
            raise TrainingError("no training examples")
        reducer = self._join_ranks() if self.comm.size > 1 else None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _remove_partial_checkpoints(self.output_dir)
        if args.keep_freed_memory:
            keep_freed_memory()
        total = self.total_steps()
        optimizer, schedule = self._build_optimizer(total)
        if resume_from is not None:
            self._load_checkpoint(resume_from, optimizer, schedule)
            self.log(f"resumed from {resume_from} at step {self.state.global_step}")
        elif self.is_main:
            _remove_previous_run(self.output_dir)
        if self.is_main and args.report_to == "tensorboard" and self._report is None:
            self._report = tensorboard.TensorBoardReport(self.output_dir / "runs")
        self.model.train()
        accumulation = args.gradient_accumulation_steps
        progress = Progress(total, self.state.global_step, self.log, args.logging_steps)
        last_metrics, stop = {}, False
        on_gpu = any(p.device.type == "cuda" for p in self.model.parameters())
        while self.state.global_step < total and not stop:
            batches = train_order(self.train_features, args.batch_size, args.seed, self.state.epoch,
                                  args.group_by_length)
            starts_step = True
            for index in range(self.state.batch_in_epoch, len(batches)):
                completes_step = not ((index + 1) % accumulation and index + 1 < len(batches))
                if starts_step and (reducer is not None or on_gpu):
                    # dropout draws follow from (seed, rank, step): the same on any number of
                    # ranks, and exact on resume on a GPU, whose generator's state CuPy cannot read
                    random.manual_seed(distributed.rank_seed(args.seed, self.comm.rank, self.state.global_step))
                if reducer is not None and completes_step:
                    reducer.start()
                starts_step = completes_step
                loss = self._forward_backward(batches[index], accumulation)
                self.state.batch_in_epoch = index + 1
                if not completes_step:
                    continue
                if reducer is not None:
                    reducer.wait()
                overflow = self.scaler is not None and self.scaler.unscale_(self.model.parameters())
                if args.max_grad_norm and not overflow:
                    clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                if not overflow:  # an overflowed fp16 step is skipped, as torch.amp and transformers do
                    optimizer.step()
                    schedule.step()
                if self.scaler is not None:
                    self.scaler.update(overflow)
                optimizer.zero_grad()
                self.state.global_step += 1
                step = self.state.global_step
                record = progress.update(step, loss, schedule.get_last_lr()[0], self.state.epoch)
                if record:
                    self._append_metrics(record)
                if args.eval_steps and step % args.eval_steps == 0 and self.eval_features:
                    last_metrics = self._evaluate_and_select()
                    stop = self._should_stop()
                if args.save_steps and step % args.save_steps == 0:
                    self._save_checkpoint(optimizer, schedule)
                if step >= total or stop:
                    break
            if self.state.batch_in_epoch == len(batches):  # the epoch is complete
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                if self.eval_features and not (args.eval_steps and self.state.global_step % args.eval_steps == 0):
                    last_metrics = self._evaluate_and_select()
                    stop = self._should_stop()
                if not (args.save_steps and self.state.global_step % args.save_steps == 0):
                    self._save_checkpoint(optimizer, schedule)
        progress.close()
        if self.eval_features and self._last_eval_step != self.state.global_step:
            last_metrics = self._evaluate_and_select()
        if stop:
            self.log(f"early stopping at step {self.state.global_step}: no improvement in "
                     f"{args.early_stopping_patience} evaluations")
        self._save_final()
        return last_metrics

    def _join_ranks(self):
        """Before data-parallel training: check that every rank can share the batch and runs
        the same minisft on the same data, start every rank from rank 0's weights, and hook
        the gradient buckets into backward."""
        distributed.per_rank_batch(self.args.batch_size, self.comm.size)
        fix = "every rank must read the same files: give each host identical copies (or a shared directory)"
        distributed.check_same_everywhere(self.comm, {
            "minisft version": (__version__, "install the same minisft on every host"),
            "training data": (distributed.fingerprint(self.train_features), fix),
            "evaluation data": (distributed.fingerprint(self.eval_features), fix)})
        self.comm.broadcast_arrays([p.data for p in self.model.parameters()])
        return distributed.GradientReducer(self.comm, self.model.parameters())

    def _forward_backward(self, indices, accumulation):
        """Forward and backward of this rank's share of a global batch; returns the batch's
        mean loss (over every rank's share)."""
        weight = 1.0
        if self.comm.size > 1:
            terms = tasks.get(self.args.task).loss_terms
            total = sum(terms(self.train_features[i], self.class_weights) for i in indices)
            indices = distributed.shard(indices, self.comm.rank, self.comm.size)
            weight = sum(terms(self.train_features[i], self.class_weights) for i in indices) / (total or 1)
        value = self._local_loss(indices, weight / accumulation) if weight else 0.0
        value = self.comm.allreduce_sum(value * weight)
        if not math.isfinite(value):
            last = latest_checkpoint(self.output_dir)
            raise TrainingError(
                f"the loss became {value} at step {self.state.global_step + 1} (epoch {self.state.epoch}); "
                f"training stopped. The last good checkpoint is {last or 'none (none saved yet)'}; "
                f"try a lower --learning-rate or --max-grad-norm, then --resume")
        return value

    def _local_loss(self, indices, scale):
        """The mean loss of these features; backward of scale x it."""
        batch = collate([self.train_features[i] for i in indices], self.pad_token_id)
        with amp.autocast(enabled=self.scaler is not None):
            loss = tasks.get(self.args.task).training_loss(self.model, batch, self.args, self.class_weights)
        scaled = loss * scale if scale != 1 else loss
        (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
        return float(loss.item())

    # --- evaluation --------------------------------------------------------------------------
    def predict(self, features):
        """Logits for every feature, in order: (N, num_labels), or a list of (L_i, num_labels)
        arrays for token classification."""
        self.model.eval()
        mine = []  # (feature index, output): this rank's batches, every size-th
        with no_grad():
            for indices in eval_order(features, self.args.eval_batch_size)[self.comm.rank::self.comm.size]:
                batch = collate([features[i] for i in indices], self.pad_token_id)
                logits = self.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                    token_type_ids=batch["token_type_ids"]).logits.numpy()
                mine += [(i, logits[row, :len(features[i]["input_ids"])] if logits.ndim == 3 else logits[row])
                         for row, i in enumerate(indices)]
        self.model.train()
        outputs = [None] * len(features)
        for part in self.comm.allgather(mine):
            for i, output in part:
                outputs[i] = output
        return tasks.get(self.args.task).gather(outputs)

    def evaluate(self, features, prefix="eval"):
        """Metrics on labeled features, as {f"{prefix}_{name}": value} ({name: value}
        without a prefix)."""
        task = tasks.get(self.args.task)
        scores = task.evaluate(features, self.predict(features), self.label_names, **task.output_options(self.args))
        return {(f"{prefix}_{k}" if prefix else k): v for k, v in scores.items()}

    def _evaluate_and_select(self):
        self._last_eval_step = self.state.global_step
        scores = self.evaluate(self.eval_features)
        key = f"eval_{self.args.best_metric}"
        if key not in scores:
            raise TrainingError(f"metric_for_best_model {self.args.best_metric!r} is not computed for "
                                f"{self.args.task}; choose one of {', '.join(k[5:] for k in scores)}")
        value = scores[key]
        best = self.state.best_metric
        improved = best is None or (value > best if self.args.greater_is_better else value < best)
        if improved:
            self.state.best_metric, self.state.best_step = value, self.state.global_step
            self.state.evaluations_without_improvement = 0
            if self.is_main:
                self._save_model(self.output_dir / "best")
        else:
            self.state.evaluations_without_improvement += 1
        record = {"step": self.state.global_step, "epoch": self.state.epoch, **scores}
        self._append_metrics(record)
        if self.on_evaluate is not None and self.is_main:
            self.on_evaluate()
        self.log(" ".join(f"{k}={fmt(v)}" for k, v in record.items()) + (" (best)" if improved else ""))
        return scores

    def _should_stop(self):
        patience = self.args.early_stopping_patience
        return bool(patience) and self.state.evaluations_without_improvement >= patience

    # --- saving ------------------------------------------------------------------------------
    def _append_metrics(self, record):
        if not self.is_main:
            return
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._report is not None:
            self._report.write(record)

    def close(self):
        """Close what the run keeps open (the TensorBoard writer)."""
        if self._report is not None:
            self._report.close()
            self._report = None

    def _write_model(self, directory):
        """Model, tokenizer and arguments: a directory transformers and minisft load."""
        self.model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        write_json_atomic(self.args.to_json(), pathlib.Path(directory) / "training_args.json")

    def _save_model(self, directory):
        """_write_model into a temporary directory, then swapped in whole by renames."""
        _write_staged(directory, self._write_model)

    def _save_final(self):
        """The best model (or the last, without evaluation) into output_dir itself, each
        file written to a temporary name and renamed; with merge_adapters, LoRA adapters are
        merged first, so that a plain checkpoint is written instead of the adapter."""
        self.comm.barrier()  # rank 0 has written best/
        best = self.output_dir / "best"
        if best.is_dir():
            self.model.load_saved(best)
        if self.args.merge_adapters and hasattr(self.model, "merge_and_unload"):
            self.model = self.model.merge_and_unload()
        if self.is_main:
            self._write_model(self.output_dir)

    def _save_checkpoint(self, optimizer, schedule):
        """checkpoint-STEP/: written to a temporary directory, then renamed: an interrupted
        write never touches the previous checkpoint. Rank 0 writes; every rank's state is the same."""
        if not self.is_main:
            return

        def write(staging):
            self.model.save_pretrained(staging)
            optimizer_state = optimizer.state_dict()
            arrays = {f"{i}.{name}": Device("cpu").put(value) for i, entry in optimizer_state["state"].items()
                      for name, value in entry.items() if hasattr(value, "shape")}
            save_safetensors(arrays, staging / "optimizer.safetensors")
            scalars = {str(i): {name: value for name, value in entry.items() if not hasattr(value, "shape")}
                       for i, entry in optimizer_state["state"].items()}
            write_json_atomic({"trainer": dataclasses.asdict(self.state),
                               "optimizer": {"state": scalars, "param_groups": optimizer_state["param_groups"]},
                               "schedule": schedule.state_dict(), "rng": random.get_rng_state(),
                               "scaler": None if self.scaler is None else self.scaler.state_dict(),
                               "args": self.args.to_json()}, staging / "trainer_state.json")

        _write_staged(self.output_dir / f"checkpoint-{self.state.global_step}", write)
        checkpoints = _checkpoints(self.output_dir)
        for old in checkpoints[:-self.args.save_total_limit] if self.args.save_total_limit else []:
            shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, directory, optimizer, schedule):
        directory = pathlib.Path(directory)
        try:
            saved = json.loads((directory / "trainer_state.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TrainingError(f"{directory} is not a checkpoint (no trainer_state.json)") from None
        self.model.load_saved(directory)
        arrays = load_safetensors(directory / "optimizer.safetensors")
        state = {}
        for i, scalars in saved["optimizer"]["state"].items():
            state[int(i)] = dict(scalars)
        for key, value in arrays.items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = value
        for group in saved["optimizer"]["param_groups"]:
            group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": saved["optimizer"]["param_groups"]})
        schedule.load_state_dict(saved["schedule"])
        random.set_rng_state(saved["rng"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.state = TrainerState(**saved["trainer"])


def _write_staged(directory, write):
    """write(staging directory) into .NAME.tmp beside `directory`, then swap it in whole:
    an interrupted write never touches the previous `directory`."""
    staging = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    _swap_in(staging, directory)


def _swap_in(staging, directory):
    """Replace `directory` by `staging` with renames only."""
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.rename(directory, old)
    os.rename(staging, directory)
    shutil.rmtree(old, ignore_errors=True)


def _checkpoints(output_dir):
    found = [p for p in pathlib.Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir):
    """The newest complete checkpoint-STEP directory, or None."""
    checkpoints = _checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _remove_previous_run(output_dir):
    """A fresh run in a reused directory (--overwrite-output-dir) must not pick up the old
    run's best model, checkpoints or metrics; other files are left alone."""
    output_dir = pathlib.Path(output_dir)
    for path in [output_dir / "best", *_checkpoints(output_dir)]:
        shutil.rmtree(path, ignore_errors=True)
    (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(output_dir / "runs", ignore_errors=True)  # the old run's TensorBoard events


def _remove_partial_checkpoints(output_dir):
    """Temporary directories left by an interrupted save."""
    for path in pathlib.Path(output_dir).glob(".*.tmp"):
        shutil.rmtree(path, ignore_errors=True)

