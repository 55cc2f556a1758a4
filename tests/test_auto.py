"""minisft.models.auto: the family chosen by config.json's model_type (or architectures), the
tokenizer by tokenizer_config.json's tokenizer_class; clear errors for the rest."""
import json
import shutil

import pytest

from minisft.models import bert
from minisft.models.auto import (AutoConfig, AutoModel, AutoModelForSequenceClassification,
                                 AutoModelForTokenClassification, AutoTokenizer, model_type)
from minisft.models.config import BertConfig
from minisft.tokenizer import BertTokenizer
from conftest import FIXTURES

TINY = FIXTURES / "tiny-bert"


def test_auto_classes_pick_the_bert_family():
    assert isinstance(AutoConfig.from_pretrained(TINY), BertConfig)
    assert type(AutoModel.from_pretrained(TINY)) is bert.BertModel
    model = AutoModelForSequenceClassification.from_pretrained(TINY, num_labels=3)
    assert type(model) is bert.BertForSequenceClassification and model.config.num_labels == 3
    assert type(AutoModelForTokenClassification.from_pretrained(TINY, num_labels=5)) is bert.BertForTokenClassification
    assert type(AutoTokenizer.from_pretrained(TINY)) is BertTokenizer


def _copy_with(tmp_path, config=None, tokenizer_config=None):
    directory = tmp_path / "ckpt"
    shutil.copytree(TINY, directory)
    if config is not None:
        fields = json.loads((directory / "config.json").read_text())
        fields.pop("model_type")
        fields.update(config)
        (directory / "config.json").write_text(json.dumps(fields))
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def test_a_config_without_model_type_is_read_by_its_architecture(tmp_path):
    directory = _copy_with(tmp_path, {"architectures": ["BertForSequenceClassification"]})
    assert model_type(directory) == "bert"
    assert type(AutoModel.from_pretrained(directory)) is bert.BertModel


@pytest.mark.parametrize("config, tokenizer_config, message", [
    ({"model_type": "gpt2"}, None, r"config.json: field 'model_type' is 'gpt2'; supported: bert"),
    ({"architectures": []}, None, r"config.json: field 'model_type' is None; supported: bert"),
    (None, {"tokenizer_class": "T5Tokenizer"}, r"tokenizer_config.json: field 'tokenizer_class' is 'T5Tokenizer'"),
])
def test_unknown_families_and_tokenizers_name_the_file_and_field(tmp_path, config, tokenizer_config, message):
    directory = _copy_with(tmp_path, config, tokenizer_config)
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(directory) if config is not None else AutoTokenizer.from_pretrained(directory)


def test_a_directory_without_config_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json does not exist: a checkpoint directory needs"):
        AutoModel.from_pretrained(tmp_path)


def test_num_labels_that_disagrees_with_a_short_id2label_wins_as_in_transformers(tmp_path):
    """transformers warns and makes num_labels generic labels LABEL_0.. (checked with 5.24)."""
    directory = _copy_with(tmp_path, {"num_labels": 3, "id2label": {"0": "neg", "1": "pos"}})
    assert AutoConfig.from_pretrained(directory).id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    directory = _copy_with(tmp_path / "agreeing", {"id2label": {"0": "neg", "1": "pos"}})
    assert AutoModelForSequenceClassification.from_pretrained(directory).config.id2label == {0: "neg", 1: "pos"}
