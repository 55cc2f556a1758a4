"""XLM-RoBERTa, as transformers' modeling_xlm_roberta.py lays it out: RoBERTa's model and
heads under XLM-RoBERTa's names and `model_type`, with a SentencePiece Unigram tokenizer
(minisft.tokenizers.unigram) of 250k pieces instead of byte-level BPE. Checkpoint keys are
RoBERTa's ("roberta.encoder...").

Shapes: B batch, L sequence length, H hidden_size.
"""
from minisft.models import roberta


class XLMRobertaConfig(roberta.RobertaConfig):
    model_type = "xlm-roberta"


class XLMRobertaPreTrainedModel(roberta.RobertaPreTrainedModel):
    config_class = XLMRobertaConfig


class XLMRobertaModel(XLMRobertaPreTrainedModel, roberta.RobertaModel):
    """Embeddings with positions from pad_token_id + 1, BERT's encoder, optional pooler."""


class XLMRobertaForSequenceClassification(XLMRobertaPreTrainedModel, roberta.RobertaForSequenceClassification):
    """classifier (dense, tanh, out_proj) on the first token (<s>): (B, num_labels)."""


class XLMRobertaForTokenClassification(XLMRobertaPreTrainedModel, roberta.RobertaForTokenClassification):
    """classifier(dropout(every token's hidden state)): (B, L, num_labels)."""


class XLMRobertaForQuestionAnswering(XLMRobertaPreTrainedModel, roberta.RobertaForQuestionAnswering):
    """qa_outputs on every token: start and end logits, (B, L) each."""


class XLMRobertaForMultipleChoice(XLMRobertaPreTrainedModel, roberta.RobertaForMultipleChoice):
    """classifier(dropout(pooled output)): (B, choices)."""
