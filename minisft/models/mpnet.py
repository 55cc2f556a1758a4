"""MPNet (Song et al., "MPNet: Masked and Permuted Pre-training", NeurIPS 2020), as
transformers' modeling_mpnet.py lays it out: same class and attribute names, so the checkpoint's
keys load name for name. It is behind all-mpnet-base-v2, sentence-transformers' default.

BERT's layers with RoBERTa's positions (counted from padding id 1 + 1 over the real tokens) and
no token types, and one more term in every layer's attention scores: a learned bias per head
and bucket of the relative distance j - i (T5's buckets: exact below 8, then logarithmic up to
128, each direction apart), one table shared by all layers.

Shapes: B batch, L sequence length, H hidden_size, nh heads.
"""
import math

import numpy

from minisft import nn
from minisft.engine import functional as F
from minisft.engine.tensor import array_of
from minisft.engine.trace import length_table
from minisft.models.bert import (BaseModelOutputWithPooling, BertIntermediate, BertOutput, BertPooler,
                                 BertPreTrainedModel, _as_ids, _check_range, attention_bias, merge_heads, split_heads)
from minisft.models.config import BertConfig
from minisft.models.roberta import positions_after_padding
from minisft.models.heads import (FirstTokenClassificationHead, MultipleChoiceModelOutput, QuestionAnsweringModelOutput,
                                  SequenceClassifierOutput, TokenClassifierOutput, choices_as_rows, classifier_dropout,
                                  question_answering_loss, sequence_classification_loss, token_classification_loss)

PADDING_IDX = 1      # transformers' MPNet fixes it, whatever config.pad_token_id says
BUCKETS, MAX_DISTANCE = 32, 128  # the buckets transformers computes (its encoder passes 32 whatever the config)


class MPNetConfig(BertConfig):
    """transformers' MPNetConfig fields and defaults (mpnet-base's)."""

    model_type = "mpnet"
    defaults = {**BertConfig.defaults, "vocab_size": 30527, "relative_attention_num_buckets": 32,
                "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "type_vocab_size": 1}


@length_table
def relative_position_buckets(length, buckets=BUCKETS, max_distance=MAX_DISTANCE):
    """(L, L) bucket of j - i for query i and key j: half the buckets for each sign, exact
    distances below a quarter of them, then log-spaced up to max_distance, in float32 as
    transformers computes them."""
    positions = numpy.arange(length, dtype=numpy.int64)
    n = positions[:, None] - positions[None, :]        # -(j - i)
    half = buckets // 2
    bucket = (n < 0).astype(numpy.int64) * half
    n = numpy.abs(n)
    exact = half // 2
    scale = numpy.float32(math.log(max_distance / exact))
    logs = numpy.log(numpy.maximum(n, 1).astype(numpy.float32) / numpy.float32(exact)) / scale * numpy.float32(half - exact)
    large = numpy.minimum(exact + logs.astype(numpy.int64), half - 1)
    return bucket + numpy.where(n < exact, n, large)


class MPNetEmbeddings(nn.Module):
    """word + position embeddings (positions 2, 3, ... over the real tokens, padding at 1),
    LayerNorm, dropout."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=PADDING_IDX)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=PADDING_IDX)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids):
        config = self.config
        _check_range("input_ids", input_ids, config.vocab_size, "vocab_size")
        position_ids = positions_after_padding(input_ids, PADDING_IDX, config.max_position_embeddings)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class MPNetSelfAttention(nn.Module):
    """o(softmax(q k^T / sqrt(dh) + position_bias + mask) v)."""

    def __init__(self, config):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.q = nn.Linear(config.hidden_size, config.hidden_size)
        self.k = nn.Linear(config.hidden_size, config.hidden_size)
        self.v = nn.Linear(config.hidden_size, config.hidden_size)
        self.o = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, hidden_states, bias, output_attentions=False):
        """hidden_states (B, L, H), bias (B or 1, nh, L, L): the position bias plus the
        padding mask -> (B, L, H), and the probabilities (B, nh, L, L) or None."""
        heads = self.num_attention_heads
        query, key, value = (split_heads(proj(hidden_states), heads) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(query, key, value, bias, self.dropout.p if self.training else 0.0,
                                             need_weights=output_attentions)
        context, probs = out if output_attentions else (out, None)
        return self.o(merge_heads(context)), probs


class MPNetAttention(nn.Module):
    """LayerNorm(dropout(attention(x)) + x)."""

    def __init__(self, config):
        super().__init__()
        self.attn = MPNetSelfAttention(config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, bias, output_attentions=False):
        context, probs = self.attn(hidden_states, bias, output_attentions)
        return self.LayerNorm(self.dropout(context) + hidden_states), probs


class MPNetLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = MPNetAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, bias, output_attentions=False):
        attention_output, probs = self.attention(hidden_states, bias, output_attentions)
        return self.output(self.intermediate(attention_output), attention_output), probs


class MPNetEncoder(nn.Module):
    """The layers, and the relative-position bias table they share: (buckets, nh)."""

    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(MPNetLayer(config) for _ in range(config.num_hidden_layers))
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_attention_heads)

    def forward(self, hidden_states, mask_bias, output_hidden_states=False, output_attentions=False):
        length = hidden_states.shape[1]
        position_bias = self.relative_attention_bias(relative_position_buckets(length)).permute(2, 0, 1)[None]
        bias = position_bias if mask_bias is None else position_bias + mask_bias  # (B or 1, nh, L, L)
        all_hidden = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer in self.layer:
            hidden_states, probs = layer(hidden_states, bias, output_attentions)
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if output_attentions:
                all_attentions.append(probs)
        return (hidden_states, None if all_hidden is None else tuple(all_hidden),
                None if all_attentions is None else tuple(all_attentions))


class MPNetPreTrainedModel(BertPreTrainedModel):
    """BERT's loading, saving and initialisation with MPNet's config and key prefix."""
    config_class = MPNetConfig
    base_model_prefix = "mpnet."
    ignored_unexpected_keys = ("lm_head.",)


class MPNetModel(MPNetPreTrainedModel):
    """Embeddings, the encoder, optional pooler (tanh(dense(first token)))."""

    ignored_unexpected_keys = MPNetPreTrainedModel.ignored_unexpected_keys + ("classifier.",)
    allowed_missing_keys = ("pooler.",)

    def __init__(self, config, add_pooling_layer=True):
        super().__init__()
        self.config = config
        self.embeddings = MPNetEmbeddings(config)
        self.encoder = MPNetEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False,
                output_attentions=False):
        """input_ids, attention_mask (B, L) ints; token_type_ids: ignored (MPNet has none)."""
        input_ids = _as_ids("input_ids", input_ids)
        attention_mask = _as_ids("attention_mask", attention_mask, input_ids.shape)
        embedding_output = self.embeddings(input_ids)
        sequence, all_hidden, attentions = self.encoder(embedding_output, attention_bias(attention_mask, embedding_output),
                                                        output_hidden_states, output_attentions)
        pooled = self.pooler(sequence) if self.pooler is not None else None
        return BaseModelOutputWithPooling(sequence, pooled, all_hidden, attentions)


class MPNetForSequenceClassification(MPNetPreTrainedModel):
    """classifier (dense, tanh, out_proj) on the first token (<s>): (B, num_labels)."""

    allowed_missing_keys = ("classifier.",)
    ignored_unexpected_keys = MPNetPreTrainedModel.ignored_unexpected_keys + ("pooler.", "mpnet.pooler.")

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.mpnet = MPNetModel(config, add_pooling_layer=False)
        self.classifier = FirstTokenClassificationHead(config, lambda x: x.tanh())
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.mpnet(input_ids, attention_mask, None, output_hidden_states, output_attentions)
        logits = self.classifier(outputs.last_hidden_state)
        loss = None if labels is None else sequence_classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class MPNetForTokenClassification(MPNetPreTrainedModel):
    """classifier(dropout(every token's hidden state)): (B, L, num_labels)."""

    allowed_missing_keys = ("classifier.",)
    ignored_unexpected_keys = MPNetPreTrainedModel.ignored_unexpected_keys + (
        "pooler.", "mpnet.pooler.", "classifier.dense.", "classifier.out_proj.")

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.mpnet = MPNetModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.mpnet(input_ids, attention_mask, None, output_hidden_states, output_attentions)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None if labels is None else token_classification_loss(logits, labels)
        return TokenClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class MPNetForQuestionAnswering(MPNetPreTrainedModel):
    """qa_outputs on every token: start and end logits (B, L, 2)."""

    allowed_missing_keys = ("qa_outputs.",)
    ignored_unexpected_keys = MPNetPreTrainedModel.ignored_unexpected_keys + ("pooler.", "mpnet.pooler.", "classifier.")

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.mpnet = MPNetModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.mpnet(input_ids, attention_mask, None, output_hidden_states, output_attentions)
        logits = self.qa_outputs(outputs.last_hidden_state)
        loss = None if labels is None else question_answering_loss(logits, labels)
        return QuestionAnsweringModelOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class MPNetForMultipleChoice(MPNetPreTrainedModel):
    """classifier(dropout(pooled output)): (B, C)."""

    allowed_missing_keys = ("classifier.", "pooler.", "mpnet.pooler.")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.mpnet = MPNetModel(config)
        self.dropout = classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        (ids, mask), choices = choices_as_rows(input_ids, attention_mask)
        outputs = self.mpnet(ids, mask, None, output_hidden_states, output_attentions)
        logits = self.classifier(self.dropout(outputs.pooler_output)).reshape(*choices)
        loss = None if labels is None else F.cross_entropy(logits, array_of(labels))
        return MultipleChoiceModelOutput(loss, logits, outputs.hidden_states, outputs.attentions)
