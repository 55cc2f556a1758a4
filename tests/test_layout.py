"""The package reads bottom-up: each module imports only from the rooms above it in the
README's "What is here" list (no import cycles); few modules sit directly in minisft/, the
others being the public names of the engine's modules; and importing minisft changes no
process-wide setting."""
import ast
import json
import os
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "minisft"


def readme_order():
    """The README's list of rooms, top first: 'engine/backend', 'engine/runtime', 'kernels',
    'engine', ..., 'models', ..."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index("## What is here"):text.index("## How correctness is checked")]
    rooms = [line.split()[0] for line in block.splitlines() if line.startswith("    minisft/")]
    rooms = [room[len("minisft/"):].rstrip("/").removesuffix(".py") for room in rooms]
    return rooms


def room_of(module, rooms):
    """'minisft.kernels.fast' -> 'kernels'; 'minisft.nn' -> 'nn'; 'minisft.models.auto' ->
    'models/auto' where the README lists that module as a room of its own."""
    parts = module.split(".")[1:]
    return "/".join(parts[:2]) if "/".join(parts[:2]) in rooms else parts[0]


def minisft_imports(path):
    """The minisft modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minisft"):
            if node.module == "minisft":  # modules, not names such as __version__
                found.update(f"minisft.{alias.name}" for alias in node.names
                             if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").is_file())
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("minisft."))
    return found


PUBLIC_NAMES = {"functional": "minisft.engine.functional", "tokenizer": "minisft.tokenizers.wordpiece",
                "optim": "minisft.training.optim", "peft": "minisft.lean.peft",
                "sentence": "minisft.models.sentence", "viz": "minisft.inspect.viz"}


def test_every_module_imports_only_from_rooms_above_it():
    order = readme_order()
    rank = {room: i for i, room in enumerate(order)}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if len(relative.parts) == 1 and (relative.name in ("__init__.py", "__main__.py") or relative.stem in PUBLIC_NAMES):
            continue
        own = room_of("minisft." + ".".join(relative.with_suffix("").parts), rank)
        assert own in rank, f"minisft/{relative} is not in the README's list of modules"
        for module in minisft_imports(path):
            room = room_of(module, rank)
            assert room == own or rank[room] < rank[own], \
                f"minisft/{relative} imports {module}, which is not above it in the README's list"


def test_few_modules_sit_directly_in_the_package_and_the_public_names_are_the_modules_themselves():
    """At most 10 modules in minisft/ itself; each one besides __init__, __main__ and nn is a
    public name (one the README's examples import) that is its room's module, not a copy."""
    import importlib

    top = sorted(path.stem for path in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top
    assert set(top) - {"__init__", "__main__", "nn"} == set(PUBLIC_NAMES)
    for name, target in PUBLIC_NAMES.items():
        assert importlib.import_module(f"minisft.{name}") is importlib.import_module(target)
        assert getattr(importlib.import_module("minisft"), name) is importlib.import_module(target)


def test_no_module_is_over_500_lines_but_the_generated_tables():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "unicode_tables.py":
            lines = path.read_text(encoding="utf-8").count("\n")
            assert lines <= 500, f"minisft/{path.relative_to(PACKAGE)}: {lines} lines"


def test_importing_minisft_changes_no_environment_variable():
    code = ("import json, os; before = dict(os.environ); import minisft, minisft.functional, "
            "minisft.training.trainer; print(json.dumps([before == dict(os.environ), os.umask(0o22)]))")
    unchanged, umask = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                 check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout)
    assert unchanged
    parent = os.umask(0)
    os.umask(parent)
    assert umask == parent  # the child's umask, inherited, is untouched by the import


def _code_names(path):
    """The identifiers and the string constants (not docstrings) of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value


def test_only_the_registries_and_each_family_s_own_modules_name_a_family_or_a_task():
    """Adding a task touches its module under tasks/ (and its head); adding a family, its module under models/
    and a registry line in models/auto.py (and in lean/peft.py, LoRA's default targets by
    model_type, as peft keeps them). Its own modules: models/NAME.py, and BERT's config.py,
    heads.py (the heads' shared losses, which read config.json's problem_type: "regression",
    ...) and tokenizers/wordpiece.py (WordPiece, which DistilBERT and ELECTRA share)."""
    from minisft import functional, tasks
    from minisft.models import auto

    task_names = {name for name in tasks.TASKS if not hasattr(functional, name)}  # F.embedding is an op's name
    family_classes = {getattr(f, role).__name__ for f in auto.FAMILIES.values()
                      for role in ("config", "base", "sequence_classification", "token_classification")}
    own = {"models/auto.py", "lean/peft.py", "models/config.py", "models/heads.py", "tokenizers/wordpiece.py",
           *(f"models/{name.replace('-', '_')}.py" for name in auto.FAMILIES)}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in own or relative.startswith("tasks/"):
            continue
        for name in _code_names(path):
            assert name not in task_names and name not in auto.FAMILIES, f"minisft/{relative} names {name!r}"
            assert not any(c in name for c in family_classes), f"minisft/{relative} names {name!r}"


def test_a_data_file_s_format_implies_its_task():
    from minisft import tasks

    assert tasks.for_file("data/wnut16/train.conll").name == "token-classification"
    assert tasks.for_file("reviews.CSV").name == tasks.DEFAULT
