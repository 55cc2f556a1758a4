"""--class-weights: one weight per class in the cross-entropy, as torch's
CrossEntropyLoss(weight=...) takes them (the mean divides by the sum of the targets' weights).

- "balanced": class c weighs n / (C n_c), scikit-learn's compute_class_weight("balanced"):
  n labels the loss sees in the training features (each sentence's label; each labeled
  token), C classes, n_c of them class c;
- "LABEL=W,...": the named classes' weights, every other class 1.
"""
import numpy

from minisft import tasks
from minisft.training.options import OptionError

FLAG = "--class-weights"


def resolve(spec, task_name, label_names, features):
    """The (C,) float32 weights that `spec` gives the classes `label_names` of this task's
    training `features`; OptionError for a task without classes, an unknown label, or a
    weight that is not a positive number."""
    task = tasks.get(task_name)
    if not task.class_weighted:
        raise OptionError(FLAG, spec, f"{task_name} has no classes to weigh",
                          "use it with classification, pair-classification or token-classification, or leave it out")
    counts = numpy.bincount([c for f in features for c in task.loss_classes(f)], minlength=len(label_names))
    if spec == "balanced":
        missing = [name for name, count in zip(label_names, counts) if count == 0]
        if missing:
            raise OptionError(FLAG, spec, f"class {missing[0]!r} has no labeled example in the training features "
                                          "(all truncated away?)", "name the weights instead: LABEL=W,...")
        return (counts.sum() / (len(label_names) * counts)).astype(numpy.float32)
    weights = numpy.ones(len(label_names), dtype=numpy.float32)
    index = {name: i for i, name in enumerate(label_names)}
    for part in spec.split(","):
        name, equals, value = part.strip().rpartition("=")
        if not equals or not name:
            raise OptionError(FLAG, spec, f"{part.strip()!r} is not LABEL=WEIGHT", "e.g. --class-weights pos=2,neg=1 "
                              "or --class-weights balanced")
        if name not in index:
            raise OptionError(FLAG, spec, f"no label {name!r} in the training data (labels: {', '.join(label_names)})",
                              "name labels of the training data")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not (numpy.isfinite(weight) and weight > 0):
            raise OptionError(FLAG, spec, f"the weight of {name!r} is {value!r}, not a positive number",
                              "give each named label a weight > 0")
        weights[index[name]] = weight
    return weights


def describe(weights, label_names):
    """'name=w, ...' for the log."""
    return ", ".join(f"{name}={float(w):.4g}" for name, w in zip(label_names, weights))
