"""Writes that never leave half a file: write to a temporary file beside the target, then
rename it into place (a rename within one file system is atomic). Every file minisft writes
that the user owns (models, checkpoints, tokenizer files, pictures, reports) goes through here.
"""
import hashlib
import json
import os
import pathlib
import secrets

from minisft.engine.errors import WriteError


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
    write leaves the old file (or none), never half a file. A failed one (a full disk, a
    read-only directory) raises WriteError naming `path`."""
    path = pathlib.Path(path)
    tmp = None
    try:
        tmp = _temporary_beside(path)
        mode = os.stat(tmp).st_mode & 0o777  # what the OS gave a new file under this umask
        write(tmp)
        os.chmod(tmp, mode)  # writers that recreate the file (safetensors) do not keep it
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            pathlib.Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(path, exc) from exc
        raise


def append_line(path, line):
    """Append `line` and a newline to a text file whole, or not at all: a failed write
    (WriteError) cuts the file back to where it was."""
    data = (line + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise WriteError(path, exc) from exc
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as exc:
            os.ftruncate(fd, size)
            raise WriteError(path, exc) from exc
    finally:
        os.close(fd)


def move_files(source, target):
    """Move every file of directory `source` into directory `target` by renames (no copy;
    an existing file of the same name is replaced), then remove `source`."""
    source, target = pathlib.Path(source), pathlib.Path(target)
    for path in sorted(source.iterdir()):
        os.replace(path, target / path.name)
    source.rmdir()


def write_bytes_atomic(data, path):
    """Write `data` to `path` through a temporary file and a rename."""
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_bytes(data))


def write_text_atomic(text, path):
    """Write `text` to `path` through a temporary file and a rename."""
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomic(obj, path):
    """Write JSON to `path` through a temporary file and a rename."""
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def sha256_of(path):
    """A file's sha256 (hex), read in 1 MiB blocks: to check what was written or fetched."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
