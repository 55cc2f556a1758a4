"""DistilBERT, as transformers' modeling_distilbert.py lays it out (same names, so loading is a
name-for-name copy): BERT's layers without token types or pooler, its own key names
(q_lin, sa_layer_norm, ffn.lin1, ...), and a classification head on the first token through
pre_classifier. Loading, saving, initialisation and the classification loss are BERT's.

Shapes: B batch, L sequence length, D dim, nh n_heads.
"""

from minisft import nn
from minisft.engine import functional as F
from minisft.models.bert import (ACTIVATIONS, BaseModelOutputWithPooling, BertEncoder, BertPreTrainedModel,
                                 BertSelfAttention, _as_ids, _check_range, absolute_positions, attention_bias, merge_heads, split_heads)
from minisft.models.config import BertConfig
from minisft.models.heads import (MultipleChoiceModelOutput, QuestionAnsweringModelOutput, SequenceClassifierOutput,
                                  TokenClassifierOutput, choices_as_rows, question_answering_loss,
                                  sequence_classification_loss, token_classification_loss)
from minisft.engine.tensor import array_of

LAYER_NORM_EPS = 1e-12  # fixed in DistilBERT, not a config field


class DistilBertConfig(BertConfig):
    """The fields of a DistilBERT config.json, with transformers' defaults."""

    model_type = "distilbert"
    layers_field = "n_layers"
    attribute_map = {"hidden_size": "dim", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers"}
    defaults = {
        "vocab_size": 30522, "max_position_embeddings": 512, "sinusoidal_pos_embds": False,
        "n_layers": 6, "n_heads": 12, "dim": 768, "hidden_dim": 3072, "dropout": 0.1,
        "attention_dropout": 0.1, "activation": "gelu", "initializer_range": 0.02, "qa_dropout": 0.1,
        "seq_classif_dropout": 0.2, "pad_token_id": 0, "problem_type": None,
    }

    def validate(self):
        def bad(field, why):
            return ValueError(f"{self._source}: field {field!r} {why}")

        if self.dim % self.n_heads:
            raise bad("dim", f"({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", f"is {self.activation!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.sinusoidal_pos_embds:
            raise bad("sinusoidal_pos_embds", "is true: fixed sinusoidal position embeddings are not "
                                              "supported; only learned ones (false)")
        for field in ("vocab_size", "dim", "n_layers", "hidden_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise bad(field, f"must be a positive integer, not {getattr(self, field)!r}")


class Embeddings(nn.Module):
    """word + position embeddings, LayerNorm, dropout: (B, L) ids -> (B, L, D)."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.dropout)
        self.config = config

    def forward(self, input_ids):
        config = self.config
        length = input_ids.shape[1]
        if length > config.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings} (config.json): truncate the input")
        _check_range("input_ids", input_ids, config.vocab_size, "vocab_size")
        positions = self.position_embeddings(absolute_positions(length))
        return self.dropout(self.LayerNorm(self.word_embeddings(input_ids) + positions))


class MultiHeadSelfAttention(nn.Module):
    """q_lin, k_lin, v_lin, attention with dropout on the probabilities, then out_lin:
    (B, L, D) -> (B, L, D)."""

    def __init__(self, config):
        super().__init__()
        self.n_heads = config.n_heads
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)
        self.dropout = nn.Dropout(config.attention_dropout)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        query = split_heads(self.q_lin(hidden_states), self.n_heads)  # (B, nh, L, D / nh)
        key = split_heads(self.k_lin(hidden_states), self.n_heads)
        value = split_heads(self.v_lin(hidden_states), self.n_heads)
        context, probs = self.attention(query, key, value, attention_mask, output_attentions)
        return self.out_lin(merge_heads(context)), probs

    attention = BertSelfAttention.attention  # Copied from BertSelfAttention


class FFN(nn.Module):
    """lin2(activation(lin1(x))), dropout: (B, L, D) -> (B, L, hidden_dim) -> (B, L, D)."""

    def __init__(self, config):
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.activation_name = config.activation
        self.activation = ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.lin2(self.activation(self.lin1(x))))


class TransformerBlock(nn.Module):
    """x = sa_layer_norm(attention(x) + x); x = output_layer_norm(ffn(x) + x)."""

    def __init__(self, config):
        super().__init__()
        self.attention = MultiHeadSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        attended, probs = self.attention(hidden_states, attention_mask, output_attentions)
        attended = self.sa_layer_norm(attended + hidden_states)
        return self.output_layer_norm(self.ffn(attended) + attended), probs


class Transformer(BertEncoder):
    """BERT's encoder loop over n_layers TransformerBlocks."""

    def __init__(self, config):
        nn.Module.__init__(self)
        self.layer = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))


class DistilBertPreTrainedModel(BertPreTrainedModel):
    """BERT's loading, saving and initialisation with DistilBERT's config and key prefix: a
    base checkpoint loads into a task model and a task checkpoint's base into a base model."""
    config_class = DistilBertConfig
    base_model_prefix = "distilbert."
    ignored_unexpected_keys = ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.")  # the MLM head


class DistilBertModel(DistilBertPreTrainedModel):
    """The bare encoder: embeddings and n_layers TransformerBlocks; no pooler."""

    ignored_unexpected_keys = DistilBertPreTrainedModel.ignored_unexpected_keys + ("pre_classifier.", "classifier.")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.transformer = Transformer(config)
        self.init_weights()

    def encoder_layers(self):
        return list(self.transformer.layer)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False,
                output_attentions=False):
        """input_ids, attention_mask (1 = attend, 0 = padding): (B, L) ints. token_type_ids
        are accepted for a common signature and ignored: DistilBERT has no token types."""
        input_ids = _as_ids("input_ids", input_ids)
        attention_mask = _as_ids("attention_mask", attention_mask, input_ids.shape)
        embedding_output = self.embeddings(input_ids)
        extended_attention_mask = attention_bias(attention_mask, embedding_output)
        sequence, all_hidden, attentions = self.transformer(embedding_output, extended_attention_mask,
                                                            output_hidden_states, output_attentions)
        return BaseModelOutputWithPooling(sequence, None, all_hidden, attentions)


class DistilBertForSequenceClassification(DistilBertPreTrainedModel):
    """classifier(dropout(relu(pre_classifier(hidden state of the first token))))."""

    allowed_missing_keys = ("classifier.", "pre_classifier.")

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.distilbert = DistilBertModel(config)
        self.dropout = nn.Dropout(config.seq_classif_dropout)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.distilbert(input_ids, attention_mask, output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions)
        logits = self.classifier(self.dropout(F.relu(self.pre_classifier(outputs.last_hidden_state[:, 0]))))
        loss = None if labels is None else sequence_classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class DistilBertForTokenClassification(DistilBertPreTrainedModel):
    """classifier(dropout(every token's hidden state))."""

    allowed_missing_keys = ("classifier.",)
    ignored_unexpected_keys = DistilBertPreTrainedModel.ignored_unexpected_keys + ("pre_classifier.",)

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.distilbert = DistilBertModel(config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.distilbert(input_ids, attention_mask, output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None if labels is None else token_classification_loss(logits, labels)
        return TokenClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class DistilBertForQuestionAnswering(DistilBertPreTrainedModel):
    """qa_outputs(dropout(hidden states)), dropout qa_dropout."""

    allowed_missing_keys = ("qa_outputs.",)
    ignored_unexpected_keys = DistilBertPreTrainedModel.ignored_unexpected_keys + ("pre_classifier.", "classifier.")

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.distilbert = DistilBertModel(config)
        self.qa_outputs = nn.Linear(config.dim, config.num_labels)
        self.dropout = nn.Dropout(config.qa_dropout)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.distilbert(input_ids, attention_mask, output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions)
        logits = self.qa_outputs(self.dropout(outputs.last_hidden_state))
        loss = None if labels is None else question_answering_loss(logits, labels)
        return QuestionAnsweringModelOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class DistilBertForMultipleChoice(DistilBertPreTrainedModel):
    """classifier(dropout(relu(pre_classifier(hidden state of the first token)))): one score
    per choice; the loss the cross-entropy over each question's choices."""

    allowed_missing_keys = ("classifier.", "pre_classifier.")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.distilbert = DistilBertModel(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, 1)
        self.dropout = nn.Dropout(config.seq_classif_dropout)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        (ids, mask), choices = choices_as_rows(input_ids, attention_mask)
        outputs = self.distilbert(ids, mask, output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions)
        logits = self.classifier(self.dropout(F.relu(self.pre_classifier(outputs.last_hidden_state[:, 0]))))
        logits = logits.reshape(*choices)
        loss = None if labels is None else F.cross_entropy(logits, array_of(labels))
        return MultipleChoiceModelOutput(loss, logits, outputs.hidden_states, outputs.attentions)
