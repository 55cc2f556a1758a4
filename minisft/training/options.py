"""The valid range or set of every command-line option, declared once.

The parser checks each value as it reads it (`Number` and `Text` are argparse types), and the
workflows check them again against the model and the data once those are loaded. Every
violation is an OptionError: one line naming the option, the value, what is valid and the fix.
"""
import argparse
import math

from minisft.engine.errors import UsageError


class OptionError(UsageError):
    """An option value that cannot work: '--OPTION VALUE: what is valid; the fix'."""

    def __init__(self, option, value, valid, fix):
        super().__init__(f"{option} {value!r}: {valid}; {fix}")


class Number:
    """A finite int or float in [low, high] (either end may be None: unbounded; `above` makes
    the low end exclusive), or one of `also` (e.g. -1 for "unset")."""

    def __init__(self, kind, low=None, high=None, *, above=False, also=(), example):
        self.kind, self.low, self.high, self.above, self.also, self.example = kind, low, high, above, also, example

    def describe(self):
        what = "a whole number" if self.kind is int else "a number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.above else '>='} {self.low}")
        if self.high is not None:
            bounds.append(f"<= {self.high}")
        text = what + (" " + " and ".join(bounds) if bounds else "")
        return text + "".join(f" (or {v})" for v in self.also)

    def valid(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int and not isinstance(value, int)):
            return False
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.high is None or value <= self.high

    def __call__(self, text):
        """argparse's type: the value, or ArgumentTypeError naming what is valid."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.describe()}; e.g. {self.example}") from None
        if not self.valid(value):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: use {self.describe()}, e.g. {self.example}")
        return value


class Text:
    """A non-empty string without surrounding whitespace or control characters (a path, a
    column name, a data set name)."""

    def __init__(self, what):
        self.what = what

    def __call__(self, text):
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: an empty {self.what}; give a {self.what}")
        if any(ord(c) < 32 for c in text):
            raise argparse.ArgumentTypeError(f"{text!r}: control characters in a {self.what}; check the quoting")
        return text


class Names(argparse.Action):
    """nargs="+" names, spaced or comma-separated ("query value", "query,value") -> one list."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            names = [Text("name")(part.strip()) for value in values for part in value.split(",")]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, names)


def dimensions(text):
    """'384,256,128,64' -> [384, 256, 128, 64]: distinct whole numbers >= 1."""
    try:
        dims = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated whole numbers; e.g. 384,256,128,64") from None
    if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
        raise argparse.ArgumentTypeError(f"{text!r}: each dimension >= 1, none twice; e.g. 384,256,128,64")
    return dims


def device(text):
    """'cpu', 'cuda' or 'cuda:N'."""
    from minisft.engine.backend import Device

    try:
        return str(Device(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors ('minisft train: error: ...'), no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- the declared ranges of the training options ----------------------------------------------
TRAINING = {
    "learning_rate": Number(float, 0, 1, above=True, example="2e-5"),
    "batch_size": Number(int, 1, 65536, example=32),
    "eval_batch_size": Number(int, 1, 65536, example=64),
    "num_train_epochs": Number(float, 0, 10000, above=True, example=3),
    "max_steps": Number(int, 1, 10 ** 9, also=(-1,), example=1000),
    "max_length": Number(int, 2, 65536, example=128),
    "gradient_accumulation_steps": Number(int, 1, 65536, example=1),
    "warmup_steps": Number(int, 0, 10 ** 9, example=0),
    "warmup_ratio": Number(float, 0, 1, example=0.1),
    "weight_decay": Number(float, 0, 1, example=0.01),
    "max_grad_norm": Number(float, 0, 10 ** 6, example=1.0),
    "eval_steps": Number(int, 0, 10 ** 9, example=500),
    "save_steps": Number(int, 0, 10 ** 9, example=500),
    "save_total_limit": Number(int, 0, 10 ** 6, example=2),
    "logging_steps": Number(int, 1, 10 ** 9, example=50),
    "early_stopping_patience": Number(int, 0, 10 ** 6, example=3),
    "seed": Number(int, 0, 4294967295, example=42),
    "freeze_layers": Number(int, 0, 1000, example=2),
    "lora_r": Number(int, 0, 4096, example=8),
    "lora_alpha": Number(float, 0, 1e6, above=True, example=16),
    "lora_dropout": Number(float, 0, 0.99, example=0.1),
    "doc_stride": Number(int, 0, 65536, example=128),
    "max_train_examples": Number(int, 0, 10 ** 9, example=8000),
    "max_eval_examples": Number(int, 0, 10 ** 9, example=2000),
    "threshold": Number(float, 0, 1, above=True, example=0.5),
    "skip_nonfinite_steps": Number(int, 0, 10 ** 9, example=1),
}


# Options that act only in some combinations. The parser gives them no default (None: not
# given), so that a given one is refused where it would do nothing (minisft.cli.workflows).
# NEEDS: field -> (what it needs, how to add it): options that only act beside another.
NEEDS = {**{field: ("lora_r", "add --lora-r 8 (LoRA)")
            for field in ("lora_alpha", "lora_dropout", "lora_target_modules", "merge_adapters")},
         **{field: ("eval", "add --eval FILE")
            for field in ("eval_steps", "early_stopping_patience", "metric_for_best_model")},
         **{field: ("evaluation", "add --eval FILE or --test FILE") for field in ("eval_batch_size", "max_eval_examples")}}
# OVERRIDDEN: field -> (the option that overrides it, why): options another one makes moot.
OVERRIDDEN = {"num_train_epochs": ("max_steps", "--max-steps sets the run's length"),
              "warmup_ratio": ("warmup_steps", "--warmup-steps sets the warmup"),
              **{field: ("lora_r", "LoRA trains only its adapters and the task head, and freezes the rest")
                 for field in ("freeze_embeddings", "freeze_layers")}}


def flag(field):
    """The command-line spelling of a TrainingArguments field."""
    return {"num_train_epochs": "--epochs", "lr_scheduler_type": "--scheduler",
            "metric_for_best_model": "--metric"}.get(field, "--" + field.replace("_", "-"))


def check_training_arguments(args):
    """Every declared range, for arguments made in code rather than parsed (TrainingArguments)."""
    for field, number in TRAINING.items():
        value = getattr(args, field)
        if not number.valid(value):
            raise OptionError(flag(field), value, f"use {number.describe()}", f"e.g. {flag(field)} {number.example}")
