"""RoBERTa, as transformers' modeling_roberta.py lays it out: BERT's layers, with position ids
counted from padding_idx + 1 over the non-padding tokens (padding keeps padding_idx), one
token type, and a classification head of dense, tanh, out_proj on the first token (<s>).
Loading, saving, initialisation and the losses are BERT's. Its byte-level BPE tokenizer is
not written yet: RoBERTa checkpoints load and run on ids made elsewhere.

Shapes: B batch, L sequence length, H hidden_size.
"""
import numpy

from minisft import nn
from minisft.engine import functional as F
from minisft.models.bert import (BertEmbeddings, BertModel, BertPreTrainedModel)
from minisft.models.heads import (FirstTokenClassificationHead, MultipleChoiceModelOutput,
                                  QuestionAnsweringModelOutput, SequenceClassifierOutput, TokenClassifierOutput,
                                  choices_as_rows, classifier_dropout, question_answering_loss,
                                  sequence_classification_loss, token_classification_loss)
from minisft.engine.tensor import array_of
from minisft.engine.trace import outside_graph
from minisft.models.config import BertConfig


class RobertaConfig(BertConfig):
    """BERT's fields with RoBERTa's special-token defaults (<s> 0, <pad> 1, </s> 2)."""

    model_type = "roberta"
    defaults = {**BertConfig.defaults, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}


class RobertaEmbeddings(BertEmbeddings):
    """BERT's embeddings with position ids padding_idx + 1, + 2, ... over the real tokens."""

    def __init__(self, config):
        super().__init__(config)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=config.pad_token_id)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        if position_ids is None:
            position_ids = positions_after_padding(input_ids, self.config.pad_token_id,
                                                   self.config.max_position_embeddings)
        return super().forward(input_ids, token_type_ids, position_ids)


@outside_graph("positions_after_padding")
def positions_after_padding(input_ids, padding_idx, limit):
    """Position ids padding_idx + 1, + 2, ... over the real tokens, padding_idx at padding
    (fairseq's make_positions; RoBERTa's and MPNet's): (B, L) -> (B, L), checked below `limit`
    (max_position_embeddings)."""
    real = (input_ids != padding_idx).astype(numpy.int64)
    position_ids = numpy.cumsum(real, axis=1) * real + padding_idx
    if int(position_ids.max()) >= limit:
        raise ValueError(f"sequence length {input_ids.shape[1]} needs position {int(position_ids.max())}, beyond "
                         f"max_position_embeddings {limit} (config.json); positions count from the padding id "
                         f"{padding_idx} + 1: truncate to {limit - padding_idx - 1} tokens")
    return position_ids


class RobertaPreTrainedModel(BertPreTrainedModel):
    """BERT's loading, saving and initialisation with RoBERTa's config and key prefix."""
    config_class = RobertaConfig
    base_model_prefix = "roberta."
    ignored_unexpected_keys = ("lm_head.",)


class RobertaModel(RobertaPreTrainedModel, BertModel):
    """RobertaEmbeddings, BERT's encoder and (optionally) pooler."""

    ignored_unexpected_keys = RobertaPreTrainedModel.ignored_unexpected_keys + ("classifier.",)
    allowed_missing_keys = ("pooler.",)  # task checkpoints have none: it starts newly initialised
    embeddings_class = RobertaEmbeddings


class RobertaForSequenceClassification(RobertaPreTrainedModel):
    """classifier (dense, tanh, out_proj) on the first token (<s>)."""

    allowed_missing_keys = ("classifier.",)
    ignored_unexpected_keys = RobertaPreTrainedModel.ignored_unexpected_keys + ("pooler.", "roberta.pooler.")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.classifier = FirstTokenClassificationHead(config, lambda x: x.tanh())  # dense, tanh, out_proj
        self.init_weights()


    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.roberta(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions)
        logits = self.classifier(outputs.last_hidden_state)
        loss = None if labels is None else sequence_classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class RobertaForTokenClassification(RobertaPreTrainedModel):
    """classifier(dropout(every token's hidden state))."""

    allowed_missing_keys = ("classifier.",)
    ignored_unexpected_keys = RobertaPreTrainedModel.ignored_unexpected_keys + (
        "pooler.", "roberta.pooler.", "classifier.dense.", "classifier.out_proj.")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.dropout = classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()


    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.roberta(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None if labels is None else token_classification_loss(logits, labels)
        return TokenClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class RobertaForQuestionAnswering(RobertaPreTrainedModel):
    """qa_outputs on every token's hidden state: start and end logits."""

    allowed_missing_keys = ("qa_outputs.",)
    ignored_unexpected_keys = RobertaPreTrainedModel.ignored_unexpected_keys + (
        "pooler.", "roberta.pooler.", "classifier.")

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()


    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.roberta(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions)
        logits = self.qa_outputs(outputs.last_hidden_state)
        loss = None if labels is None else question_answering_loss(logits, labels)
        return QuestionAnsweringModelOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class RobertaForMultipleChoice(RobertaPreTrainedModel):
    """classifier(dropout(pooled output)): one score per choice."""

    allowed_missing_keys = ("classifier.", "pooler.", "roberta.pooler.")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.roberta = RobertaModel(config)
        self.dropout = classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.init_weights()

    # Copied from minisft.models.bert.BertForMultipleChoice.forward with bert->roberta
    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        (ids, mask, types), choices = choices_as_rows(input_ids, attention_mask, token_type_ids)
        outputs = self.roberta(ids, mask, types, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions)
        logits = self.classifier(self.dropout(outputs.pooler_output)).reshape(*choices)
        loss = None if labels is None else F.cross_entropy(logits, array_of(labels))
        return MultipleChoiceModelOutput(loss, logits, outputs.hidden_states, outputs.attentions)
