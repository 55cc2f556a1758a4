"""ELECTRA (the discriminator), as transformers' modeling_electra.py lays it out: BERT's
embeddings at embedding_size, projected to hidden_size by embeddings_project when the two
differ, BERT's encoder, no pooler, and its own classification head (dense, gelu, out_proj on
the first token). Loading, saving, initialisation and the losses are BERT's.

Shapes: B batch, L sequence length, E embedding_size, H hidden_size.
"""
from minisft import functional as F
from minisft import nn
from minisft.models.bert import (BertEmbeddings, BertEncoder, BertModel, BertPreTrainedModel,
                                 FirstTokenClassificationHead, QuestionAnsweringHead, SequenceClassifierHead,
                                 TokenClassifierHead, classifier_dropout)
from minisft.models.config import BertConfig


class ElectraConfig(BertConfig):
    """BERT's fields plus embedding_size, with transformers' ELECTRA defaults."""

    model_type = "electra"
    defaults = {**BertConfig.defaults, "embedding_size": 128, "hidden_size": 256, "num_attention_heads": 4,
                "intermediate_size": 1024}

    def validate(self):
        super().validate()
        if not isinstance(self.embedding_size, int) or self.embedding_size <= 0:
            raise ValueError(f"{self._source}: field 'embedding_size' must be a positive integer, "
                             f"not {self.embedding_size!r}")


class ElectraPreTrainedModel(BertPreTrainedModel):
    """BERT's loading, saving and initialisation with ELECTRA's config and key prefix."""
    config_class = ElectraConfig
    base_model_prefix = "electra."
    ignored_unexpected_keys = ("discriminator_predictions.", "generator_predictions.", "generator_lm_head.")


class ElectraModel(ElectraPreTrainedModel, BertModel):
    """Embeddings (E wide), embeddings_project to H when E != H, BERT's encoder; no pooler."""

    ignored_unexpected_keys = ElectraPreTrainedModel.ignored_unexpected_keys + ("classifier.",)

    def __init__(self, config):
        nn.Module.__init__(self)
        self.config = config
        self.embeddings = BertEmbeddings(config, config.embedding_size)
        if config.embedding_size != config.hidden_size:
            self.embeddings_project = nn.Linear(config.embedding_size, config.hidden_size)
        self.encoder = BertEncoder(config)
        self.pooler = None
        self.init_weights()

    def embed(self, input_ids, token_type_ids, position_ids):
        hidden = self.embeddings(input_ids, token_type_ids, position_ids)
        return self.embeddings_project(hidden) if hasattr(self, "embeddings_project") else hidden


class ElectraForSequenceClassification(SequenceClassifierHead, ElectraPreTrainedModel):
    allowed_missing_keys = ("classifier.",)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.electra = ElectraModel(config)
        self.classifier = FirstTokenClassificationHead(config, F.gelu)  # dense, gelu, out_proj
        self.init_weights()

    def head(self, out):
        return self.classifier(out.last_hidden_state)


class ElectraForTokenClassification(TokenClassifierHead, ElectraPreTrainedModel):
    allowed_missing_keys = ("classifier.",)
    ignored_unexpected_keys = ElectraPreTrainedModel.ignored_unexpected_keys + ("classifier.dense.",
                                                                                "classifier.out_proj.")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.electra = ElectraModel(config)
        self.dropout = classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()



class ElectraForQuestionAnswering(QuestionAnsweringHead, ElectraPreTrainedModel):
    ignored_unexpected_keys = ElectraPreTrainedModel.ignored_unexpected_keys + ("classifier.",)

    def __init__(self, config):
        super().__init__()
        self._build(config, ElectraModel(config))
