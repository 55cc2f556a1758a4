"""The model-family registry, as transformers' Auto classes: config.json's `model_type`
picks the family, and tokenizer_config.json's `tokenizer_class` (else the family) picks the
tokenizer. Adding a family is one module under models/ and one FAMILIES line here.

    model = AutoModelForSequenceClassification.from_pretrained("weights/all-MiniLM-L6-v2", num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained("weights/all-MiniLM-L6-v2")
"""
import json
import pathlib
from dataclasses import dataclass

from minisft.engine.errors import MissingFile, ModelFileError
from minisft import lean as _lean
from minisft.models import bert, deberta_v2, distilbert, electra, modernbert, mpnet, roberta, xlm_roberta
from minisft.models.config import BertConfig
from minisft.tokenizers.bpe import ByteLevelBPETokenizer
from minisft.tokenizers.unigram import UnigramTokenizer
from minisft.tokenizers.wordpiece import BertTokenizer, MPNetTokenizer


@dataclass(frozen=True)
class Family:
    """One model family's classes, by role."""
    config: type
    base: type
    sequence_classification: type
    token_classification: type
    question_answering: type
    multiple_choice: type  # None: the family has no multiple-choice head here
    tokenizer: type


FAMILIES = {
    "bert": Family(BertConfig, bert.BertModel, bert.BertForSequenceClassification, bert.BertForTokenClassification,
                   bert.BertForQuestionAnswering, bert.BertForMultipleChoice, BertTokenizer),
    "deberta-v2": Family(deberta_v2.DebertaV2Config, deberta_v2.DebertaV2Model,
                         deberta_v2.DebertaV2ForSequenceClassification, deberta_v2.DebertaV2ForTokenClassification,
                         deberta_v2.DebertaV2ForQuestionAnswering, deberta_v2.DebertaV2ForMultipleChoice,
                         UnigramTokenizer),
    "distilbert": Family(distilbert.DistilBertConfig, distilbert.DistilBertModel,
                         distilbert.DistilBertForSequenceClassification, distilbert.DistilBertForTokenClassification,
                         distilbert.DistilBertForQuestionAnswering, distilbert.DistilBertForMultipleChoice,
                         BertTokenizer),
    "electra": Family(electra.ElectraConfig, electra.ElectraModel, electra.ElectraForSequenceClassification,
                      electra.ElectraForTokenClassification, electra.ElectraForQuestionAnswering, None,
                      BertTokenizer),
    "modernbert": Family(modernbert.ModernBertConfig, modernbert.ModernBertModel,
                         modernbert.ModernBertForSequenceClassification, modernbert.ModernBertForTokenClassification,
                         modernbert.ModernBertForQuestionAnswering, modernbert.ModernBertForMultipleChoice,
                         ByteLevelBPETokenizer),
    "mpnet": Family(mpnet.MPNetConfig, mpnet.MPNetModel, mpnet.MPNetForSequenceClassification,
                    mpnet.MPNetForTokenClassification, mpnet.MPNetForQuestionAnswering, mpnet.MPNetForMultipleChoice,
                    MPNetTokenizer),
    "roberta": Family(roberta.RobertaConfig, roberta.RobertaModel, roberta.RobertaForSequenceClassification,
                      roberta.RobertaForTokenClassification, roberta.RobertaForQuestionAnswering,
                      roberta.RobertaForMultipleChoice, ByteLevelBPETokenizer),
    "xlm-roberta": Family(xlm_roberta.XLMRobertaConfig, xlm_roberta.XLMRobertaModel,
                          xlm_roberta.XLMRobertaForSequenceClassification, xlm_roberta.XLMRobertaForTokenClassification,
                          xlm_roberta.XLMRobertaForQuestionAnswering, xlm_roberta.XLMRobertaForMultipleChoice,
                          UnigramTokenizer),
}
TOKENIZERS = {  # tokenizer_config.json's tokenizer_class -> ours (transformers' fast and slow names alike)
    "BertTokenizer": BertTokenizer, "BertTokenizerFast": BertTokenizer,
    "DistilBertTokenizer": BertTokenizer, "DistilBertTokenizerFast": BertTokenizer,
    "ElectraTokenizer": BertTokenizer, "ElectraTokenizerFast": BertTokenizer,
    "RobertaTokenizer": ByteLevelBPETokenizer, "RobertaTokenizerFast": ByteLevelBPETokenizer,
    "XLMRobertaTokenizer": UnigramTokenizer, "XLMRobertaTokenizerFast": UnigramTokenizer,
    "MPNetTokenizer": MPNetTokenizer, "MPNetTokenizerFast": MPNetTokenizer,
    "DebertaV2Tokenizer": UnigramTokenizer, "DebertaV2TokenizerFast": UnigramTokenizer,
}


def _read_json(path, what):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFile(f"{path} does not exist: {what}") from None
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc})") from None


def model_type(directory):
    """config.json's model_type; for configs without one, the family named by the first of
    `architectures` (e.g. "BertForSequenceClassification" -> "bert")."""
    path = pathlib.Path(directory) / "config.json"
    config = _read_json(path, "a checkpoint directory needs config.json (run `minisft fetch NAME` or "
                              "save_pretrained)")
    name = config.get("model_type")
    if name is None:
        architecture = (config.get("architectures") or [""])[0].lower()
        name = next((family for family in FAMILIES if architecture.startswith(family)), None)
    if name not in FAMILIES:
        raise ModelFileError(f"{path}: field 'model_type' is {name!r}; supported: {', '.join(FAMILIES)}")
    return name


def family(directory):
    """The Family of the checkpoint in `directory`."""
    return FAMILIES[model_type(directory)]


class _Auto:
    """from_pretrained(directory, ...) of the family's class in the role `role`."""
    role = None

    @classmethod
    def from_pretrained(cls, directory, **kwargs):
        model_class = getattr(family(directory), cls.role)
        if model_class is None:
            raise ModelFileError(f"{directory}: minisft has no {cls.role.replace('_', '-')} head for "
                             f"{model_type(directory)} checkpoints; use one of "
                             f"{', '.join(n for n, f in FAMILIES.items() if getattr(f, cls.role))}")
        return model_class.from_pretrained(directory, **kwargs)


class AutoConfig(_Auto):
    role = "config"


class _AutoModel(_Auto):
    """A model class's from_pretrained, then the lean passes' defaults (lean.apply: what
    minisft train runs); lean=False: the plain model."""

    @classmethod
    def from_pretrained(cls, directory, lean=True, **kwargs):
        model = super().from_pretrained(directory, **kwargs)
        return _lean.apply(model) if lean else model


class AutoModel(_AutoModel):
    role = "base"


class AutoModelForSequenceClassification(_AutoModel):
    role = "sequence_classification"


class AutoModelForTokenClassification(_AutoModel):
    role = "token_classification"


class AutoModelForQuestionAnswering(_AutoModel):
    role = "question_answering"


class AutoModelForMultipleChoice(_AutoModel):
    role = "multiple_choice"


BY_MODEL_TYPE = {"BPE": ByteLevelBPETokenizer, "Unigram": UnigramTokenizer, "WordPiece": BertTokenizer}


def _by_tokenizer_json(path):
    kind = (_read_json(path, "PreTrainedTokenizerFast needs tokenizer.json").get("model") or {}).get("type")
    if kind not in BY_MODEL_TYPE:
        raise ModelFileError(f"{path}: field 'model.type' is {kind!r}; supported: {', '.join(BY_MODEL_TYPE)}")
    return BY_MODEL_TYPE[kind]


class AutoTokenizer:
    @classmethod
    def from_pretrained(cls, directory):
        """The tokenizer that tokenizer_config.json's tokenizer_class names, else the family's."""
        path = pathlib.Path(directory) / "tokenizer_config.json"
        name = _read_json(path, "").get("tokenizer_class") if path.is_file() else None
        if name is None:
            return family(directory).tokenizer.from_pretrained(directory)
        if name in ("PreTrainedTokenizerFast", "TokenizersBackend"):  # generic: tokenizer.json's model decides
            return _by_tokenizer_json(pathlib.Path(directory) / "tokenizer.json").from_pretrained(directory)
        if name not in TOKENIZERS:
            raise ModelFileError(f"{path}: field 'tokenizer_class' is {name!r}; supported: {', '.join(TOKENIZERS)}")
        return TOKENIZERS[name].from_pretrained(directory)
