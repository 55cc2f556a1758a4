"""ELECTRA (the discriminator), as transformers' modeling_electra.py lays it out: BERT's
embeddings at embedding_size, projected to hidden_size by embeddings_project when the two
differ, BERT's encoder, no pooler, and its own classification head (dense, gelu, out_proj on
the first token). Loading, saving, initialisation and the losses are BERT's.

Shapes: B batch, L sequence length, E embedding_size, H hidden_size.
"""
from minisft.engine.errors import ModelFileError
from minisft import nn
from minisft.engine import functional as F
from minisft.models.bert import (BertEmbeddings, BertEncoder, BertModel, BertPreTrainedModel)
from minisft.models.config import BertConfig
from minisft.models.heads import (FirstTokenClassificationHead, QuestionAnsweringModelOutput,
                                  SequenceClassifierOutput, TokenClassifierOutput, classifier_dropout,
                                  question_answering_loss, sequence_classification_loss, token_classification_loss)


class ElectraConfig(BertConfig):
    """BERT's fields plus embedding_size, with transformers' ELECTRA defaults."""

    model_type = "electra"
    defaults = {**BertConfig.defaults, "embedding_size": 128, "hidden_size": 256, "num_attention_heads": 4,
                "intermediate_size": 1024}

    def validate(self):
        super().validate()
        if not isinstance(self.embedding_size, int) or self.embedding_size <= 0:
            raise ModelFileError(f"{self._source}: field 'embedding_size' must be a positive integer, "
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


class ElectraForSequenceClassification(ElectraPreTrainedModel):
    """classifier (dense, gelu, out_proj) on the first token."""

    allowed_missing_keys = ("classifier.",)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.electra = ElectraModel(config)
        self.classifier = FirstTokenClassificationHead(config, F.gelu)  # dense, gelu, out_proj
        self.init_weights()


    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.electra(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions)
        logits = self.classifier(outputs.last_hidden_state)
        loss = None if labels is None else sequence_classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class ElectraForTokenClassification(ElectraPreTrainedModel):
    """classifier(dropout(every token's hidden state))."""

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


    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.electra(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None if labels is None else token_classification_loss(logits, labels)
        return TokenClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)


class ElectraForQuestionAnswering(ElectraPreTrainedModel):
    """qa_outputs on every token's hidden state: start and end logits."""

    allowed_missing_keys = ("qa_outputs.",)
    ignored_unexpected_keys = ElectraPreTrainedModel.ignored_unexpected_keys + ("classifier.",)

    def __init__(self, config):
        super().__init__()
        self.config, self.num_labels = config, config.num_labels
        self.electra = ElectraModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()


    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        outputs = self.electra(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions)
        logits = self.qa_outputs(outputs.last_hidden_state)
        loss = None if labels is None else question_answering_loss(logits, labels)
        return QuestionAnsweringModelOutput(loss, logits, outputs.hidden_states, outputs.attentions)
