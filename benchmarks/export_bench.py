"""Serving the README job's model, side by side in one process: sentences per second on the
first 1,000 Rotten Tomatoes test sentences, batch 32, 2 threads each, for minisft's own forward
(as `minisft predict` runs it: the lean passes), transformers (torch eager, inference mode),
and onnxruntime on the file `minisft export` writes, float32 and int8 (`--quantize int8`);
the files' sizes; the test accuracy (all 1,281 sentences) of each, and the largest logit gap
between onnxruntime's float32 and minisft.

The model is trained first with the README's recipe (`minisft train --model all-MiniLM-L6-v2
--train rotten-tomatoes --learning-rate 5e-5 --epochs 1`, about 3 minutes on 2 cores;
--quick: 20 steps). Every side reads the same token ids, in the same batches of 32 in file
order, each padded to its longest row; tokenising is not timed.
"""
import csv
import json
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks.common import Figure, alternate, minisft_train

THREADS, BATCH, SENTENCES = 2, 32, 1000


def _batches(tokenizer, texts, max_length=128):
    from minisft.tasks.data import collate

    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_tensors=None)
    features = [{"input_ids": ids, "token_type_ids": types}
                for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"])]
    return [collate(features[start:start + BATCH], tokenizer.pad_token_id) for start in range(0, len(texts), BATCH)]


def _export(model_dir, path, *options):
    done = subprocess.run([sys.executable, "-m", "minisft", "export", "--model", model_dir, "--output", path, *options],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"minisft export failed ({done.returncode}): {done.stderr[-2000:]}")


def _sides(env, model_dir, tmp):
    """{name: batch -> logits (numpy)} for the four ways of running the model, each on 2 threads."""
    import minisft
    from minisft.engine.tensor import no_grad
    from minisft.export.runtime import ExportedModel
    from minisft.models.auto import AutoModelForSequenceClassification

    minisft.set_num_threads(THREADS)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()  # lean, as predict loads it

    def ours(batch):
        with no_grad():
            return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).logits.numpy()

    sides = {"minisft": ours}
    for name, file in (("onnxruntime float32", "model.onnx"), ("onnxruntime int8", "int8/model.onnx")):
        exported = ExportedModel(f"{tmp}/{file}", threads=THREADS)  # as `minisft predict --model FILE.onnx` runs it
        sides[name] = lambda batch, exported=exported: exported(**batch).logits.numpy()
    if env.reference:
        import torch
        import transformers

        torch.set_num_threads(THREADS)
        theirs = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager")
        theirs.eval()

        def reference(batch):
            with torch.inference_mode():
                return theirs(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
        sides["transformers (torch eager)"] = reference
    return sides


def _accuracy(run, batches, labels):
    predictions = np.concatenate([run(b).argmax(-1) for b in batches])
    return float((predictions == labels).mean())


def run(env, quick):
    import os

    from minisft.models.auto import AutoTokenizer

    data = env.data("rotten-tomatoes")
    with open(data / "test.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    texts = [r["text"] for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        recipe = ["--max-steps", "20"] if quick else ["--epochs", "1"]
        minisft_train(["--model", env.model_dir, "--train", "rotten-tomatoes", "--output", f"{tmp}/run",
                       "--learning-rate", "5e-5", *recipe])
        with open(f"{tmp}/run/config.json", encoding="utf-8") as f:
            label2id = json.load(f)["label2id"]
        labels = np.array([label2id[r["label"]] for r in rows])
        os.mkdir(f"{tmp}/int8")
        _export(f"{tmp}/run", f"{tmp}/model.onnx")
        _export(f"{tmp}/run", f"{tmp}/int8/model.onnx", "--quantize", "int8")
        tokenizer = AutoTokenizer.from_pretrained(f"{tmp}/run")
        timed = _batches(tokenizer, texts[:SENTENCES])
        everything = _batches(tokenizer, texts)
        sides = _sides(env, f"{tmp}/run", tmp)
        times = alternate({name: (lambda fn=fn: [fn(b) for b in timed]) for name, fn in sides.items()},
                          repeats=2 if quick else 5)
        rates = {name: [SENTENCES / t for t in ts] for name, ts in times.items()}
        accuracy = {name: _accuracy(fn, everything, labels) for name, fn in sides.items()}
        gap = max(float(np.abs(sides["onnxruntime float32"](b) - sides["minisft"](b)).max()) for b in everything)
        sizes = {name: os.path.getsize(f"{tmp}/{file}") / 2 ** 20 for name, file in
                 (("float32", "model.onnx"), ("int8", "int8/model.onnx"))}
    torch_side = "transformers (torch eager)"
    note = f"{SENTENCES} RT test sentences, batch {BATCH}, {THREADS} threads; reference: {torch_side}"
    figures = [Figure(f"{name}: sentences/s", "sentences/s", rates[name], rates.get(torch_side), lower_is_better=False,
                      note=note) for name in ("minisft", "onnxruntime float32", "onnxruntime int8")]
    figures += [Figure(f"file size, {name}", "MiB", [size], note="minisft export" + (" --quantize int8" * (name == "int8")))
                for name, size in sizes.items()]
    figures += [Figure(f"test accuracy, {name}", "accuracy", [accuracy[name]], [accuracy["minisft"]], lower_is_better=False,
                       note=f"all {len(texts)} test sentences; reference: minisft's own forward")
                for name in ("onnxruntime float32", "onnxruntime int8")]
    figures.append(Figure("int8 - float32 test accuracy", "points",
                          [100 * (accuracy["onnxruntime int8"] - accuracy["onnxruntime float32"])],
                          lower_is_better=False, note="acceptance: within 1 point"))
    figures.append(Figure("largest |logit| gap, onnxruntime float32 vs minisft", "logit", [gap],
                          note="every test sentence"))
    return figures
