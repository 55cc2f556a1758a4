"""Lean fine-tuning: freezing, and LoRA adapters saved in peft's layout.

    freeze(model, embeddings=True, layers=2)             # the embeddings and the 2 lowest layers
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16))
    ... train ...
    model.save_pretrained("runs/lora")                   # adapter_config.json + adapter_model.safetensors
    plain = model.merge_and_unload()                     # W + (alpha / r) B A: a plain checkpoint again

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") keeps a Linear's
weight W (out, in) frozen and learns a low-rank update: y = W x + b + (alpha / r) B A dropout(x),
A (r, in) drawn as peft draws it (kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in))), B (out, r)
zero, so that training starts from the pretrained model exactly. The task head stays trainable
(peft's modules_to_save: "classifier", "score"); everything else is frozen.
"""
import json
import math
import pathlib
from dataclasses import asdict, dataclass, field

import numpy

from minisft.engine.errors import ModelFileError, UsageError
from minisft import nn
from minisft.engine import random
from minisft.files.atomic import write_json_atomic
from minisft.files.weights import load_safetensors, save_safetensors

TARGET_MODULES = {  # peft's default LoRA targets by config.json's model_type
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"],
}
TASK_TYPES = {  # peft's task_type by the head's class name
    "ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def freeze(model, embeddings=False, layers=0):
    """Freeze the base model's embeddings and/or its lowest `layers` encoder layers."""
    stack = model.encoder_layers()
    if not 0 <= layers <= len(stack):
        raise UsageError(f"--freeze-layers {layers}: the model has {len(stack)} layers; give 0 to {len(stack)}")
    if embeddings:
        model.base_model().embeddings.requires_grad_(False)
    for layer in stack[:layers]:
        layer.requires_grad_(False)
    return model


@dataclass
class LoraConfig:
    """LoRA's settings, with peft's names and defaults (adapter_config.json)."""
    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: list = None  # default: the family's (peft's defaults: query/value, q_lin/v_lin)
    bias: str = "none"
    modules_to_save: list = field(default_factory=lambda: ["classifier", "score"])

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise UsageError(f"LoRA r {self.r!r}: the rank must be a positive integer (e.g. 8)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"LoRA dropout {self.lora_dropout!r}: must be in [0, 1)")
        if self.bias != "none":
            raise UsageError(f"LoRA bias {self.bias!r}: minisft trains no biases under LoRA; use 'none'")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]

    @property
    def scaling(self):
        return self.lora_alpha / self.r


class LoraLinear(nn.Module):
    """A frozen Linear (`base_layer`) plus the trainable low-rank update
    (alpha / r) lora_B(lora_A(dropout(x))): (..., in) -> (..., out)."""

    def __init__(self, base_layer, config):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        out_features, in_features = base_layer.weight.shape
        self.lora_A = nn.Linear(in_features, config.r, bias=False)
        self.lora_B = nn.Linear(config.r, out_features, bias=False)
        bound = 1.0 / math.sqrt(in_features)
        rng = random.generator("cpu")
        self.lora_A.weight.data = rng.uniform(-bound, bound, (config.r, in_features)).astype(numpy.float32)
        self.lora_B.weight.data = numpy.zeros((out_features, config.r), numpy.float32)
        self.lora_dropout = nn.Dropout(config.lora_dropout)
        self.scaling = config.scaling
        self.merged = False

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def delta(self, x):
        """The low-rank update alone (None once merged into the weight)."""
        if self.merged:
            return None
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def forward(self, x):
        out = self.base_layer(x)
        delta = self.delta(x)
        return out if delta is None else out + delta

    def merge(self):
        """W += (alpha / r) B A, so that the base layer alone computes the adapted output."""
        if not self.merged:
            self.base_layer.weight.data += self._update()
            self.merged = True

    def unmerge(self):
        if self.merged:
            self.base_layer.weight.data -= self._update()
            self.merged = False

    def _update(self):
        return (self.lora_B.weight.data @ self.lora_A.weight.data * self.scaling).astype(self.weight.data.dtype)


def _replace(modules, path, module):
    """Put `module` at `path`; modules: {path: module} of the model, as named_modules gives."""
    parent_path, _, name = path.rpartition(".")
    setattr(modules[parent_path], name, module)


class LoraModel(nn.Module):
    """A task model with LoRA adapters: runs as the model does; saves in peft's layout."""

    def __init__(self, model, config, base_model_name_or_path=None):
        super().__init__()
        self.model = model
        self.peft_config = config
        self.base_model_name_or_path = base_model_name_or_path
        if config.target_modules is None:
            config.target_modules = list(TARGET_MODULES[model.config.model_type])
        linears = {path: m for path, m in model.named_modules() if isinstance(m, nn.Linear)}
        targets = [path for path in linears
                   if any(path == t or path.endswith("." + t) for t in config.target_modules)]
        if not targets:
            raise UsageError(f"LoRA target modules {config.target_modules} match no Linear layer of "
                             f"{type(model).__name__}; its Linear layers are: {', '.join(_short_names(linears))}")
        model.requires_grad_(False)
        modules = dict(model.named_modules())
        for path in targets:
            _replace(modules, path, LoraLinear(linears[path], config))
        self.saved_modules = [(path, m) for path, m in modules.items()
                              if path.rsplit(".", 1)[-1] in config.modules_to_save]
        for _, module in self.saved_modules:
            module.requires_grad_(True)

    @property
    def config(self):
        return self.model.config

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def loading_report(self):
        return self.model.loading_report()

    def encoder_layers(self):
        return self.model.encoder_layers()

    def base_model(self):
        return self.model.base_model()

    def adapters(self):
        return [(path, m) for path, m in self.model.named_modules() if isinstance(m, LoraLinear)]

    def merge_adapter(self):
        for _, adapter in self.adapters():
            adapter.merge()

    def unmerge_adapter(self):
        for _, adapter in self.adapters():
            adapter.unmerge()

    def merge_and_unload(self):
        """The task model with every update merged into its weights and the adapters gone."""
        modules = dict(self.model.named_modules())
        for path, adapter in self.adapters():
            adapter.merge()
            _replace(modules, path, adapter.base_layer)
        self.model.requires_grad_(True)
        return self.model

    # --- peft's files -----------------------------------------------------------------------
    def adapter_parameters(self):
        """{peft's name without its base_model.model. prefix: parameter} of the adapters'
        A and B and of the saved modules (the task head)."""
        params = {}
        for path, adapter in self.adapters():
            params[f"{path}.lora_A.weight"] = adapter.lora_A.weight
            params[f"{path}.lora_B.weight"] = adapter.lora_B.weight
        for path, module in self.saved_modules:
            params.update(module.named_parameters(path))
        return params

    def adapter_state(self):
        """{peft key: array}: what adapter_model.safetensors holds."""
        return {PEFT_PREFIX + name: param.numpy() for name, param in self.adapter_parameters().items()}

    def save_pretrained(self, directory):
        """adapter_config.json and adapter_model.safetensors as peft writes them (peft's
        PeftModel.from_pretrained loads them onto the transformers base model), and the task
        model's config.json (its labels) for minisft evaluate/predict."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {**asdict(self.peft_config), "peft_type": "LORA", "task_type": task_type(self.model),
                  "base_model_name_or_path": self.base_model_name_or_path, "fan_in_fan_out": False,
                  "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
                  "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
                  "revision": None}
        save_safetensors(self.adapter_state(), directory / ADAPTER_WEIGHTS)
        write_json_atomic(config, directory / ADAPTER_CONFIG)
        self.model.config.architectures = [type(self.model).__name__]
        self.model.config.save_pretrained(directory)

    def load_saved(self, directory):
        """Restore the adapters and saved modules that save_pretrained wrote."""
        path = pathlib.Path(directory) / ADAPTER_WEIGHTS
        self.load_adapter_state(load_safetensors(path), path)

    def load_adapter_state(self, state, source):
        """Copy peft-named arrays into the adapters and saved modules (shapes checked)."""
        params = self.adapter_parameters()
        given = {key.removeprefix(PEFT_PREFIX): value for key, value in state.items()}
        missing = sorted(set(params) - set(given))
        if missing:
            raise ModelFileError(f"{source}: adapter weights {', '.join(missing[:4])} are missing; the adapter does not "
                             "fit this model (another rank, target modules or base)")
        for name, param in params.items():
            value = given[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ModelFileError(f"{source}: {PEFT_PREFIX}{name} has shape {tuple(value.shape)}, the model's is "
                                 f"{tuple(param.shape)}")
            param.data = param.device.put(value).astype(param.dtype, copy=True)


def task_type(model):
    """peft's task_type for a task model (None for multiple choice, which peft has no name for)."""
    name = type(model).__name__
    return getattr(model, "peft_task_type", None) or next(
        (kind for suffix, kind in TASK_TYPES.items() if name.endswith(suffix)), None)


def _short_names(paths):
    """Distinct last components of module paths, in order ("query", "key", ...)."""
    return list(dict.fromkeys(path.rsplit(".", 1)[-1] for path in paths))


def get_peft_model(model, config, base_model_name_or_path=None):
    """Wrap `model`'s target Linear layers with LoRA adapters and freeze the rest (but the
    saved modules, the task head)."""
    return LoraModel(model, config, base_model_name_or_path)


def is_adapter(directory):
    return (pathlib.Path(directory) / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory):
    """(LoraConfig, base_model_name_or_path) from adapter_config.json."""
    path = pathlib.Path(directory) / ADAPTER_CONFIG
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc})") from None
    if spec.get("peft_type") != "LORA":
        raise ModelFileError(f"{path}: field 'peft_type' is {spec.get('peft_type')!r}; minisft reads LoRA adapters")
    fields = {k: spec[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "modules_to_save")
              if spec.get(k) is not None}
    return LoraConfig(**fields), spec.get("base_model_name_or_path")


def load_adapter(model, directory, base_model_name_or_path=None):
    """`model` (the base task model) with the adapter in `directory` applied."""
    config, base = read_adapter_config(directory)
    wrapped = get_peft_model(model, config, base_model_name_or_path or base)
    wrapped.load_saved(directory)
    return wrapped


def prepare(model, args, base_model_name_or_path):
    """The model as TrainingArguments ask: frozen parts, then LoRA adapters (lora_r > 0)."""
    freeze(model, args.freeze_embeddings, args.freeze_layers)
    if not args.lora_r:
        return model
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=args.lora_target_modules)
    return get_peft_model(model, config, base_model_name_or_path)
