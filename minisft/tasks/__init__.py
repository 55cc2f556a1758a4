"""The task registry: one record per fine-tuning task, holding everything that differs
between tasks: how its examples are read, checked and encoded, which head it builds, its
metrics and default metric, and how a prediction is printed.

Adding a task is one module here (and its head under models/), registered in TASKS; the
data readers, the trainer, the workflows and the command line ask the registry.
"""
import pathlib

from minisft.tasks.base import Task
from minisft.tasks.classification import Classification, PairClassification, Regression
from minisft.tasks.data import DataError
from minisft.tasks.embedding import Embedding, embedding_record
from minisft.tasks.multi_label import MultiLabelClassification
from minisft.tasks.multiple_choice import MultipleChoice
from minisft.tasks.question_answering import QuestionAnswering
from minisft.tasks.reranking import Reranking
from minisft.tasks.token_classification import TokenClassification

__all__ = ["Task", "TASKS", "DEFAULT", "for_file", "get", "embedding_record"]

TASKS = {task.name: task for task in (Classification(), PairClassification(), MultiLabelClassification(), Regression(),
                                      TokenClassification(), QuestionAnswering(), MultipleChoice(), Embedding(), Reranking())}
DEFAULT = "classification"  # for data whose file format names no task


def for_file(path):
    """The task a data file's format implies (a .conll file: token classification), else the
    default one."""
    suffix = pathlib.Path(path).suffix.lower()
    return next((task for task in TASKS.values() if suffix in task.file_suffixes), TASKS[DEFAULT])


def get(name):
    """The registered task called `name`."""
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
