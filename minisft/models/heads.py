"""What every family's task heads share, plainly called from their forwards: the outputs,
the losses, the classifier dropout, multiple choice's rows, and the first-token
classification head of ELECTRA and RoBERTa.

Shapes: B batch, L sequence length, H hidden_size, C choices.
"""
from dataclasses import dataclass

from minisft.engine.errors import ModelFileError
from minisft import nn
from minisft.engine import functional as F
from minisft.engine.backend import get_array_module
from minisft.engine.tensor import Tensor, array_of
from minisft.engine.trace import outside_graph


@dataclass
class SequenceClassifierOutput:
    loss: Tensor = None          # scalar, when labels were given
    logits: Tensor = None        # (B, num_labels)
    hidden_states: tuple = None
    attentions: tuple = None


@dataclass
class TokenClassifierOutput:
    loss: Tensor = None          # scalar, when labels were given
    logits: Tensor = None        # (B, L, num_labels)
    hidden_states: tuple = None
    attentions: tuple = None


@dataclass
class QuestionAnsweringModelOutput:
    loss: Tensor = None          # scalar, when labels (start and end positions) were given
    logits: Tensor = None        # (B, L, 2): each token's start and end logits
    hidden_states: tuple = None
    attentions: tuple = None

    @property
    def start_logits(self):
        return self.logits[:, :, 0]

    @property
    def end_logits(self):
        return self.logits[:, :, 1]


@dataclass
class MultipleChoiceModelOutput:
    loss: Tensor = None          # scalar, when labels (the right choice of each) were given
    logits: Tensor = None        # (B, num_choices)
    hidden_states: tuple = None  # of the (B * num_choices) rows the base model ran
    attentions: tuple = None


def classifier_dropout(config):
    """The task heads' dropout: config.classifier_dropout, else hidden_dropout_prob."""
    p = config.classifier_dropout
    return nn.Dropout(config.hidden_dropout_prob if p is None else p)


def sequence_classification_loss(config, logits, labels):
    """The loss of a sequence classification head, for any family: config.problem_type's, or
    inferred as transformers does: regression (MSE) when num_labels == 1, single-label
    classification (cross-entropy) for integer labels, multi-label classification (BCE with
    logits) for float label vectors. logits (B, num_labels); labels (B,) ints, (B,) floats,
    or (B, num_labels) floats."""
    problem = config.problem_type
    if not problem:
        kind = array_of(labels).dtype.kind
        problem = ("regression" if config.num_labels == 1 else
                   "single_label_classification" if kind in "iu" else "multi_label_classification")
    if problem == "regression":
        return F.mse_loss(logits.reshape(-1), _as_float(labels, logits).reshape(-1))
    if problem == "single_label_classification":
        return F.cross_entropy(logits, labels.reshape(-1) if hasattr(labels, "reshape") else labels)
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, _as_float(labels, logits))
    raise ModelFileError(f"config.json: unknown problem_type {problem!r}; use regression, "
                     "single_label_classification or multi_label_classification")


def token_classification_loss(logits, labels):
    """Cross-entropy over every token of (B, L, num_labels) logits and (B, L) labels, for any
    family; labels -100 are ignored."""
    labels = array_of(labels)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def question_answering_loss(logits, labels):
    """The mean of the start and the end positions' cross-entropies, for any family: logits
    (B, L, 2), labels (B, 2) token positions; a position past the input is ignored
    (transformers clamps it to the length, then ignores it)."""
    labels = logits.device.put(array_of(labels))
    xp = get_array_module(labels)
    labels = xp.where(labels >= logits.shape[1], -100, xp.maximum(labels, 0))
    return (F.cross_entropy(logits[:, :, 0], labels[:, 0]) + F.cross_entropy(logits[:, :, 1], labels[:, 1])) / 2


@outside_graph("choices_as_rows")
def choices_as_rows(input_ids, *arrays):
    """Multiple choice's (B, C, L) ids, mask and token types as B * C rows (B * C, L) each
    (None stays None), and (B, C)."""
    ids = array_of(input_ids)
    if ids.ndim != 3:
        raise ValueError(f"input_ids has shape {tuple(ids.shape)}; expected (batch, num_choices, seq_len)")
    rows = [None if a is None else array_of(a).reshape(-1, ids.shape[-1]) for a in (ids,) + arrays]
    return rows, ids.shape[:2]


class FirstTokenClassificationHead(nn.Module):
    """out_proj(dropout(activation(dense(dropout(hidden state of the first token))))):
    (B, L, H) -> (B, num_labels); ELECTRA's (gelu) and RoBERTa's (tanh) classification head."""

    def __init__(self, config, activation):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = classifier_dropout(config)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        self.activation = activation

    def forward(self, features):
        x = self.dropout(features[:, 0])
        return self.out_proj(self.dropout(self.activation(self.dense(x))))


def _as_float(labels, like):
    """Float targets in the logits' dtype, on the logits' device."""
    return Tensor(like.device.put(array_of(labels)).astype(like.dtype))
