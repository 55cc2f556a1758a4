"""ModernBERT (Warner et al., "Smarter, Better, Faster, Longer", 2024), as transformers'
modeling_modernbert.py lays it out: same class and attribute names, so the checkpoint's keys
load name for name.

Pre-norm layers without biases: x + Wo(attention(norm(x))), then x + Wo(act(a) * g) with
(a, g) = Wi(norm(x)) (GeGLU). No position embeddings: queries and keys are rotated (RoPE, Su
et al. 2021) by position, at a global theta on the full-attention layers (every
global_attn_every_n_layers-th, from the first) and a local theta on the others, which attend
within local_attention / 2 tokens each way. A final norm; the heads pool the first token or
the mean over the mask, then dense, act, norm.

Shapes: B batch, L sequence length, H hidden_size, nh heads of dh = H / nh, I intermediate_size.
"""
import numpy

from minisft.engine.errors import ModelFileError
from minisft import nn
from minisft.engine import functional as F
from minisft.engine import random
from minisft.engine.ops import cat
from minisft.engine.tensor import Tensor, array_of
from minisft.engine.trace import length_table, outside_graph
from minisft.models.bert import (ACTIVATIONS, token_counts, token_weights, BaseModelOutputWithPooling, BertPreTrainedModel, _as_ids, _check_range,
                                 merge_heads, split_heads)
from minisft.models.config import BertConfig
from minisft.models.heads import (MultipleChoiceModelOutput, QuestionAnsweringModelOutput, SequenceClassifierOutput,
                                  TokenClassifierOutput, choices_as_rows, question_answering_loss,
                                  sequence_classification_loss, token_classification_loss)

LAYER_TYPES = ("full_attention", "sliding_attention")


class ModernBertConfig(BertConfig):
    """transformers' ModernBertConfig fields and defaults (ModernBERT-base's)."""

    model_type = "modernbert"
    attribute_map = {"hidden_act": "hidden_activation", "layer_norm_eps": "norm_eps"}
    defaults = {"vocab_size": 50368, "hidden_size": 768, "intermediate_size": 1152, "num_hidden_layers": 22,
                "num_attention_heads": 12, "hidden_activation": "gelu", "max_position_embeddings": 8192,
                "initializer_range": 0.02, "initializer_cutoff_factor": 2.0, "norm_eps": 1e-5, "norm_bias": False,
                "pad_token_id": 50283, "eos_token_id": 50282, "bos_token_id": 50281, "cls_token_id": 50281,
                "sep_token_id": 50282, "attention_bias": False, "attention_dropout": 0.0, "layer_types": None,
                "rope_parameters": None, "global_attn_every_n_layers": 3, "local_attention": 128,
                "embedding_dropout": 0.0, "mlp_bias": False, "mlp_dropout": 0.0, "classifier_pooling": "cls",
                "classifier_dropout": 0.0, "classifier_bias": False, "classifier_activation": "gelu",
                "problem_type": None}
    positive_fields = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                       "max_position_embeddings", "local_attention")
    default_theta = {"full_attention": 160_000.0, "sliding_attention": 10_000.0}

    def __init__(self, source="config", **fields):
        thetas = {"full_attention": fields.pop("global_rope_theta", None),
                  "sliding_attention": fields.pop("local_rope_theta", None)}
        super().__init__(source, **fields)
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if i % self.global_attn_every_n_layers else "full_attention"
                                for i in range(self.num_hidden_layers)]
        rope = {kind: dict((self.rope_parameters or {}).get(kind) or {"rope_type": "default"}) for kind in LAYER_TYPES}
        for kind in LAYER_TYPES:
            rope[kind].setdefault("rope_theta", thetas[kind] or self.default_theta[kind])
        self.rope_parameters = rope
        self.validate_layers()

    def validate(self):
        if self.hidden_size % self.num_attention_heads:
            raise ModelFileError(f"{self._source}: field 'hidden_size' ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        for field in ("hidden_activation", "classifier_activation"):
            if getattr(self, field) not in ACTIVATIONS:
                raise ModelFileError(f"{self._source}: field {field!r} is {getattr(self, field)!r}; supported: "
                                 f"{', '.join(ACTIVATIONS)}")
        if self.classifier_pooling not in ("cls", "mean"):
            raise ModelFileError(f"{self._source}: field 'classifier_pooling' is {self.classifier_pooling!r}; use cls "
                             "or mean")
        for field in self.positive_fields:
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise ModelFileError(f"{self._source}: field {field!r} must be a positive integer, not "
                                 f"{getattr(self, field)!r}")

    def validate_layers(self):
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ModelFileError(f"{self._source}: field 'layer_types' must list {self.num_hidden_layers} of "
                             f"{', '.join(LAYER_TYPES)}")
        for kind, rope in self.rope_parameters.items():
            if rope.get("rope_type", "default") != "default":
                raise ModelFileError(f"{self._source}: field 'rope_parameters' has rope_type {rope['rope_type']!r} for "
                                 f"{kind}; minisft's ModernBERT has the default rotary embeddings")

    @property
    def sliding_window(self):
        """How far a local layer's token sees each way: local_attention // 2."""
        return self.local_attention // 2


@length_table
def rotary_tables(length, head_size, theta):
    """(cos, sin) of RoPE, (L, dh) float32 each: position p, frequency theta^(-2i / dh), the
    frequencies repeated for the two halves, as transformers computes them."""
    inv_freq = numpy.float32(1.0) / (numpy.float32(theta) ** (numpy.arange(0, head_size, 2, dtype=numpy.float32)
                                                               / numpy.float32(head_size)))
    freqs = numpy.arange(length, dtype=numpy.float32)[:, None] * inv_freq[None, :]
    emb = numpy.concatenate([freqs, freqs], axis=-1)
    return numpy.cos(emb), numpy.sin(emb)


def rotate(x, cos, sin):
    """x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1) for x's halves (x1, x2)."""
    half = x.shape[-1] // 2
    return x * cos + cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class ModernBertEmbeddings(nn.Module):
    """drop(norm(token embeddings)): (B, L) ids -> (B, L, H)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.drop = nn.Dropout(config.embedding_dropout)

    def forward(self, input_ids):
        _check_range("input_ids", input_ids, self.config.vocab_size, "vocab_size")
        return self.drop(self.norm(self.tok_embeddings(input_ids)))


class ModernBertAttention(nn.Module):
    """Wo(softmax(rot(q) rot(k)^T / sqrt(dh) + mask) v), q, k, v from one Wqkv."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.attention_dropout = config.attention_dropout
        self.out_drop = nn.Dropout(config.attention_dropout)

    def forward(self, hidden_states, rotary, attention_bias, output_attentions=False):
        """hidden_states (B, L, H), rotary (cos, sin) (L, dh), attention_bias (B, 1, L, L) or
        None -> (B, L, H), and the probabilities (B, nh, L, L) or None."""
        batch, length, width = hidden_states.shape
        qkv = self.Wqkv(hidden_states).reshape(batch, length, 3, width)
        query, key, value = (split_heads(qkv[:, :, i], self.num_attention_heads) for i in range(3))
        cos, sin = rotary
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        out = F.scaled_dot_product_attention(query, key, value, attention_bias,
                                             self.attention_dropout if self.training else 0.0,
                                             need_weights=output_attentions)
        context, probs = out if output_attentions else (out, None)
        return self.out_drop(self.Wo(merge_heads(context))), probs


class ModernBertMLP(nn.Module):
    """GeGLU: Wo(drop(act(a) * g)), (a, g) = the halves of Wi(x): (B, L, H) -> (B, L, H)."""

    def __init__(self, config):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_activation]
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, hidden_states):
        projected = self.Wi(hidden_states)
        half = projected.shape[-1] // 2
        return self.Wo(self.drop(self.act(projected[..., :half]) * projected[..., half:]))


class ModernBertEncoderLayer(nn.Module):
    """x + attention(attn_norm(x)), then + mlp(mlp_norm(.)); the first layer's attn_norm is
    the identity (the embeddings end with a norm)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn_norm = nn.Identity() if layer_idx == 0 else \
            nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.attn = ModernBertAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.mlp = ModernBertMLP(config)
        self.attention_type = config.layer_types[layer_idx]

    def forward(self, hidden_states, rotary, attention_bias, output_attentions=False):
        attention_output, probs = self.attn(self.attn_norm(hidden_states), rotary, attention_bias, output_attentions)
        hidden_states = hidden_states + attention_output
        return hidden_states + self.mlp(self.mlp_norm(hidden_states)), probs


@outside_graph("local_attention_biases")
def attention_biases(mask, length, window, dtype):
    """{layer type: (B, 1, L, L) additive bias or None}: padding keys masked everywhere, and on
    the local layers the keys farther than `window` from the query too."""
    positions = numpy.arange(length)
    local = numpy.abs(positions[:, None] - positions[None, :]) <= window
    keys = numpy.ones((1, length), bool) if mask is None else mask.astype(bool)
    allowed = {"full_attention": keys[:, None, None, :],
               "sliding_attention": keys[:, None, None, :] & local[None, None]}
    lowest = numpy.finfo(dtype).min
    return {kind: None if a.all() else numpy.where(a, 0, lowest).astype(dtype) for kind, a in allowed.items()}


class ModernBertPreTrainedModel(BertPreTrainedModel):
    """BERT's loading and saving with ModernBERT's config, key prefix and initialisation
    (truncated normals: std initializer_range in, / sqrt(2 layers) out, H^-0.5 for the classifier)."""
    config_class = ModernBertConfig
    base_model_prefix = "model."
    ignored_unexpected_keys = ("decoder.", "head.", "classifier.")

    def init_weights(self):
        config = self.config
        rng = random.generator("cpu")
        cutoff = config.initializer_cutoff_factor or 3
        std_in, std_out = config.initializer_range, config.initializer_range / numpy.sqrt(2.0 * config.num_hidden_layers)

        def init(module, std):
            shape = module.weight.shape
            values = rng.normal(0.0, std, shape)
            while (outside := numpy.abs(values) > cutoff * std).any():  # redrawn: a truncated normal
                values[outside] = rng.normal(0.0, std, int(outside.sum()))
            module.weight.data = values.astype(numpy.float32)
            if getattr(module, "bias", None) is not None:
                module.bias.data = numpy.zeros(module.bias.shape, numpy.float32)
        for module in self.modules():
            if isinstance(module, ModernBertEmbeddings):
                init(module.tok_embeddings, std_in)
            elif isinstance(module, (ModernBertMLP, ModernBertAttention)):
                init(module.Wi if isinstance(module, ModernBertMLP) else module.Wqkv, std_in)
                init(module.Wo, std_out)
            elif isinstance(module, ModernBertPredictionHead):
                init(module.dense, std_out)
        classifier = getattr(self, "classifier", None)
        if classifier is not None:
            init(classifier, config.hidden_size ** -0.5)

    def encoder_layers(self):
        base = self.base_model()
        return list(self.layers) if base is self else base.encoder_layers()


class ModernBertModel(ModernBertPreTrainedModel):
    """Embeddings, the layers (each with its layer type's rotary tables and mask), final_norm.
    hidden_states: the embeddings, each layer's output, the last one normed."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(ModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False,
                output_attentions=False):
        """input_ids, attention_mask (B, L) ints; token_type_ids: ignored (ModernBERT has none)."""
        config = self.config
        input_ids = _as_ids("input_ids", input_ids)
        mask = _as_ids("attention_mask", attention_mask, input_ids.shape)
        length = input_ids.shape[1]
        if length > config.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings} (config.json): truncate the input")
        hidden_states = self.embeddings(input_ids)
        head_size = config.hidden_size // config.num_attention_heads
        put = hidden_states.device.put
        rotary = {kind: tuple(put(t) for t in rotary_tables(length, head_size, config.rope_parameters[kind]["rope_theta"]))
                  for kind in set(config.layer_types)}
        biases = {kind: None if b is None else put(b) for kind, b in
                  attention_biases(None if mask is None else array_of(mask), length, config.sliding_window,
                                   hidden_states.dtype).items()}
        all_hidden = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer in self.layers:
            hidden_states, probs = layer(hidden_states, rotary[layer.attention_type], biases[layer.attention_type],
                                         output_attentions)
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if output_attentions:
                all_attentions.append(probs)
        hidden_states = self.final_norm(hidden_states)
        if output_hidden_states:  # the last layer's entry is the normed output, as transformers records it
            all_hidden[-1] = hidden_states
        return BaseModelOutputWithPooling(hidden_states, None, None if all_hidden is None else tuple(all_hidden),
                                          None if all_attentions is None else tuple(all_attentions))


class ModernBertPredictionHead(nn.Module):
    """norm(act(dense(x))): (..., H) -> (..., H)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = ACTIVATIONS[config.classifier_activation]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def forward(self, hidden_states):
        return self.norm(self.act(self.dense(hidden_states)))


@outside_graph("first_tokens")
def first_tokens(attention_mask):
    """(rows, each row's first attended position): the index of each row's first real token, (N,) twice."""
    return numpy.arange(len(attention_mask)), numpy.argmax(attention_mask, axis=-1)


def pooled(config, last_hidden_state, attention_mask, first_real=False):
    """classifier_pooling: the first token ("cls"; first_real: each row's first real token, as
    multiple choice pools) or the mean over the mask ("mean"): (B, L, H) -> (B, H)."""
    if config.classifier_pooling == "cls":
        return last_hidden_state[first_tokens(array_of(attention_mask))] if first_real else last_hidden_state[:, 0]
    mask = numpy.ones(last_hidden_state.shape[:2], numpy.int64) if attention_mask is None else array_of(attention_mask)
    put, dtype = last_hidden_state.device.put, last_hidden_state.dtype
    return (last_hidden_state * Tensor(put(token_weights(mask, dtype)))).sum(dim=1) / Tensor(put(token_counts(mask, dtype)))


class _ModernBertHeaded(ModernBertPreTrainedModel):
    """model, head, drop, classifier(out_features): what every task head has."""

    allowed_missing_keys = ("head.", "classifier.")
    ignored_unexpected_keys = ("decoder.",)

    def __init__(self, config, out_features):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.drop = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, out_features)
        self.init_weights()

    def scores(self, hidden_states):
        return self.classifier(self.drop(self.head(hidden_states)))


class ModernBertForSequenceClassification(_ModernBertHeaded):
    """classifier(drop(head(pooled))): (B, num_labels)."""

    def __init__(self, config):
        super().__init__(config, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.model(input_ids, attention_mask, None, output_hidden_states, output_attentions)
        logits = self.scores(pooled(self.config, outputs.last_hidden_state, attention_mask))
        loss = None if labels is None else sequence_classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class ModernBertForTokenClassification(_ModernBertHeaded):
    """classifier(drop(head(every token))): (B, L, num_labels)."""

    def __init__(self, config):
        super().__init__(config, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.model(input_ids, attention_mask, None, output_hidden_states, output_attentions)
        logits = self.scores(outputs.last_hidden_state)
        loss = None if labels is None else token_classification_loss(logits, labels)
        return TokenClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class ModernBertForQuestionAnswering(_ModernBertHeaded):
    """classifier(drop(head(every token))): start and end logits (B, L, 2)."""

    def __init__(self, config):
        super().__init__(config, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.model(input_ids, attention_mask, None, output_hidden_states, output_attentions)
        logits = self.scores(outputs.last_hidden_state)
        loss = None if labels is None else question_answering_loss(logits, labels)
        return QuestionAnsweringModelOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class ModernBertForMultipleChoice(_ModernBertHeaded):
    """classifier(drop(head(pooled choice row))): (B, C); "cls" pools each row's first real token."""

    def __init__(self, config):
        super().__init__(config, 1)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        (ids, mask), choices = choices_as_rows(input_ids, attention_mask)
        outputs = self.model(ids, mask, None, output_hidden_states, output_attentions)
        logits = self.scores(pooled(self.config, outputs.last_hidden_state, mask, mask is not None)).reshape(*choices)
        loss = None if labels is None else F.cross_entropy(logits, array_of(labels))
        return MultipleChoiceModelOutput(loss, logits, outputs.hidden_states, outputs.attentions)
