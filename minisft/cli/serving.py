"""Exported files (`minisft export`) where a model directory goes: predict, evaluate and embed
run an .onnx file through onnxruntime, with the settings its labels.json keeps."""
import dataclasses

from minisft import tasks
from minisft.engine.errors import MissingFile
from minisft.models.auto import AutoTokenizer
from minisft.tasks.data import LabelVocab
from minisft.training.options import OptionError
from minisft.training.trainer import TrainingArguments


def load_exported(path):
    """(training arguments, task, model, labels, tokenizer) of an exported file, as a directory's."""
    from minisft.export.runtime import ExportedModel, settings_of

    if not path.is_file():
        raise MissingFile(f"--model {path}: no such file; give a file that `minisft export` wrote")
    saved = settings_of(path)
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    args = TrainingArguments(output_dir=str(path.parent), task=saved["task"],
                             **{k: v for k, v in saved.items()
                                if k in fields and k not in ("task", "output_dir") and v is not None})
    labels = LabelVocab([saved["id2label"][str(i)] for i in range(len(saved["id2label"]))])
    return args, tasks.get(args.task), ExportedModel(path), labels, AutoTokenizer.from_pretrained(path.parent)


def embedding_task():
    from minisft.tasks.embedding import Embedding

    return next(task for task in tasks.TASKS.values() if isinstance(task, Embedding))


def exported_embedder(path, pooling):
    """An exported embedding model (its max_seq_length from labels.json) and its tokenizer."""
    from minisft.export.runtime import settings_of

    _, task, embedder, _, tokenizer = load_exported(path)
    if task is not embedding_task():
        raise OptionError("--model", str(path), f"an exported {task.name} model, not sentence embeddings",
                          "export an embedding model (trained with --task embedding, or a checkpoint directory)")
    saved = settings_of(path)
    if pooling is not None and pooling != saved.get("pooling"):
        raise OptionError("--pooling", pooling, f"{path} pools by {saved.get('pooling')}, fixed in the file",
                          f"export again from a directory with {pooling} pooling, or leave --pooling out")
    embedder.max_seq_length = saved.get("max_length")
    return embedder, tokenizer
