"""Checkpoints: checkpoint-STEP/ directories that resume a run exactly, written whole or not
at all, and verified before they are used.

A checkpoint holds the model (as save_pretrained writes it), optimizer.safetensors (the
optimizer's moment arrays), trainer_state.json (where the loop stands, the optimizer's
scalars and groups, the schedule, the random generator, the loss scale, the arguments) and,
written last, sha256sums.json: the size and sha256 of every other file. It is written into
.checkpoint-STEP.tmp and renamed into place, so a kill or a failed write (a full disk) leaves
every earlier checkpoint as it was; old ones are removed only once the new one is complete.
"""
import json
import os
import pathlib
import re
import shutil

from minisft.engine.backend import Device
from minisft.engine.errors import WriteError
from minisft.files.atomic import sha256_of, write_json_atomic
from minisft.files.weights import CheckpointError, load_safetensors, save_safetensors

MANIFEST = "sha256sums.json"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"


# --- directories written whole -------------------------------------------------------------
def write_staged(directory, write):
    """write(staging directory) into .NAME.tmp beside `directory`, then swap it in whole:
    an interrupted or failed write never touches the previous `directory`, and a failed one
    leaves no staging directory either (WriteError naming `directory`)."""
    directory = pathlib.Path(directory)
    staging = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        write(staging)
        _swap_in(staging, directory)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(directory, exc) from exc
        raise


def _swap_in(staging, directory):
    """Replace `directory` by `staging` with renames only."""
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.rename(directory, old)
    os.rename(staging, directory)
    shutil.rmtree(old, ignore_errors=True)


def remove_partial(output_dir):
    """Temporary directories left by an interrupted save."""
    for path in pathlib.Path(output_dir).glob(".*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def all_in(output_dir):
    """The checkpoint-STEP directories of a run, oldest first."""
    found = [p for p in pathlib.Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(output_dir):
    """The newest checkpoint-STEP directory, or None."""
    checkpoints = all_in(output_dir)
    return checkpoints[-1] if checkpoints else None


def prune(output_dir, keep):
    """Remove all but the newest `keep` checkpoints (0: keep all); called once the newest is
    complete. Returns the names of those removed."""
    removed = all_in(output_dir)[:-keep] if keep else []
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return [old.name for old in removed]


# --- integrity -------------------------------------------------------------------------------
def write_manifest(directory):
    """sha256sums.json: {file: {"size", "sha256"}} of every file in `directory`."""
    directory = pathlib.Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    write_json_atomic({p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)} for p in files},
                      directory / MANIFEST)


def verify(directory):
    """Check every file of a checkpoint against its sha256sums.json; CheckpointError naming
    the first file that is missing, of another size or another sha256."""
    directory = pathlib.Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {MANIFEST}: it is not a complete minisft checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{directory / MANIFEST}: not valid JSON; the checkpoint is damaged") from None
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{path}: {size} bytes, but {expected['size']} were written; the file is damaged")
        if sha256_of(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: its sha256 differs from the one written; the file is damaged")


def newest_verified(output_dir, log):
    """The newest checkpoint of `output_dir` that verifies, saying which newer ones did not
    and why; CheckpointError when none does."""
    failures = []
    for checkpoint in reversed(all_in(output_dir)):
        try:
            verify(checkpoint)
        except CheckpointError as exc:
            failures.append(str(exc))
            continue
        if failures:
            log(f"{'; '.join(failures)}: resuming from {checkpoint.name} instead, the newest that verifies")
        return checkpoint
    if not failures:
        raise CheckpointError(f"--resume: {output_dir} has no checkpoint-STEP directory to resume from")
    raise CheckpointError(f"no checkpoint of {output_dir} verifies: {'; '.join(failures)}")


# --- contents --------------------------------------------------------------------------------
def save(directory, model, optimizer, state):
    """Write a checkpoint: `state` (JSON: where training stands) beside the model and the
    optimizer, then its manifest; atomically, into checkpoint directory `directory`."""
    def write(staging):
        model.save_pretrained(staging)
        optimizer_state = optimizer.state_dict()
        arrays = {f"{i}.{name}": Device("cpu").put(value) for i, entry in optimizer_state["state"].items()
                  for name, value in entry.items() if hasattr(value, "shape")}
        save_safetensors(arrays, staging / OPTIMIZER)
        scalars = {str(i): {name: value for name, value in entry.items() if not hasattr(value, "shape")}
                   for i, entry in optimizer_state["state"].items()}
        write_json_atomic({**state, "optimizer": {"state": scalars, "param_groups": optimizer_state["param_groups"]}},
                          staging / STATE)
        write_manifest(staging)

    write_staged(directory, write)


def load(directory, model, optimizer):
    """Verify a checkpoint, load its model and optimizer; returns its saved state (JSON)."""
    directory = pathlib.Path(directory)
    if not (directory / STATE).is_file():
        raise CheckpointError(f"{directory} is not a checkpoint (no {STATE})")
    verify(directory)
    saved = json.loads((directory / STATE).read_text(encoding="utf-8"))
    try:
        model.load_saved(directory)
    except KeyError as exc:  # nn.Module.load_state_dict's "missing or unexpected" report
        raise CheckpointError(f"{directory}: its weights do not fit this model ({exc.args[0]}); resume with the "
                              "model, task and LoRA options of the run that wrote it") from None
    state = {int(i): dict(scalars) for i, scalars in saved["optimizer"]["state"].items()}
    for key, value in load_safetensors(directory / OPTIMIZER).items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    for group in saved["optimizer"]["param_groups"]:
        group["betas"] = tuple(group["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": saved["optimizer"]["param_groups"]})
    except ValueError as exc:
        raise CheckpointError(f"{directory / STATE}: {exc}; resume with the options of the run that wrote it") from None
    return saved
