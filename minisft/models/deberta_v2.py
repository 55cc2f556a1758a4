"""DeBERTa-v2 (and DeBERTa-v3, which is this architecture), as transformers'
modeling_deberta_v2.py lays it out: same class and attribute names, so the checkpoint's keys
load name for name.

Attention is disentangled (He et al., "DeBERTa", ICLR 2021): besides content-to-content
q k^T, content-to-position (c2p: q against the relative-position embeddings' keys, read at
each pair's relative distance) and position-to-content (p2c: k against their queries), each
term divided by sqrt(dh * number of terms). Distances are log-bucketed beyond
position_buckets / 2; absolute positions are added to the input only where
position_biased_input. Padded rows are masked as queries too (a pair mask): their
probabilities come out uniform, as transformers'.

Shapes: B batch, L sequence length, H hidden_size, nh heads of dh = H / nh, R = 2 * the
relative span (position_buckets, else max_relative_positions).
"""
import math

import numpy

from minisft.engine.errors import ModelFileError
from minisft import nn
from minisft.engine import functional as F
from minisft.engine.tensor import array_of
from minisft.engine.trace import length_table, outside_graph
from minisft.models.bert import (ACTIVATIONS, absolute_positions, token_weights, BaseModelOutputWithPooling, BertIntermediate, BertOutput,
                                 BertPreTrainedModel, BertSelfOutput, _as_ids, _check_range, merge_heads, split_heads)
from minisft.models.config import BertConfig
from minisft.models.heads import (MultipleChoiceModelOutput, QuestionAnsweringModelOutput, SequenceClassifierOutput,
                                  TokenClassifierOutput, choices_as_rows, question_answering_loss,
                                  sequence_classification_loss, token_classification_loss)


POOLER_ACTIVATIONS = {**ACTIVATIONS, "tanh": F.tanh}


class DebertaV2Config(BertConfig):
    """transformers' DebertaV2Config fields and defaults (microsoft/deberta-v2-xlarge's)."""

    model_type = "deberta-v2"
    defaults = {**BertConfig.defaults, "vocab_size": 128100, "hidden_size": 1536, "num_hidden_layers": 24,
                "num_attention_heads": 24, "intermediate_size": 6144, "type_vocab_size": 0, "layer_norm_eps": 1e-7,
                "relative_attention": False, "max_relative_positions": -1, "position_buckets": -1,
                "position_biased_input": True, "pos_att_type": None, "share_att_key": False, "norm_rel_ebd": "none",
                "pooler_dropout": 0.0, "pooler_hidden_act": "gelu", "cls_dropout": None, "conv_kernel_size": 0}

    def __init__(self, source="config", **fields):
        if isinstance(fields.get("pos_att_type"), str):  # old configs: "p2c|c2p"
            fields["pos_att_type"] = [x.strip() for x in fields["pos_att_type"].lower().split("|")]
        super().__init__(source, **fields)
        self.pos_att_type = list(self.pos_att_type or [])
        self.embedding_size = getattr(self, "embedding_size", None) or self.hidden_size
        self.pooler_hidden_size = getattr(self, "pooler_hidden_size", None) or self.hidden_size

    positive_fields = tuple(f for f in BertConfig.positive_fields if f != "type_vocab_size")  # 0: no token types

    def validate(self):
        super().validate()
        unknown = set(self.pos_att_type or []) - {"c2p", "p2c"}
        if unknown:
            raise ModelFileError(f"{self._source}: field 'pos_att_type' holds {sorted(unknown)}; DeBERTa's are c2p, p2c")
        if self.conv_kernel_size:
            raise ModelFileError(f"{self._source}: field 'conv_kernel_size' is {self.conv_kernel_size}; minisft's "
                             "DeBERTa-v2 has no convolution layer (DeBERTa-v3 and most v2 checkpoints have none)")
        if self.pooler_hidden_act not in POOLER_ACTIVATIONS:
            raise ModelFileError(f"{self._source}: field 'pooler_hidden_act' is {self.pooler_hidden_act!r}; supported: "
                             f"{', '.join(POOLER_ACTIVATIONS)}")

    @property
    def relative_span(self):
        """Half of R: position_buckets, else max_relative_positions (else max_position_embeddings)."""
        if self.position_buckets > 0:
            return self.position_buckets
        return self.max_relative_positions if self.max_relative_positions > 0 else self.max_position_embeddings


def log_bucket_position(relative, buckets, max_position):
    """Distances within buckets / 2 kept, farther ones on a log scale up to max_position, in
    float32 as transformers computes them: (L, L) ints -> (L, L) ints."""
    mid = buckets // 2
    sign = numpy.sign(relative)
    distance = numpy.where((relative < mid) & (relative > -mid), mid - 1, numpy.abs(relative))
    scale = numpy.log(numpy.float32((max_position - 1) / mid))
    log_position = numpy.ceil(numpy.log(distance.astype(numpy.float32) / numpy.float32(mid)) / scale
                              * numpy.float32(mid - 1)) + mid
    return numpy.where(distance <= mid, relative, log_position * sign).astype(numpy.int64)


@length_table
def relative_positions(length, buckets, max_position):
    """(L, L) relative position ids i - j, log-bucketed when buckets and max_position are set."""
    ids = numpy.arange(length, dtype=numpy.int64)
    relative = ids[:, None] - ids[None, :]
    return log_bucket_position(relative, buckets, max_position) if buckets > 0 and max_position > 0 else relative


class DebertaV2Embeddings(nn.Module):
    """word (+ position where position_biased_input) (+ token type where type_vocab_size) embeddings,
    projected to H where embedding_size differs, LayerNorm, zeroed at padding, dropout."""

    def __init__(self, config):
        super().__init__()
        size = config.embedding_size
        self.word_embeddings = nn.Embedding(config.vocab_size, size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, size) \
            if config.position_biased_input else None
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, size) if config.type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(size, config.hidden_size, bias=False) if size != config.hidden_size else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.config = config

    def forward(self, input_ids, token_type_ids, mask):
        """input_ids, token_type_ids (B, L) ints, mask (B, L) 0/1 -> (B, L, H)."""
        config = self.config
        _check_range("input_ids", input_ids, config.vocab_size, "vocab_size")
        embeddings = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if input_ids.shape[1] > config.max_position_embeddings:
                raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                                 f"{config.max_position_embeddings} (config.json): truncate the input")
            embeddings = embeddings + self.position_embeddings(absolute_positions(input_ids.shape[1]))
        if self.token_type_embeddings is not None:
            _check_range("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size")
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        if self.embed_proj is not None:
            embeddings = self.embed_proj(embeddings)
        embeddings = self.LayerNorm(embeddings) * embeddings.device.put(token_weights(mask, embeddings.dtype))
        return self.dropout(embeddings)


class DisentangledSelfAttention(nn.Module):
    """softmax((q k^T + c2p + p2c) / sqrt(dh * terms) at the pair mask) v, the position terms
    read (gathered) from the relative-position embeddings' scores at each pair's distance."""

    def __init__(self, config):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.query_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.key_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.value_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.share_att_key, self.pos_att_type = config.share_att_key, config.pos_att_type
        self.relative_attention = config.relative_attention
        if self.relative_attention:
            self.span = config.relative_span
            self.pos_dropout = nn.Dropout(config.hidden_dropout_prob)
            if not self.share_att_key:
                if "c2p" in self.pos_att_type:
                    self.pos_key_proj = nn.Linear(config.hidden_size, config.hidden_size)
                if "p2c" in self.pos_att_type:
                    self.pos_query_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, hidden_states, attention_bias, relative_pos, rel_embeddings, output_attentions=False):
        """hidden_states (B, L, H), attention_bias: the masks of pair_masks (the additive bias
        (B, 1, L, L), the dtype's minimum at masked pairs; queries (B, 1, L, 1) and pairs
        (B, 1, L, L), 1 where attended), relative_pos (L, L) ints, rel_embeddings (R, H) ->
        (B, L, H), and the probabilities (B, nh, L, L) or None.

        As transformers' masked_fill, a masked pair's score passes no gradient: a padding
        query, whose whole row is masked, is zeroed, and so are the position terms of masked
        pairs (the forward is the same, the minimum absorbing what it is added to)."""
        attention_bias, queries, pairs = attention_bias
        heads = self.num_attention_heads
        query = split_heads(self.query_proj(hidden_states), heads) * queries  # (B, nh, L, dh)
        key = split_heads(self.key_proj(hidden_states), heads)
        value = split_heads(self.value_proj(hidden_states), heads)
        scale = math.sqrt(query.shape[-1] * (1 + len(self.pos_att_type)))
        bias = attention_bias
        if self.relative_attention:  # the position terms join the mask as one additive bias
            bias = self.position_scores(query, key, relative_pos, self.pos_dropout(rel_embeddings), scale) * pairs + bias
        out = F.scaled_dot_product_attention(query, key, value, bias, self.dropout.p if self.training else 0.0,
                                             scale=1 / scale, need_weights=output_attentions)
        context, probs = out if output_attentions else (out, None)
        return merge_heads(context), probs

    def position_scores(self, query, key, relative_pos, rel_embeddings, scale):
        """(c2p + p2c) / sqrt(dh * terms): (B, nh, L, L)."""
        heads, span = self.num_attention_heads, self.span
        rel = rel_embeddings[:2 * span][None]                          # (1, R, H)
        score = 0
        if "c2p" in self.pos_att_type:
            pos_key = split_heads((self.key_proj if self.share_att_key else self.pos_key_proj)(rel), heads)
            c2p = query @ pos_key.transpose(-1, -2)                     # (B, nh, L, R)
            score = score + F.gather(c2p, -1, relative_index(relative_pos, span, c2p.shape[:2], 1)) / scale
        if "p2c" in self.pos_att_type:
            pos_query = split_heads((self.query_proj if self.share_att_key else self.pos_query_proj)(rel), heads)
            p2c = key @ pos_query.transpose(-1, -2)                     # (B, nh, L keys, R)
            score = score + F.gather(p2c, -1, relative_index(relative_pos, span, p2c.shape[:2], -1)).transpose(-1, -2) / scale
        return score


@outside_graph("relative_index")
def relative_index(relative_pos, span, leading, sign):
    """Where each (query, key) pair's relative position sign x (i - j) falls among the 2 span
    relative embeddings: clip(sign relative_pos + span, 0, 2 span - 1), (L, L) broadcast to leading + (L, L)."""
    at = numpy.clip(sign * relative_pos + span, 0, 2 * span - 1)
    return numpy.broadcast_to(at, tuple(leading) + at.shape)


class DebertaV2Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = DisentangledSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_bias, relative_pos, rel_embeddings, output_attentions=False):
        context, probs = self.self(hidden_states, attention_bias, relative_pos, rel_embeddings, output_attentions)
        return self.output(context, hidden_states), probs


class DebertaV2Layer(nn.Module):
    """Disentangled attention, then BERT's feed-forward, each with its residual LayerNorm."""

    def __init__(self, config):
        super().__init__()
        self.attention = DebertaV2Attention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_bias, relative_pos, rel_embeddings, output_attentions=False):
        attention_output, probs = self.attention(hidden_states, attention_bias, relative_pos, rel_embeddings,
                                                 output_attentions)
        return self.output(self.intermediate(attention_output), attention_output), probs


class DebertaV2Encoder(nn.Module):
    """The layers, sharing one table of relative-position embeddings (LayerNorm'd where
    norm_rel_ebd says layer_norm) and one (L, L) table of relative positions."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(DebertaV2Layer(config) for _ in range(config.num_hidden_layers))
        if config.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * config.relative_span, config.hidden_size)
        self.norm_rel_ebd = [x.strip() for x in config.norm_rel_ebd.lower().split("|")]
        if "layer_norm" in self.norm_rel_ebd:
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, attention_bias, output_hidden_states=False, output_attentions=False):
        config = self.config
        relative_pos = rel_embeddings = None
        if config.relative_attention:
            max_position = config.max_relative_positions if config.max_relative_positions > 0 \
                else config.max_position_embeddings
            relative_pos = relative_positions(hidden_states.shape[1], config.position_buckets, max_position)
            rel_embeddings = self.rel_embeddings.weight
            if "layer_norm" in self.norm_rel_ebd:
                rel_embeddings = self.LayerNorm(rel_embeddings)
        all_hidden = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer in self.layer:
            hidden_states, probs = layer(hidden_states, attention_bias, relative_pos, rel_embeddings, output_attentions)
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if output_attentions:
                all_attentions.append(probs)
        return (hidden_states, None if all_hidden is None else tuple(all_hidden),
                None if all_attentions is None else tuple(all_attentions))


class DebertaV2PreTrainedModel(BertPreTrainedModel):
    """BERT's loading, saving and initialisation with DeBERTa-v2's config and key prefix."""
    config_class = DebertaV2Config
    base_model_prefix = "deberta."
    ignored_unexpected_keys = ("lm_predictions.", "mask_predictions.", "cls.")


class DebertaV2Model(DebertaV2PreTrainedModel):
    """Embeddings and the encoder (no pooler: the heads pool)."""

    ignored_unexpected_keys = DebertaV2PreTrainedModel.ignored_unexpected_keys + ("pooler.", "classifier.")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = DebertaV2Embeddings(config)
        self.encoder = DebertaV2Encoder(config)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False,
                output_attentions=False):
        input_ids = _as_ids("input_ids", input_ids)
        token_type_ids = _as_ids("token_type_ids", token_type_ids, input_ids.shape)
        mask = _as_ids("attention_mask", attention_mask, input_ids.shape)
        mask = numpy.ones(input_ids.shape, numpy.int64) if mask is None else mask
        if token_type_ids is None:
            token_type_ids = numpy.zeros(input_ids.shape, numpy.int64)
        embedding_output = self.embeddings(input_ids, token_type_ids, mask)
        sequence, all_hidden, attentions = self.encoder(embedding_output, pair_masks(mask, embedding_output),
                                                        output_hidden_states, output_attentions)
        return BaseModelOutputWithPooling(sequence, None, all_hidden, attentions)


@outside_graph("pair_masks")
def pair_masks(mask, hidden):
    """The (B, L) mask's (additive bias (B, 1, L, L): the dtype's minimum where the query or the
    key is padding; queries (B, 1, L, 1) and pairs (B, 1, L, L): 1 where attended), in hidden's
    dtype and on its device: see DisentangledSelfAttention.forward."""
    queries = hidden.device.put(mask)[:, None, :, None].astype(hidden.dtype)
    pairs = queries * queries.reshape(queries.shape[0], 1, 1, -1)
    return (1 - pairs) * numpy.finfo(hidden.dtype).min, queries, pairs


class ContextPooler(nn.Module):
    """pooler_hidden_act(dense(dropout(the first token's hidden state))): (B, L, H) -> (B, H)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.pooler_hidden_size, config.pooler_hidden_size)
        self.dropout = nn.Dropout(config.pooler_dropout)
        self.activation = POOLER_ACTIVATIONS[config.pooler_hidden_act]

    def forward(self, hidden_states):
        return self.activation(self.dense(self.dropout(hidden_states[:, 0])))


def _cls_dropout(config):
    return nn.Dropout(config.hidden_dropout_prob if config.cls_dropout is None else config.cls_dropout)


class DebertaV2ForSequenceClassification(DebertaV2PreTrainedModel):
    """classifier(dropout(ContextPooler(hidden states))): (B, num_labels)."""

    allowed_missing_keys = ("classifier.", "pooler.")

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.deberta = DebertaV2Model(config)
        self.pooler = ContextPooler(config)
        self.classifier = nn.Linear(config.pooler_hidden_size, config.num_labels)
        self.dropout = _cls_dropout(config)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.deberta(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions)
        logits = self.classifier(self.dropout(self.pooler(outputs.last_hidden_state)))
        loss = None if labels is None else sequence_classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class DebertaV2ForTokenClassification(DebertaV2PreTrainedModel):
    """classifier(dropout(every token's hidden state)): (B, L, num_labels)."""

    allowed_missing_keys = ("classifier.",)
    ignored_unexpected_keys = DebertaV2PreTrainedModel.ignored_unexpected_keys + ("pooler.",)

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.deberta = DebertaV2Model(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.deberta(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None if labels is None else token_classification_loss(logits, labels)
        return TokenClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class DebertaV2ForQuestionAnswering(DebertaV2PreTrainedModel):
    """qa_outputs on every token: start and end logits (B, L, 2)."""

    allowed_missing_keys = ("qa_outputs.",)
    ignored_unexpected_keys = DebertaV2PreTrainedModel.ignored_unexpected_keys + ("pooler.", "classifier.")

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.deberta = DebertaV2Model(config)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.deberta(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions)
        logits = self.qa_outputs(outputs.last_hidden_state)
        loss = None if labels is None else question_answering_loss(logits, labels)
        return QuestionAnsweringModelOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class DebertaV2ForMultipleChoice(DebertaV2PreTrainedModel):
    """classifier(dropout(ContextPooler(each choice's row))): (B, C)."""

    allowed_missing_keys = ("classifier.", "pooler.")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.deberta = DebertaV2Model(config)
        self.pooler = ContextPooler(config)
        self.classifier = nn.Linear(config.pooler_hidden_size, 1)
        self.dropout = _cls_dropout(config)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        (ids, mask, types), choices = choices_as_rows(input_ids, attention_mask, token_type_ids)
        outputs = self.deberta(ids, mask, types, output_hidden_states, output_attentions)
        logits = self.classifier(self.dropout(self.pooler(outputs.last_hidden_state))).reshape(*choices)
        loss = None if labels is None else F.cross_entropy(logits, array_of(labels))
        return MultipleChoiceModelOutput(loss, logits, outputs.hidden_states, outputs.attentions)
