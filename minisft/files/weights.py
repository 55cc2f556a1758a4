"""Weight files: read safetensors (single or sharded) and torch's pytorch_model.bin without
torch; write safetensors; map key layouts.

Reading safetensors uses the `safetensors` package's numpy API; bfloat16 tensors (which
NumPy cannot represent) are read from the raw bytes and widened to float32 by bit
manipulation. pytorch_model.bin (torch's zip format, or its legacy one from before torch 1.6) is read by a
restricted unpickler that rebuilds tensors from the file's storages and refuses every other
global, so a checkpoint cannot run code. Writing goes to a temporary file that is renamed into place, so an
interrupted save never leaves a half-written checkpoint.
"""
import collections
import json
import os
import pathlib
import pickle
import re
import struct
import zipfile

import numpy
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from minisft.engine.errors import MissingFile, ModelFileError
from minisft.files.atomic import write_atomic

MAX_HEADER_BYTES = 100 * 1024 * 1024
_BUFFERS = ("position_ids",)  # registered buffers some checkpoints carry; never parameters


class CheckpointError(ModelFileError):
    """A checkpoint file that cannot be read, or does not fit the model."""


def _read_header(path):
    """(header, offset where tensor data starts) of a safetensors file, the header being
    {name: {"dtype", "shape", "data_offsets"}}, checked against the file's size."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {len(prefix)} bytes); "
                                      "fetch or save it again")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length {length} is implausible; the file is "
                                      "corrupted or not safetensors: fetch or save it again")
            header = json.loads(f.read(length))
            data_size = os.fstat(f.fileno()).st_size - 8 - length
    except FileNotFoundError:
        raise MissingFile(f"{path} does not exist: a checkpoint directory needs "
                                "model.safetensors (run `minisft fetch NAME` or save_pretrained)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: the header is not valid JSON; the file is corrupted: "
                              "fetch or save it again") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if end > data_size:
        raise CheckpointError(f"{path}: truncated: the header describes {end} bytes of tensor data "
                              f"but the file holds {data_size}; fetch or save it again")
    return header, 8 + length


def _bfloat16_to_float32(raw):
    """bfloat16 is the top half of a float32: shift its bits into place."""
    return (numpy.frombuffer(raw, dtype="<u2").astype(numpy.uint32) << 16).view(numpy.float32)


def load_safetensors(path):
    """{name: numpy array} from a safetensors file; float16 stays float16, bfloat16 -> float32."""
    path = pathlib.Path(path)
    header, data_start = _read_header(path)
    tensors = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for name, info in header.items():
                if info["dtype"] == "BF16":
                    continue
                tensors[name] = f.get_tensor(name)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot read tensors ({exc}); fetch or save it again") from None
    bf16 = {name: info for name, info in header.items() if info["dtype"] == "BF16"}
    if bf16:
        with open(path, "rb") as f:
            for name, info in bf16.items():
                start, end = info["data_offsets"]
                f.seek(data_start + start)
                tensors[name] = _bfloat16_to_float32(f.read(end - start)).reshape(info["shape"])
    return {name: tensors[name] for name in header}


# --- torch's pytorch_model.bin, without torch -------------------------------------------------
# Both of torch.save's formats hold one pickle of the state dict whose tensors name their
# storages by persistent id; the storages' bytes are elsewhere: files data/KEY of a zip archive
# (torch >= 1.6), or, in the legacy format, raw after the pickle, each as an int64 element count
# and the elements, in the order of a list of keys pickled after the state dict.
_STORAGE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
                   "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
                   "ByteStorage": "u1", "BoolStorage": "?"}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # the first pickle of a legacy file
_LEGACY_PROTOCOL = 1001


class _Storage:
    """A storage the pickle names: its key, element type and count; `array` once read."""

    def __init__(self, key, storage_type, numel):
        self.key, self.storage_type, self.numel, self.array = key, storage_type, numel, None

    def set_bytes(self, raw, path):
        dtype = numpy.dtype(_STORAGE_DTYPES[self.storage_type])
        if len(raw) != self.numel * dtype.itemsize:
            raise CheckpointError(f"{path}: storage {self.key} holds {len(raw) // dtype.itemsize} values, not {self.numel}; "
                                  "the file is truncated or corrupted: download it again")
        self.array = numpy.frombuffer(raw, dtype=dtype)


class _View:
    """A legacy file's storage that is a slice of another (files of torch before 0.4)."""

    def __init__(self, root, offset, numel):
        self.root, self.offset, self.numel, self.storage_type = root, offset, numel, root.storage_type

    @property
    def array(self):
        return self.root.array[self.offset:self.offset + self.numel]


class _Tensor:
    """torch._utils._rebuild_tensor_v2's arguments, made an array once the storage is read."""

    def __init__(self, storage, offset, size, stride, *_):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self):
        storage = self.storage.array
        if not self.size:
            array = storage[self.offset:self.offset + 1].reshape(())
        else:
            array = numpy.lib.stride_tricks.as_strided(storage[self.offset:], shape=self.size,
                                                       strides=tuple(s * storage.itemsize for s in self.stride))
        array = numpy.array(array, order="C")  # a copy
        return _bfloat16_to_float32(array.tobytes()).reshape(array.shape) if self.storage.storage_type == \
            "BFloat16Storage" else array


class _TorchUnpickler(pickle.Unpickler):
    """Only what a state dict needs: tensors of storages, ordered dicts, storage types. Any
    other global is refused. `storages`: {key: _Storage} of the storages the tensors use
    (views aside)."""

    GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _Tensor,
               ("torch._utils", "_rebuild_parameter"): lambda data, requires_grad, hooks: data,
               ("collections", "OrderedDict"): collections.OrderedDict}

    def __init__(self, file, path):
        super().__init__(file)
        self.path, self.storages = path, {}

    def find_class(self, module, name):
        if (module, name) in self.GLOBALS:
            return self.GLOBALS[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise CheckpointError(f"{self.path}: refused to load the global {module}.{name}: a checkpoint holds "
                              "tensors only; this file may run code when unpickled. Get the weights as "
                              "safetensors, or from a source you trust")

    def persistent_load(self, pid):
        """('storage', type, key, location, numel[, view]) -> its _Storage; `view` (legacy files
        only): (view key, offset, size) of a storage inside this one."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES):
            raise CheckpointError(f"{self.path}: unknown persistent id {pid!r}; not a torch state dict")
        _, storage_type, key, _, numel, *view = pid
        root = self.storages.setdefault(key, _Storage(key, storage_type, numel))
        if not view or view[0] is None:
            return root
        _, offset, size = view[0]
        return _View(root, offset, size)


def _state_dict(state, path):
    if not isinstance(state, dict) or not all(isinstance(v, _Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return {name: tensor.array() for name, tensor in state.items()}


def _read_zip_bin(archive, path):
    pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
    if not pickles:
        raise CheckpointError(f"{path}: no data.pkl in the archive; not a torch checkpoint")
    prefix = pickles[0][:-len("data.pkl")]
    with archive.open(pickles[0]) as f:
        unpickler = _TorchUnpickler(f, path)
        state = unpickler.load()
    for storage in unpickler.storages.values():
        storage.set_bytes(archive.read(f"{prefix}data/{storage.key}"), path)
    return _state_dict(state, path)


def _read_legacy_bin(f, path):
    """torch.save's format before torch 1.6: magic number, protocol, system info, the state
    dict, its storage keys, then each storage's element count and bytes."""
    header = [_TorchUnpickler(f, path).load() for _ in range(3)]
    if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL or not header[2].get("little_endian", True):
        raise CheckpointError(f"{path}: not a torch checkpoint (magic number {header[0]!r}, protocol "
                              f"{header[1]!r}, little endian {header[2].get('little_endian')!r})")
    unpickler = _TorchUnpickler(f, path)
    state = unpickler.load()
    keys = _TorchUnpickler(f, path).load()
    if not isinstance(keys, list) or set(keys) - set(unpickler.storages):
        raise CheckpointError(f"{path}: its storage list does not match its tensors; the file is corrupted")
    for key in keys:
        storage = unpickler.storages[key]
        (numel,) = struct.unpack("<q", f.read(8).ljust(8, b"\0"))
        storage.set_bytes(f.read(max(numel, 0) * numpy.dtype(_STORAGE_DTYPES[storage.storage_type]).itemsize), path)
    return _state_dict(state, path)


def load_torch_bin(path):
    """{name: numpy array} from a pytorch_model.bin, in torch's zip format (torch >= 1.6) or
    its legacy one, read without torch; bfloat16 -> float32."""
    path = pathlib.Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return _read_zip_bin(archive, path)
        with open(path, "rb") as f:
            if f.read(2) != b"\x80\x02":
                raise CheckpointError(f"{path}: not a zip archive nor torch's legacy format: truncated or not a "
                                      "torch checkpoint; download it again")
            f.seek(0)
            return _read_legacy_bin(f, path)
    except (pickle.UnpicklingError, EOFError, KeyError, AttributeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc}); the file is truncated or "
                              "corrupted: download it again") from None


def _sharded(path, load):
    """A *.index.json's {"weight_map": {name: shard file}}: every shard loaded, merged."""
    index = json.loads(path.read_text(encoding="utf-8"))
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load(path.parent / shard))
    return state


def load_checkpoint(directory):
    """(file, {name: numpy array}) of a checkpoint directory's weights, in this order of
    preference, as transformers: model.safetensors, its sharded index, pytorch_model.bin, its
    sharded index."""
    directory = pathlib.Path(directory)
    for name, load in (("model.safetensors", load_safetensors), ("pytorch_model.bin", load_torch_bin)):
        if (directory / name).is_file():
            return directory / name, load(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():
            return index, _sharded(index, load)
    raise MissingFile(f"{directory}: no model.safetensors or pytorch_model.bin (nor a sharded index of "
                            "either): a checkpoint directory needs its weights (run `minisft fetch NAME`)")


def convert_to_safetensors(directory):
    """Write DIR/model.safetensors from DIR's other weights (pytorch_model.bin, or shards),
    atomically; bfloat16 is written as float32. Returns (source file, written file), the
    source being model.safetensors itself when there is nothing to convert."""
    directory = pathlib.Path(directory)
    source, state = load_checkpoint(directory)
    target = directory / "model.safetensors"
    if source != target:
        save_safetensors(state, target)
    return source, target


def save_safetensors(tensors, path, metadata=None):
    """Write {name: array} to `path` atomically (temporary file, then rename)."""
    arrays = {name: numpy.ascontiguousarray(array) for name, array in tensors.items()}
    write_atomic(path, lambda tmp: _save_file(arrays, tmp, metadata or {"format": "pt"}))


def _save_file(arrays, path, metadata):
    """safetensors' save_file, its OS errors (a full disk: SafetensorError '... (os error 28)')
    raised as the OSError they are."""
    try:
        save_file(arrays, path, metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc


def map_keys(state, expected, prefix=""):
    """Rename checkpoint keys to the model's layout.

    Handles old LayerNorm names (gamma/beta), registered buffers (dropped) and the base
    model prefix (`prefix`, e.g. "bert."): a base checkpoint loads into a task model and a
    task checkpoint's base loads into a base model. Returns a new dict.
    """
    expected = set(expected)
    mapped = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in _BUFFERS:
            continue
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key not in expected and prefix:
            if prefix + key in expected:
                key = prefix + key
            elif key.startswith(prefix) and key[len(prefix):] in expected:
                key = key[len(prefix):]
        mapped[key] = value
    return mapped


def load_into(model, state, source, strict=True, allowed_missing=(), ignored_unexpected=(), prefix=""):
    """Map `state` onto `model`'s parameters and copy it in; `source` names the file in errors.

    Keys starting with an entry of `allowed_missing` may be absent (a new task head), and
    keys starting with `ignored_unexpected` are dropped (heads of other tasks). Otherwise,
    when strict, any missing or unexpected key is an error listing them all. Returns
    (missing keys, left at their initialisation; unexpected keys, dropped), as transformers
    reports them.
    """
    own = dict(model.named_parameters())
    state = map_keys(state, own, prefix)
    ignored = [k for k in state if k not in own and k.startswith(tuple(ignored_unexpected))]
    state = {k: v for k, v in state.items() if k not in ignored}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                 for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    reported_missing = [k for k in missing if not k.startswith(tuple(allowed_missing))]
    problems = []
    if misshaped:
        problems.append("shape mismatch (does config.json match the weights?): " + "; ".join(misshaped))
    if strict and reported_missing:
        problems.append("missing keys: " + ", ".join(reported_missing))
    if strict and unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if problems:
        raise CheckpointError(f"{source}: cannot load into {type(model).__name__}: "
                              + " | ".join(problems))
    model.load_state_dict(state, strict=False)
    return missing, unexpected + ignored
