"""Writes that never leave half a file: write to a temporary file beside the target, then
rename it into place (a rename within one file system is atomic). Every file minisft writes
that the user owns (models, checkpoints, tokenizer files, pictures, reports) goes through here.
"""
import json
import os
import pathlib
import secrets


def _temporary_beside(path):
    """A new empty file next to `path` (same file system, so a rename is atomic), with the
    permissions a plain open() would give (0o666 less the umask, applied by the OS)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:
            continue


def write_atomic(path, write):
    """write(temporary path) next to `path`, then rename it into place: an interrupted
    write leaves the old file (or none), never half a file."""
    path = pathlib.Path(path)
    tmp = _temporary_beside(path)
    mode = os.stat(tmp).st_mode & 0o777  # what the OS gave a new file under this umask
    try:
        write(tmp)
        os.chmod(tmp, mode)  # writers that recreate the file (safetensors) do not keep it
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(data, path):
    """Write `data` to `path` through a temporary file and a rename."""
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_bytes(data))


def write_text_atomic(text, path):
    """Write `text` to `path` through a temporary file and a rename."""
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomic(obj, path):
    """Write JSON to `path` through a temporary file and a rename."""
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)
