"""RoBERTa, as transformers' modeling_roberta.py lays it out: BERT's blocks, with position ids
counted from padding_idx + 1 over the non-padding tokens (padding keeps padding_idx), one
token type, and a classification head of dense, tanh, out_proj on the first token (<s>).
Loading, saving, initialisation and the losses are BERT's. Its byte-level BPE tokenizer is
not written yet: RoBERTa checkpoints load and run on ids made elsewhere.

Shapes: B batch, L sequence length, H hidden_size.
"""
import numpy

from minisft import nn
from minisft.models.bert import (BertEmbeddings, BertModel, BertPreTrainedModel, FirstTokenClassificationHead,
                                 PooledMultipleChoiceHead, QuestionAnsweringHead, SequenceClassifierHead,
                                 TokenClassifierHead, classifier_dropout)
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
        padding_idx = self.config.pad_token_id
        if position_ids is None:
            real = (input_ids != padding_idx).astype(numpy.int64)
            position_ids = numpy.cumsum(real, axis=1) * real + padding_idx
        limit = self.config.max_position_embeddings
        if int(position_ids.max()) >= limit:
            raise ValueError(f"sequence length {input_ids.shape[1]} needs position {int(position_ids.max())}, beyond "
                             f"max_position_embeddings {limit} (config.json); RoBERTa counts positions from "
                             f"pad_token_id + 1: truncate to {limit - padding_idx - 1} tokens")
        return super().forward(input_ids, token_type_ids, position_ids)


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


class RobertaForSequenceClassification(SequenceClassifierHead, RobertaPreTrainedModel):
    allowed_missing_keys = ("classifier.",)
    ignored_unexpected_keys = RobertaPreTrainedModel.ignored_unexpected_keys + ("pooler.", "roberta.pooler.")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.classifier = FirstTokenClassificationHead(config, lambda x: x.tanh())  # dense, tanh, out_proj
        self.init_weights()

    def head(self, out):
        return self.classifier(out.last_hidden_state)


class RobertaForTokenClassification(TokenClassifierHead, RobertaPreTrainedModel):
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



class RobertaForQuestionAnswering(QuestionAnsweringHead, RobertaPreTrainedModel):
    ignored_unexpected_keys = RobertaPreTrainedModel.ignored_unexpected_keys + (
        "pooler.", "roberta.pooler.", "classifier.")

    def __init__(self, config):
        super().__init__()
        self._build(config, RobertaModel(config, add_pooling_layer=False))


class RobertaForMultipleChoice(PooledMultipleChoiceHead, RobertaPreTrainedModel):
    allowed_missing_keys = ("classifier.", "pooler.", "roberta.pooler.")

    def __init__(self, config):
        super().__init__()
        self._build(config, RobertaModel(config))
