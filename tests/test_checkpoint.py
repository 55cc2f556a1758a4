"""safetensors reading/writing and checkpoint key layouts."""
import json
import shutil
import struct

import numpy as np
import pytest

import minisft
from minisft.files.weights import (CheckpointError, load_into, load_safetensors, map_keys,
                                save_safetensors)
from minisft.models.bert import BertModel
from conftest import FIXTURES

TINY = FIXTURES / "tiny-bert"


def _write_raw(path, tensors):
    """A safetensors file written by hand: {name: (dtype code, shape, raw bytes)}."""
    header, blobs, offset = {}, b"", 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        blobs += raw
        offset += len(raw)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + blobs)


def test_bfloat16_and_float16_load(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()   # exact for these values' top bits
    _write_raw(tmp_path / "m.safetensors", {"a": ("BF16", (2, 2), bf16),
                                            "b": ("F16", (4,), values.astype("<f2").tobytes())})
    tensors = load_safetensors(tmp_path / "m.safetensors")
    expected = (np.frombuffer(bf16, "<u2").astype(np.uint32) << 16).view(np.float32)
    assert tensors["a"].dtype == np.float32 and tensors["a"].shape == (2, 2)
    assert (tensors["a"].ravel() == expected).all()
    assert np.abs(tensors["a"].ravel() - values).max() < 1e-2
    assert tensors["b"].dtype == np.float16


def test_save_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, path)
    assert (load_safetensors(path)["x"] == np.arange(6).reshape(2, 3)).all()
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_key_mapping_handles_prefix_gamma_beta_and_buffers():
    expected = ["bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias", "classifier.weight"]
    state = {"embeddings.LayerNorm.gamma": 1, "embeddings.LayerNorm.beta": 2,
             "embeddings.position_ids": 3}
    assert map_keys(state, expected, prefix="bert.") == {
        "bert.embeddings.LayerNorm.weight": 1, "bert.embeddings.LayerNorm.bias": 2}
    # and the other way: a task checkpoint's base loads into a base model
    assert map_keys({"bert.pooler.dense.weight": 1, "classifier.weight": 2},
                    ["pooler.dense.weight"], prefix="bert.") == {"pooler.dense.weight": 1, "classifier.weight": 2}


def test_old_layernorm_names_and_bert_prefix_load(tmp_path):
    state = load_safetensors(TINY / "model.safetensors")
    renamed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    renamed["cls.predictions.bias"] = np.zeros(64, np.float32)
    renamed["bert.embeddings.position_ids"] = np.arange(40)[None]
    model = BertModel.from_pretrained(TINY)
    fresh = BertModel(model.config)
    load_into(fresh, renamed, source="renamed", ignored_unexpected=("cls.",), prefix="bert.")
    ids = np.array([[1, 2, 3]])
    with minisft.no_grad():
        assert (fresh.eval()(ids).last_hidden_state.numpy() == model.eval()(ids).last_hidden_state.numpy()).all()


def test_load_into_reports_without_raising_when_not_strict():
    model = BertModel.from_pretrained(TINY)
    state = {k: v.copy() for k, v in model.state_dict().items()}
    state.pop("pooler.dense.weight")
    state["extra"] = np.zeros(1)
    missing, unexpected = load_into(model, state, source="s", strict=False)
    assert missing == ["pooler.dense.weight"] and unexpected == ["extra"]
    with pytest.raises(CheckpointError, match="^s: cannot load into BertModel: missing keys: pooler.dense.weight"):
        load_into(model, state, source="s")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_permissions_of_a_plain_open_and_no_temporary_is_left(tmp_path, umask):
    import os

    from minisft.files.atomic import write_text_atomic

    before = os.umask(umask)
    try:
        save_safetensors({"w": np.ones((2, 2), np.float32)}, tmp_path / "model.safetensors")
        write_text_atomic("hello\n", tmp_path / "vocab.txt")
        assert os.umask(umask) == umask  # the write did not change it
    finally:
        os.umask(before)
    for name in ("model.safetensors", "vocab.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "vocab.txt"]


# --- pytorch_model.bin without torch, sharded safetensors, which file wins -----------------
BIN = FIXTURES / "tiny-bert-bin"  # tiny-bert as torch.save wrote it (make_family_fixtures.py)
LEGACY_BIN = FIXTURES / "tiny-bert-legacy-bin"  # the same, in torch's format from before 1.6


@pytest.mark.parametrize("directory", [BIN, LEGACY_BIN], ids=["zip", "legacy"])
def test_pytorch_model_bin_reads_without_torch_as_the_safetensors_do(directory):
    from minisft.files.weights import load_torch_bin

    from_bin = load_torch_bin(directory / "pytorch_model.bin")
    from_safetensors = load_safetensors(TINY / "model.safetensors")
    assert from_bin.keys() == from_safetensors.keys()
    for name, array in from_safetensors.items():
        assert from_bin[name].dtype == array.dtype and (from_bin[name] == array).all(), name
    model = BertModel.from_pretrained(directory)
    assert all((p.numpy() == from_safetensors[n]).all() for n, p in model.named_parameters())


def test_a_legacy_bin_of_every_dtype_reads_as_torch_loads_it():
    """Strided views, a shared storage, 0-d, bfloat16 (widened to float32, as everywhere)."""
    from minisft.files.weights import load_torch_bin

    ours, torch_s = load_torch_bin(FIXTURES / "legacy_dtypes.bin"), np.load(FIXTURES / "legacy_dtypes.npz")
    assert sorted(ours) == sorted(torch_s.files)
    for name in torch_s.files:
        assert ours[name].dtype == torch_s[name].dtype and ours[name].shape == torch_s[name].shape, name
        assert (ours[name] == torch_s[name]).all() and ours[name].flags.c_contiguous, name


def test_minisft_convert_writes_safetensors_from_a_legacy_bin(tmp_path):
    from minisft.cli import main

    shutil.copytree(LEGACY_BIN, tmp_path / "model")
    assert main(["convert", str(tmp_path / "model")]) == 0
    converted = load_safetensors(tmp_path / "model" / "model.safetensors")
    assert all((converted[n] == a).all() for n, a in load_safetensors(TINY / "model.safetensors").items())


def test_safetensors_win_over_bin_and_shards_load(tmp_path):
    from minisft.files.weights import load_checkpoint
    from safetensors.numpy import save_file

    both = tmp_path / "both"
    both.mkdir()
    for name in ("config.json", "pytorch_model.bin"):
        (both / name).write_bytes((BIN / name).read_bytes())
    (both / "model.safetensors").write_bytes((TINY / "model.safetensors").read_bytes())
    assert load_checkpoint(both)[0].name == "model.safetensors"
    state = load_safetensors(TINY / "model.safetensors")
    names = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for i, part in enumerate((names[:10], names[10:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(sharded / shard))
        weight_map.update({n: shard for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    path, loaded = load_checkpoint(sharded)
    assert path.name == "model.safetensors.index.json"
    assert all((loaded[n] == state[n]).all() for n in names)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_bin_that_would_run_code_is_refused_and_runs_nothing(tmp_path, legacy):
    import os
    import pickle
    import zipfile

    from minisft.files.weights import load_torch_bin

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    path = tmp_path / "pytorch_model.bin"
    payload = pickle.dumps({"weight": Payload()}, protocol=2)
    if legacy:  # torch's legacy header (magic number, protocol, system info), then the payload
        path.write_bytes(b"".join(pickle.dumps(v, protocol=2) for v in (0x1950a86a20f9469cfc6c, 1001,
                                                                         {"little_endian": True})) + payload)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: refused to load the global (posix|os|nt)\.system"):
        load_torch_bin(path)
    assert not marker.exists()


@pytest.mark.parametrize("fixture, content, message", [
    (BIN, lambda raw: raw[:len(raw) // 2], r"not a zip archive nor torch's legacy format: truncated"),
    (BIN, lambda raw: b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19." + raw[:50], r"cannot be read .* truncated or corrupted"),
    (LEGACY_BIN, lambda raw: raw[:len(raw) // 2], r"storage \d+ holds \d+ values, not \d+; the file is truncated"),
    (LEGACY_BIN, lambda raw: raw[:300], r"cannot be read .* truncated or corrupted"),
    (LEGACY_BIN, lambda raw: raw[:12] + b"\x8a" + raw[13:], r"not a torch checkpoint \(magic number"),
], ids=["zip-half", "zip-behind-a-legacy-header", "legacy-half", "legacy-300-bytes", "legacy-magic"])
def test_truncated_and_damaged_bins_are_named(tmp_path, fixture, content, message):
    from minisft.files.weights import load_torch_bin

    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(content((fixture / "pytorch_model.bin").read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        load_torch_bin(path)


def test_a_directory_without_weights_names_both_formats(tmp_path):
    from minisft.files.weights import load_checkpoint

    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or pytorch_model.bin"):
        load_checkpoint(tmp_path)


def test_the_command_line_fine_tunes_a_checkpoint_stored_only_as_bin(tmp_path):
    from minisft import cli

    rows = [f"the film was {word},{label}" for word, label in (("good", "pos"), ("bad", "neg"))] * 4
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    assert cli.main(["train", "--model", str(BIN), "--train", str(tmp_path / "train.csv"), "--output",
                     str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4"]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_convert_writes_the_safetensors_copy_and_loading_reports_what_it_did_not_copy(tmp_path, capsys):
    import shutil

    from minisft import cli
    from minisft.models.bert import BertForSequenceClassification

    shutil.copytree(BIN, tmp_path / "ckpt")
    assert cli.main(["convert", str(tmp_path / "ckpt"), "--to", "safetensors"]) == 0
    assert "from pytorch_model.bin" in capsys.readouterr().out
    converted, original = load_safetensors(tmp_path / "ckpt" / "model.safetensors"), load_safetensors(TINY / "model.safetensors")
    assert converted.keys() == original.keys() and all((converted[k] == original[k]).all() for k in original)
    model = BertForSequenceClassification.from_pretrained(tmp_path / "ckpt", num_labels=2)
    assert model.loading_info["missing_keys"] == ["classifier.weight", "classifier.bias"]
    assert model.loading_report().endswith("newly initialised (not in the checkpoint): classifier.weight, classifier.bias")
    assert BertModel.from_pretrained(TINY).loading_report() == ""


def test_a_bert_base_model_loads_a_task_checkpoint_and_reports_the_head(tmp_path):
    from minisft.models.bert import BertForSequenceClassification

    task = BertForSequenceClassification.from_pretrained(TINY, num_labels=2)
    task.save_pretrained(tmp_path / "task")
    base = BertModel.from_pretrained(tmp_path / "task")
    own = dict(task.bert.named_parameters())
    assert all((p.numpy() == own[n].numpy()).all() for n, p in base.named_parameters())
    assert sorted(base.loading_info["unexpected_keys"]) == ["classifier.bias", "classifier.weight"]
