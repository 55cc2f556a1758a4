"""An exported file run by onnxruntime behind the call of a minisft model, so that predict and
evaluate use it as they use a model directory: model(input_ids, attention_mask=...,
token_type_ids=...).logits."""
import json
import pathlib
from dataclasses import dataclass

import numpy

from minisft.engine.errors import MissingExtra, MissingFile
from minisft.engine.tensor import Tensor
from minisft.export.exporter import SETTINGS


@dataclass
class ExportedOutput:
    logits: Tensor  # as the model's: (B, num_labels), (B, L, num_labels), (B, L, 2) start/end, (B, H), ...


def settings_of(path):
    """labels.json beside the exported file."""
    beside = pathlib.Path(path).parent / SETTINGS
    try:
        return json.loads(beside.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFile(f"{beside} does not exist: an exported model needs the labels.json that `minisft export` "
                          "writes beside it") from None


class ExportedModel:
    """The ONNX file at `path` on onnxruntime's CPU provider (threads: its intra-op threads, default all cores)."""

    def __init__(self, path, threads=None):
        try:
            import onnxruntime
        except ImportError:
            raise MissingExtra("running an .onnx file needs onnxruntime: pip install -e '.[export]'") from None
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.rank = len(self.session.get_inputs()[0].shape)  # 2: (batch, sequence); 3: multiple choice's

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def to(self, device):
        return self

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        arrays = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        arrays = {k: numpy.asarray(v.numpy() if isinstance(v, Tensor) else v, dtype=numpy.int64)
                  for k, v in arrays.items() if v is not None}
        if "attention_mask" not in arrays:
            arrays["attention_mask"] = numpy.ones_like(arrays["input_ids"])
        if "token_type_ids" not in arrays:
            arrays["token_type_ids"] = numpy.zeros_like(arrays["input_ids"])
        if arrays["input_ids"].ndim > self.rank:  # embeddings' rows of (anchor, positive, ...): each column a batch
            columns = [self._run({k: v[:, c] for k, v in arrays.items()}) for c in range(arrays["input_ids"].shape[1])]
            return ExportedOutput(Tensor(numpy.stack(columns, axis=1)))
        return ExportedOutput(Tensor(self._run(arrays)))

    def _run(self, arrays):
        outputs = self.session.run(None, {name: arrays[name] for name in self.inputs})
        return numpy.stack(outputs, axis=-1) if len(outputs) == 2 else outputs[0]  # start, end -> (B, L, 2)
