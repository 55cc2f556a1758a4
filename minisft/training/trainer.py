"""The fine-tuning loop: batches -> loss -> backward -> clip -> AdamW -> schedule, with
evaluation, best-model selection, early stopping, progress, metrics as JSON lines, and
checkpoints that resume exactly.

Output directory layout:
    config.json, model.safetensors, vocab.txt, tokenizer_config.json   the final (best) model,
                                                                       loadable by transformers
    training_args.json      the arguments of the run (task, columns, labels, hyper-parameters)
    metrics.jsonl           one JSON object per log line and per evaluation
    checkpoint-STEP/        model + optimizer.safetensors + trainer_state.json + sha256sums.json,
                            for --resume (minisft.training.checkpoints)
    best/                   the best model so far, while evaluating; moved into output_dir at the end

Started by mpiexec with several ranks, the trainer is data-parallel (minisft.training.distributed):
each rank takes its share of every global batch, gradients are summed across ranks during
backward, evaluation is shared out and gathered, and only rank 0 writes files and logs.
"""
import dataclasses
import json
import math
import pathlib
import shutil
import sys
from dataclasses import dataclass

from minisft import __version__, tasks
from minisft.engine import amp, random
from minisft.engine.errors import UserError
from minisft.engine.runtime import keep_freed_memory
from minisft.engine.tensor import no_grad
from minisft.files.atomic import append_line, move_files, write_json_atomic
from minisft.tasks.data import collate, eval_order, steps_per_epoch, train_order
from minisft.training import checkpoints, class_weights, distributed, stopping, tensorboard
from minisft.training.optim import SCHEDULES, AdamW, clip_grad_norm_, grad_norm, parameter_groups
from minisft.training.options import OptionError, check_training_arguments
from minisft.training.progress import Progress, fmt

class TrainingError(UserError, RuntimeError):
    """A run that cannot go on (no examples, a non-finite loss or gradient, nothing to resume): exit 1."""
    exit_code = 1


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
    skip_nonfinite_steps: int = 0        # float32: skip up to N steps whose loss or gradient is inf/NaN

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
    skipped_steps: int = 0               # non-finite steps skipped (--skip-nonfinite-steps)


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
        self._saved_step = None  # the step of the newest checkpoint written (or resumed from)
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
            raise OptionError("--scheduler", args.lr_scheduler_type, f"choose {', '.join(SCHEDULES)}",
                              "give one of those")
        return optimizer, SCHEDULES[args.lr_scheduler_type](optimizer, warmup, total)

    # --- the loop ---------------------------------------------------------------------------
    def train(self, resume_from=None, stop=None):
        """Train to the end (or early stop); write the final model. Returns the last
        evaluation's metrics (or {} without eval data). stop: a stopping.SignalStop, asked
        after every step: once any rank has had a signal, every rank writes the checkpoint of
        that step and raises stopping.Stopped."""
        args = self.args
        if not self.train_features:
            raise TrainingError("no training examples")
        reducer = self._join_ranks() if self.comm.size > 1 else None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            checkpoints.remove_partial(self.output_dir)
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
        last_metrics, early_stop = {}, False
        on_gpu = any(p.device.type == "cuda" for p in self.model.parameters())
        while self.state.global_step < total and not early_stop:
            batches = train_order(self.train_features, args.batch_size, args.seed, self.state.epoch,
                                  args.group_by_length)
            starts_step, losses, rows = True, [], []
            for index in range(self.state.batch_in_epoch, len(batches)):
                completes_step = not ((index + 1) % accumulation and index + 1 < len(batches))
                if starts_step and (reducer is not None or on_gpu):
                    # dropout draws follow from (seed, rank, step): the same on any number of
                    # ranks, and exact on resume on a GPU, whose generator's state CuPy cannot read
                    random.manual_seed(distributed.rank_seed(args.seed, self.comm.rank, self.state.global_step))
                if reducer is not None and completes_step:
                    reducer.start()
                starts_step = completes_step
                losses.append(self._forward_backward(batches[index], accumulation))
                rows += batches[index]
                self.state.batch_in_epoch = index + 1
                if not completes_step:
                    continue
                if reducer is not None:
                    reducer.wait()
                loss = sum(losses) / len(losses)
                applied = self._optimizer_step(optimizer, schedule, loss, rows)
                losses, rows = [], []
                self.state.global_step += 1
                step = self.state.global_step
                record = progress.update(step, loss if applied else None, schedule.get_last_lr()[0], self.epoch())
                if record:
                    self._append_metrics(record)
                if args.eval_steps and step % args.eval_steps == 0 and self.eval_features:
                    last_metrics = self._evaluate_and_select()
                    early_stop = self._should_stop()
                if args.save_steps and step % args.save_steps == 0:
                    self._save_checkpoint(optimizer, schedule)
                self._stop_if_signalled(stop, optimizer, schedule)
                if step >= total or early_stop:
                    break
            if self.state.batch_in_epoch == len(batches):  # the epoch is complete
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                if self.eval_features and not (args.eval_steps and self.state.global_step % args.eval_steps == 0):
                    last_metrics = self._evaluate_and_select()
                    early_stop = self._should_stop()
                if not (args.save_steps and self.state.global_step % args.save_steps == 0):
                    self._save_checkpoint(optimizer, schedule)
        record = progress.finish()
        if record:
            self._append_metrics(record)
        progress.close()
        if self.eval_features and self._last_eval_step != self.state.global_step:
            last_metrics = self._evaluate_and_select()
        if early_stop:
            self.log(f"early stopping at step {self.state.global_step}: no improvement in "
                     f"{args.early_stopping_patience} evaluations")
        self._save_final()
        return last_metrics

    def epoch(self):
        """Epochs done, as a fraction (2.5: half-way through the third), as transformers logs it."""
        per_epoch = math.ceil(len(self.train_features) / self.args.batch_size)
        return round(self.state.epoch + self.state.batch_in_epoch / per_epoch, 4)

    def _optimizer_step(self, optimizer, schedule, loss, rows):
        """Unscale (fp16), check, clip and apply the summed gradients; zero them. Returns
        whether the step was applied: an fp16 overflow is skipped as torch.amp skips it, and
        a non-finite loss or gradient in float32 stops the run (TrainingError), or is skipped
        up to --skip-nonfinite-steps times. Either way no non-finite value reaches a weight."""
        args, parameters = self.args, self.model.parameters()
        overflow = self.scaler is not None and self.scaler.unscale_(parameters)
        applied = not overflow
        if not overflow:
            norm = clip_grad_norm_(parameters, args.max_grad_norm) if args.max_grad_norm else grad_norm(parameters)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                self._nonfinite_step(loss, norm, rows)
                applied = False
        if applied:
            optimizer.step()
            schedule.step()
        if self.scaler is not None:
            self.scaler.update(overflow)
        optimizer.zero_grad()
        return applied

    def _nonfinite_step(self, loss, norm, rows):
        """A float32 step whose loss or gradient norm is inf or NaN: skipped (and said) while
        --skip-nonfinite-steps allows, else TrainingError naming the step, its first input
        rows and the last checkpoint."""
        step = self.state.global_step + 1
        what = f"the loss was {loss}" if not math.isfinite(loss) else f"the gradients' norm was {norm}"
        sources = [self.train_features[i].get("row") for i in sorted(rows)]
        shown = ", ".join(s for s in sources[:4] if s) or "unknown rows"
        more = f" and {len(sources) - 4} more" if len(sources) > 4 else ""
        if self.state.skipped_steps < self.args.skip_nonfinite_steps:
            self.state.skipped_steps += 1
            self.log(f"step {step}: {what} (batch of {shown}{more}); skipped, {self.state.skipped_steps} of the "
                     f"{self.args.skip_nonfinite_steps} --skip-nonfinite-steps allows")
            return
        last = checkpoints.latest(self.output_dir)
        raise TrainingError(
            f"step {step} (epoch {self.state.epoch + 1}): {what}, in the batch of {shown}{more}; training stopped "
            f"and no weight was changed. The last good checkpoint is {last or 'none (none saved yet)'}; try a lower "
            f"--learning-rate or --max-grad-norm, fix those rows, or add --skip-nonfinite-steps N, then --resume")

    def _stop_if_signalled(self, stop, optimizer, schedule):
        """After a step: when any rank has had SIGTERM or SIGINT, every rank writes (rank 0)
        this step's checkpoint and raises Stopped, after the same step."""
        if stop is None or not self.comm.allreduce_sum(float(stop.signal is not None)):
            return
        number = next(s for s in self.comm.allgather(stop.signal) if s is not None)
        if self._saved_step != self.state.global_step:
            self._save_checkpoint(optimizer, schedule)
        self.comm.barrier()
        raise stopping.Stopped(number, self.state.global_step, self.output_dir / f"checkpoint-{self.state.global_step}")

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
        mean loss (over every rank's share), the same on every rank, finite or not."""
        weight = 1.0
        if self.comm.size > 1:
            terms = tasks.get(self.args.task).loss_terms
            total = sum(terms(self.train_features[i], self.class_weights) for i in indices)
            indices = distributed.shard(indices, self.comm.rank, self.comm.size)
            weight = sum(terms(self.train_features[i], self.class_weights) for i in indices) / (total or 1)
        value = self._local_loss(indices, weight / accumulation) if weight else 0.0
        return self.comm.allreduce_sum(value * weight)

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
        record = {"step": self.state.global_step, "epoch": self.epoch(), **scores}
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
        """One line of metrics.jsonl (and TensorBoard's events): written whole or not at all."""
        if not self.is_main:
            return
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        append_line(self.output_dir / "metrics.jsonl", json.dumps(finite, allow_nan=False))  # NaN: null
        if self._report is not None:
            self._report.write(record)

    def close(self):
        """Close what the run keeps open (the TensorBoard writer)."""
        if self._report is not None:
            self._report.close()
            self._report = None

    def _write_model(self, directory):
        """Model, tokenizer and arguments: a directory transformers and minisft load."""
        self._check_finite_weights()
        self.model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        write_json_atomic(self.args.to_json(), pathlib.Path(directory) / "training_args.json")

    def _save_model(self, directory):
        """_write_model into a temporary directory, then swapped in whole by renames."""
        checkpoints.write_staged(directory, self._write_model)

    def _check_finite_weights(self):
        """The last guard before any file: a non-finite weight is a bug (steps with a
        non-finite gradient are never applied), and must never be written."""
        bad = [name for name, p in self.model.named_parameters() if not p.device.xp.isfinite(p.data).all()]
        if bad:
            raise RuntimeError(f"non-finite weights in {', '.join(bad[:3])}: nothing written")

    def _save_final(self):
        """The best model (or the last, without evaluation) into output_dir itself: best/'s
        files moved there by renames (no second copy; best/ is then gone), or the model
        written beside it and renamed in; with merge_adapters, LoRA adapters are merged
        first, so that a plain checkpoint is written instead of the adapter."""
        self.comm.barrier()  # rank 0 has written best/
        best = self.output_dir / "best"
        has_best = best.is_dir()
        if has_best:
            self.model.load_saved(best)
        self.comm.barrier()  # every rank has read best/ before rank 0 moves its files
        merge = self.args.merge_adapters and hasattr(self.model, "merge_and_unload")
        if merge:
            self.model = self.model.merge_and_unload()
        if not self.is_main:
            return
        if has_best and not merge:
            move_files(best, self.output_dir)
        else:
            checkpoints.write_staged(self.output_dir / "final", self._write_model)
            move_files(self.output_dir / "final", self.output_dir)
            shutil.rmtree(best, ignore_errors=True)

    def _save_checkpoint(self, optimizer, schedule):
        """checkpoint-STEP/, written whole or not at all (minisft.training.checkpoints); then
        all but the newest save_total_limit removed. Rank 0 writes; every rank's state is the same."""
        self._saved_step = self.state.global_step
        if not self.is_main:
            return
        self._check_finite_weights()
        checkpoints.save(self.output_dir / f"checkpoint-{self.state.global_step}", self.model, optimizer, {
            "trainer": dataclasses.asdict(self.state), "schedule": schedule.state_dict(),
            "rng": random.get_rng_state(), "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "args": self.args.to_json()})
        removed = checkpoints.prune(self.output_dir, self.args.save_total_limit)
        self.log(f"checkpoint-{self.state.global_step} saved"
                 + (f" ({', '.join(removed)} removed: --save-total-limit {self.args.save_total_limit})" if removed else ""))

    def _load_checkpoint(self, directory, optimizer, schedule):
        saved = checkpoints.load(directory, self.model, optimizer)
        schedule.load_state_dict(saved["schedule"])
        random.set_rng_state(saved["rng"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.state = TrainerState(**saved["trainer"])
        self._saved_step = self.state.global_step


def latest_checkpoint(output_dir):
    """The newest checkpoint-STEP directory, or None."""
    return checkpoints.latest(output_dir)


def _remove_previous_run(output_dir):
    """A fresh run in a reused directory (--overwrite-output-dir) must not pick up the old
    run's best model, checkpoints or metrics; other files are left alone."""
    output_dir = pathlib.Path(output_dir)
    for path in [output_dir / "best", *checkpoints.all_in(output_dir)]:
        shutil.rmtree(path, ignore_errors=True)
    (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(output_dir / "runs", ignore_errors=True)  # the old run's TensorBoard events
