"""Every Python snippet in docs/internals.md runs, and every function it points to exists."""
import importlib
import re

import pytest

from conftest import ROOT

DOCUMENT = ROOT / "docs" / "internals.md"


def snippets():
    return re.findall(r"```python\n(.*?)```", DOCUMENT.read_text(encoding="utf-8"), re.S)


def test_the_walk_has_eight_stops_each_with_a_snippet():
    text = DOCUMENT.read_text(encoding="utf-8")
    stops = re.findall(r"^## (\d)\. ", text, re.M)
    assert stops == [str(i) for i in range(1, 9)]
    assert len(snippets()) >= 8


@pytest.mark.pretrained  # the tokenizer stop reads weights/all-MiniLM-L6-v2
@pytest.mark.parametrize("index", range(len(snippets())))
def test_every_snippet_runs(index, minilm_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(compile(snippets()[index], f"docs/internals.md snippet {index + 1}", "exec"), {})


def test_every_code_reference_names_a_function_that_exists():
    """`path/to/module.py`, `name` pairs: the module has that attribute (Class.method too)."""
    text = DOCUMENT.read_text(encoding="utf-8")
    pairs = re.findall(r"`(minisft/[\w/]+)\.py`,\s*((?:`[\w.]+`(?:,\s*|\s+and\s+|\s*\(|\)\s*|\s+)?)+)", text)
    assert len(pairs) >= 10
    for path, names in pairs:
        module = importlib.import_module(path.replace("/", "."))
        for name in re.findall(r"`([\w.]+)`", names):
            target = module
            for part in name.split("."):
                assert hasattr(target, part), f"{path}.py has no {name}"
                target = getattr(target, part)


def test_the_walk_names_exactly_the_nodes_of_the_plain_model_s_step():
    """The "Nodes" lines of the walk, together, are the Functions in the graph of one
    training step of the plain BertForSequenceClassification on the reference kernels."""
    import numpy as np

    import minisft
    from minisft.engine.tensor import _topological_order
    from minisft.models.bert import BertForSequenceClassification
    from conftest import FIXTURES

    named = set()
    for line in re.findall(r"^- Nodes: (.*(?:\n  .*)*)", DOCUMENT.read_text(encoding="utf-8"), re.M):
        named.update(re.findall(r"`(\w+)`", line))
    before = minisft.get_kernels()
    minisft.set_kernels("reference")
    try:
        minisft.manual_seed(0)
        model = BertForSequenceClassification.from_pretrained(FIXTURES / "tiny-bert", num_labels=2).train()
        ids = np.random.default_rng(0).integers(5, 60, (2, 7))
        mask = np.ones_like(ids)
        mask[1, 5:] = 0
        loss = model(ids, attention_mask=mask, labels=np.array([0, 1])).loss
    finally:
        minisft.set_kernels(before)
    assert {type(node).__name__ for node in _topological_order(loss._ctx)} == named
