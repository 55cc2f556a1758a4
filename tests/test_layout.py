"""The package reads bottom-up: each module imports only from those above it in the
README's "What is here" list (no import cycles), and importing minisft changes no
process-wide setting."""
import ast
import json
import os
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "minisft"


def readme_order():
    """The README's list of rooms, top first: 'backend', 'runtime', ..., 'models', ..."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index("## What is here"):text.index("## How correctness is checked")]
    rooms = [line.split()[0] for line in block.splitlines() if line.startswith("    minisft/")]
    rooms = [room[len("minisft/"):].rstrip("/").removesuffix(".py") for room in rooms]
    return rooms + ["cli"]  # named on the workflows line: it parses arguments and calls them


def room_of(module, rooms):
    """'minisft.kernels.fast' -> 'kernels'; 'minisft.ops' -> 'ops'; 'minisft.models.auto' ->
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


def test_every_module_imports_only_from_rooms_above_it():
    order = readme_order()
    rank = {room: i for i, room in enumerate(order)}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.name in ("__init__.py", "__main__.py") and len(relative.parts) == 1:
            continue
        own = room_of("minisft." + ".".join(relative.with_suffix("").parts), rank)
        assert own in rank, f"minisft/{relative} is not in the README's list of modules"
        for module in minisft_imports(path):
            room = room_of(module, rank)
            assert room == own or rank[room] < rank[own], \
                f"minisft/{relative} imports {module}, which is not above it in the README's list"


def test_importing_minisft_changes_no_environment_variable():
    code = ("import json, os; before = dict(os.environ); import minisft, minisft.functional, "
            "minisft.trainer; print(json.dumps([before == dict(os.environ), os.umask(0o22)]))")
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
    and a registry line in models/auto.py (and in peft.py, LoRA's default targets by
    model_type, as peft keeps them). Its own modules: models/NAME.py, and BERT's config.py,
    heads.py (the heads' shared losses, which read config.json's problem_type: "regression",
    ...) and tokenizer.py (WordPiece, which DistilBERT and ELECTRA share)."""
    from minisft import functional, tasks
    from minisft.models import auto

    task_names = {name for name in tasks.TASKS if not hasattr(functional, name)}  # F.embedding is an op's name
    family_classes = {getattr(f, role).__name__ for f in auto.FAMILIES.values()
                      for role in ("config", "base", "sequence_classification", "token_classification")}
    own = {"models/auto.py", "peft.py", "models/config.py", "models/heads.py", "tokenizer.py",
           *(f"models/{name}.py" for name in auto.FAMILIES)}
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
