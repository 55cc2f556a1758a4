"""BertConfig: the fields of transformers' config.json, with transformers' defaults."""
import copy
import json
import pathlib

from minisft.engine.errors import MissingFile, ModelFileError
from minisft.files.atomic import write_json_atomic


class BertConfig:
    """Hyper-parameters of a BERT model. Unknown fields of config.json are kept as they are,
    so a saved config round-trips."""

    model_type = "bert"
    layers_field = "num_hidden_layers"  # the field that counts encoder layers (see minisft.cli.inside)
    defaults = {
        "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute",
        "classifier_dropout": None, "problem_type": None,
    }
    attribute_map = {}  # transformers' common names for a family's own fields: {"hidden_size": "dim"}
    positive_fields = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                       "max_position_embeddings", "type_vocab_size")

    def __init__(self, source="config", **fields):
        self._source = source
        labels = fields.pop("id2label", None)
        num_labels = fields.pop("num_labels", None)
        fields.pop("label2id", None)  # derived from id2label
        for name, value in {**self.defaults, **fields}.items():
            setattr(self, name, value)
        if labels is not None and num_labels in (None, len(labels)):
            self.id2label = {int(k): v for k, v in labels.items()}
        else:
            self.id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        self.validate()

    def __getattr__(self, name):
        """A common name (hidden_size, ...) read through the family's attribute_map."""
        if name in type(self).attribute_map:
            return getattr(self, type(self).attribute_map[name])
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    @property
    def label2id(self):
        return {v: k for k, v in self.id2label.items()}

    @property
    def num_labels(self):
        return len(self.id2label)

    def validate(self):
        def bad(field, why):
            return ValueError(f"{self._source}: field {field!r} {why}")

        if self.hidden_size % self.num_attention_heads:
            raise bad("hidden_size", f"({self.hidden_size}) must be a multiple of "
                                     f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise bad("hidden_act", f"is {self.hidden_act!r}; supported: gelu, gelu_new, "
                                    "gelu_pytorch_tanh, relu")
        if self.position_embedding_type != "absolute":
            raise bad("position_embedding_type", f"is {self.position_embedding_type!r}; only "
                                                 "'absolute' is supported")
        for field in self.positive_fields:
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise bad(field, f"must be a positive integer, not {getattr(self, field)!r}")

    @classmethod
    def from_json_file(cls, path, **overrides):
        path = pathlib.Path(path)
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MissingFile(f"{path} does not exist: a checkpoint directory needs "
                                    "config.json (run `minisft fetch NAME` or save_pretrained)") from None
        except json.JSONDecodeError as exc:
            raise ModelFileError(f"{path}: not valid JSON ({exc})") from None
        return cls(source=str(path), **{**fields, **overrides})

    @classmethod
    def from_pretrained(cls, directory, **overrides):
        return cls.from_json_file(pathlib.Path(directory) / "config.json", **overrides)

    def to_dict(self):
        fields = {k: copy.deepcopy(v) for k, v in vars(self).items()
                  if not k.startswith("_") or k == "_name_or_path"}  # where it came from, as transformers 4 kept it
        fields["id2label"] = {str(k): v for k, v in self.id2label.items()}
        fields["label2id"] = self.label2id
        fields["model_type"] = self.model_type
        return fields

    def save_pretrained(self, directory):
        write_json_atomic(self.to_dict(), pathlib.Path(directory) / "config.json")

    def __repr__(self):
        return f"BertConfig({json.dumps(self.to_dict(), sort_keys=True)})"
