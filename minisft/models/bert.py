"""BERT, as transformers' modeling_bert.py lays it out: same class and attribute names, so
`named_parameters()` yields the checkpoint's keys and loading is a name-for-name copy.

Shapes: B batch, L sequence length, H hidden_size, nh heads of dh = H / nh.
"""
import functools
import pathlib
from dataclasses import dataclass

import numpy

from minisft.engine.errors import MissingFile
from minisft import nn
from minisft.engine import functional as F
from minisft.engine import random
from minisft.engine.backend import read_back
from minisft.files.weights import load_checkpoint, load_into, load_safetensors, save_safetensors
from minisft.models.config import BertConfig
from minisft.models.heads import (MultipleChoiceModelOutput, QuestionAnsweringModelOutput, SequenceClassifierOutput,
                                  TokenClassifierOutput, choices_as_rows, classifier_dropout, question_answering_loss,
                                  sequence_classification_loss, token_classification_loss)
from minisft.engine.tensor import Tensor, array_of
from minisft.engine.trace import outside_graph

__all__ = ["BertConfig", "BertModel", "BertForSequenceClassification", "BertForTokenClassification",
           "BaseModelOutputWithPooling", "SequenceClassifierOutput", "TokenClassifierOutput"]

GELU_FORMS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # F.gelu's approximate
ACTIVATIONS = {  # f(x)
    **{name: functools.partial(F.gelu, approximate=form) for name, form in GELU_FORMS.items()},
    "relu": F.relu,
}


@dataclass
class BaseModelOutputWithPooling:
    last_hidden_state: Tensor                 # (B, L, H)
    pooler_output: Tensor = None              # (B, H)
    hidden_states: tuple = None               # num_hidden_layers + 1 of (B, L, H)
    attentions: tuple = None                  # num_hidden_layers of (B, nh, L, L)


def _as_ids(name, ids, shape=None):
    """Integer ids as an int64 numpy/cupy array of the expected shape."""
    if ids is None:
        return None
    ids = ids.data if isinstance(ids, Tensor) else ids
    if not hasattr(ids, "dtype"):
        ids = numpy.asarray(ids)
    if ids.dtype.kind not in "iub":
        raise TypeError(f"{name} must hold integers, not {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or (shape is not None and tuple(ids.shape) != tuple(shape)):
        raise ValueError(f"{name} has shape {tuple(ids.shape)}; expected "
                         f"{tuple(shape) if shape else '(batch, seq_len)'}")
    return ids.astype(numpy.int64, copy=False)


def _check_range(name, ids, size, field):
    """ids in [0, size): read where they are (from the device once, when they are on a GPU)."""
    low, high = (int(v) for v in read_back(ids.min(), ids.max()))
    if low < 0 or high >= size:
        raise IndexError(f"{name} contain id {high if high >= size else low}, outside "
                         f"[0, {size}) set by config.json {field}; was the input made with this "
                         "model's tokenizer (vocab.txt)?")


@outside_graph("attention_bias")
def attention_bias(attention_mask, hidden):
    """The additive (B, 1, 1, L) bias that masks padding keys, or None when nothing is masked:
    padding gets the dtype's most negative value, which exp() makes exactly 0."""
    if attention_mask is None or attention_mask.all():
        return None
    mask = hidden.device.put(attention_mask)
    return ((1 - mask[:, None, None, :]) * numpy.finfo(hidden.dtype).min).astype(hidden.dtype)


@outside_graph("token_weights")
def token_weights(attention_mask, dtype):
    """The mask (B, L) as weights (B, L, 1) of `dtype`: 1 at tokens, 0 at padding."""
    return attention_mask[..., None].astype(dtype)


@outside_graph("token_counts")
def token_counts(attention_mask, dtype, floor=None):
    """The tokens of each row, (B, L) -> (B, 1) of `dtype`, at least `floor` when given."""
    counts = attention_mask.sum(axis=1, keepdims=True)
    return (counts if floor is None else numpy.maximum(counts, floor)).astype(dtype)


@outside_graph("absolute_positions")
def absolute_positions(length):
    """Position ids 0, 1, ..., length - 1: (1, L)."""
    return numpy.arange(length, dtype=numpy.int64)[None, :]


class BertEmbeddings(nn.Module):
    """word + position + token_type embeddings, then LayerNorm and dropout."""

    def __init__(self, config, size=None):
        """size: the embeddings' width (default hidden_size; ELECTRA's embedding_size)."""
        super().__init__()
        size = size or config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, size)
        self.LayerNorm = nn.LayerNorm(size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.config = config

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        """input_ids, token_type_ids, position_ids: (B, L) ints -> (B, L, H)."""
        config = self.config
        batch, length = input_ids.shape
        if length > config.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings} (config.json): truncate the input "
                             f"(tokenizer(..., truncation=True, max_length="
                             f"{config.max_position_embeddings}))")
        _check_range("input_ids", input_ids, config.vocab_size, "vocab_size")
        if token_type_ids is None:
            token_type_ids = numpy.zeros((batch, length), numpy.int64)
        _check_range("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size")
        if position_ids is None:
            position_ids = absolute_positions(length)
        embeddings = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
                      + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention over the whole sequence."""

    def __init__(self, config):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        """hidden_states (B, L, H), attention_mask (B, 1, 1, L) additive -> context (B, L, H),
        and the probabilities (B, nh, L, L) when output_attentions (else None)."""
        query = split_heads(self.query(hidden_states), self.num_attention_heads)  # (B, nh, L, dh)
        key = split_heads(self.key(hidden_states), self.num_attention_heads)
        value = split_heads(self.value(hidden_states), self.num_attention_heads)
        context, probs = self.attention(query, key, value, attention_mask, output_attentions)
        return merge_heads(context), probs

    def attention(self, query, key, value, attention_mask, output_attentions):
        """dropout(softmax(query key^T / sqrt(dh) + attention_mask)) value: (B, nh, L, dh) ->
        (B, nh, L, dh), and the probabilities (B, nh, L, L) or None."""
        out = F.scaled_dot_product_attention(query, key, value, attention_mask, self.dropout.p if self.training else 0.0,
                                             need_weights=output_attentions)
        return out if output_attentions else (out, None)


def split_heads(x, num_heads):
    """(B, L, H) -> (B, nh, L, H / nh), a view."""
    batch, length, width = x.shape
    return x.reshape(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x):
    """(B, nh, L, dh) -> (B, L, nh * dh)."""
    batch, heads, length, size = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * size)


class _ResidualLayerNorm(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual): (B, L, in_features) -> (B, L, H)."""

    def __init__(self, config, in_features):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertSelfOutput(_ResidualLayerNorm):
    """Project the attention context and add it to the layer's input, then LayerNorm."""

    def __init__(self, config):
        super().__init__(config, config.hidden_size)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        context, probs = self.self(hidden_states, attention_mask, output_attentions)
        return self.output(context, hidden_states), probs


class BertIntermediate(nn.Module):
    """(B, L, H) -> (B, L, intermediate_size) through hidden_act."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.hidden_act = config.hidden_act
        self.intermediate_act_fn = ACTIVATIONS[config.hidden_act]

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(_ResidualLayerNorm):
    """(B, L, intermediate_size) back to H, add the residual, LayerNorm."""

    def __init__(self, config):
        super().__init__(config, config.intermediate_size)


class BertLayer(nn.Module):
    """Attention, then the feed-forward, each with its residual sum and LayerNorm."""

    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        attention_output, probs = self.attention(hidden_states, attention_mask, output_attentions)
        layer_output = self.output(self.intermediate(attention_output), attention_output)
        return layer_output, probs


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states, attention_mask=None, output_hidden_states=False,
                output_attentions=False):
        """(B, L, H) -> (last hidden state, every layer's input and the output or None,
        every layer's probabilities or None)."""
        all_hidden = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer in self.layer:
            hidden_states, probs = layer(hidden_states, attention_mask, output_attentions)
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if output_attentions:
                all_attentions.append(probs)
        return (hidden_states,
                tuple(all_hidden) if all_hidden is not None else None,
                tuple(all_attentions) if all_attentions is not None else None)


class BertPooler(nn.Module):
    """tanh(dense(hidden state of the first token, [CLS])): (B, L, H) -> (B, H)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.dense(hidden_states[:, 0]).tanh()


class BertPreTrainedModel(nn.Module):
    """Weight initialisation and loading/saving shared by BertModel and its task heads."""

    config_class = BertConfig
    base_model_prefix = "bert."        # a task model's base: stripped or added when loading
    allowed_missing_keys = ()          # parameters a base checkpoint lacks (new heads)
    ignored_unexpected_keys = ("cls.",)  # heads of other tasks (masked LM, NSP)

    def init_weights(self):
        """As transformers: normal(0, initializer_range) weights, zero biases, LayerNorm
        ones/zeros, zero padding row; drawn from minisft's seeded generator."""
        std = self.config.initializer_range
        rng = random.generator("cpu")
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.data = rng.normal(0.0, std, module.weight.shape).astype(numpy.float32)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight.data[module.padding_idx] = 0
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data = numpy.zeros(module.bias.shape, numpy.float32)

    @classmethod
    def from_pretrained(cls, directory, strict=True, **config_overrides):
        """Build from `directory` (config.json + model.safetensors), as transformers saves it."""
        directory = pathlib.Path(directory)
        if not directory.is_dir():
            raise MissingFile(f"{directory} is not a directory; expected a checkpoint "
                                    "directory with config.json and model.safetensors "
                                    "(`minisft fetch all-MiniLM-L6-v2` makes one)")
        config = cls.config_class.from_pretrained(directory, **config_overrides)
        model = cls(config)
        weights, state = load_checkpoint(directory)
        missing, unexpected = load_into(model, state, source=weights, strict=strict,
                                        allowed_missing=cls.allowed_missing_keys,
                                        ignored_unexpected=cls.ignored_unexpected_keys, prefix=cls.base_model_prefix)
        model.loading_info = {"source": str(weights), "missing_keys": missing, "unexpected_keys": unexpected}
        return model

    def loading_report(self):
        """What from_pretrained did not copy, in one line (empty when it copied every key)."""
        info = getattr(self, "loading_info", None)
        if not info or not (info["missing_keys"] or info["unexpected_keys"]):
            return ""
        parts = [f"newly initialised (not in the checkpoint): {', '.join(info['missing_keys'])}"] if info["missing_keys"] else []
        if info["unexpected_keys"]:
            parts.append(f"not used (other heads): {', '.join(info['unexpected_keys'])}")
        return f"loaded {info['source']}; " + "; ".join(parts)

    def base_model(self):
        """The bare encoder model: itself for a base model, its base for a task model."""
        return getattr(self, self.base_model_prefix.rstrip("."), self)

    def encoder_layers(self):
        """The encoder's layers, lowest first."""
        base = self.base_model()
        return list(self.encoder.layer) if base is self else base.encoder_layers()

    def load_saved(self, directory):
        """Restore the parameters save_pretrained wrote into `directory` (a checkpoint)."""
        self.load_state_dict(load_safetensors(pathlib.Path(directory) / "model.safetensors"))

    def save_pretrained(self, directory):
        """Write config.json and model.safetensors, loadable here and by transformers."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(directory)
        state = {name: param.numpy() for name, param in self.named_parameters()}
        save_safetensors(state, directory / "model.safetensors")


class BertModel(BertPreTrainedModel):
    """The bare encoder: embeddings, num_hidden_layers BertLayers, optional pooler."""

    ignored_unexpected_keys = BertPreTrainedModel.ignored_unexpected_keys + ("classifier.",)

    embeddings_class = BertEmbeddings  # RoBERTa's differ only here

    def __init__(self, config, add_pooling_layer=True):
        super().__init__()
        self.config = config
        self.embeddings = self.embeddings_class(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False, output_attentions=False):
        """input_ids, attention_mask (1 = attend, 0 = padding), token_type_ids: (B, L) ints."""
        input_ids = _as_ids("input_ids", input_ids)
        token_type_ids = _as_ids("token_type_ids", token_type_ids, input_ids.shape)
        attention_mask = _as_ids("attention_mask", attention_mask, input_ids.shape)
        embedding_output = self.embed(input_ids, token_type_ids, position_ids)
        extended_attention_mask = attention_bias(attention_mask, embedding_output)
        sequence, all_hidden, attentions = self.encoder(embedding_output, extended_attention_mask,
                                                        output_hidden_states, output_attentions)
        pooled = self.pooler(sequence) if self.pooler is not None else None
        return BaseModelOutputWithPooling(sequence, pooled, all_hidden, attentions)

    def embed(self, input_ids, token_type_ids, position_ids):
        """The encoder's input (B, L, H) from the ids."""
        return self.embeddings(input_ids, token_type_ids, position_ids)


# --- task heads (their outputs and losses: minisft.models.heads) ----------------------------
class BertForSequenceClassification(BertPreTrainedModel):
    """classifier(dropout(pooled [CLS] output)); loss: sequence_classification_loss."""

    allowed_missing_keys = ("classifier.",)

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.bert = BertModel(config)
        self.dropout = classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                            output_attentions=output_attentions)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None if labels is None else sequence_classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class BertForTokenClassification(BertPreTrainedModel):
    """classifier(dropout(every token's hidden state)) (NER); labels -100 are ignored."""

    allowed_missing_keys = ("classifier.",)
    ignored_unexpected_keys = ("cls.", "pooler.", "bert.pooler.")

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                            output_attentions=output_attentions)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None if labels is None else token_classification_loss(logits, labels)
        return TokenClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class BertForQuestionAnswering(BertPreTrainedModel):
    """qa_outputs, a Linear to 2 on every token's hidden state: where the answer starts and
    where it ends; labels (B, 2), the loss question_answering_loss."""

    allowed_missing_keys = ("qa_outputs.",)
    ignored_unexpected_keys = ("cls.", "pooler.", "bert.pooler.", "classifier.")

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                            output_attentions=output_attentions)
        logits = self.qa_outputs(outputs.last_hidden_state)
        loss = None if labels is None else question_answering_loss(logits, labels)
        return QuestionAnsweringModelOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class BertForMultipleChoice(BertPreTrainedModel):
    """Input ids (B, C, L): each question beside each of its C choices. The B * C rows run
    through BERT; classifier(dropout(pooled output)) scores each; the loss is the
    cross-entropy over each question's C scores (labels (B,): the right choice)."""

    allowed_missing_keys = ("classifier.",)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.dropout = classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        (ids, mask, types), choices = choices_as_rows(input_ids, attention_mask, token_type_ids)
        outputs = self.bert(ids, mask, types, output_hidden_states=output_hidden_states,
                            output_attentions=output_attentions)
        logits = self.classifier(self.dropout(outputs.pooler_output)).reshape(*choices)
        loss = None if labels is None else F.cross_entropy(logits, array_of(labels))
        return MultipleChoiceModelOutput(loss, logits, outputs.hidden_states, outputs.attentions)
