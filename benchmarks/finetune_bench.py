"""The README's main job, side by side: fine-tune all-MiniLM-L6-v2 on rotten-tomatoes (the
fetched 80/10/10 split) with one recipe, seed and split in both libraries, and report test
accuracy and wall-clock time. Recipe: lr 5e-5, 1 epoch, batch 32, max length 128, linear
decay without warmup, no weight decay, clipping at 1.0, seed 42, dynamic padding.

minisft runs exactly the README's command (train, then evaluate the test split; batches
grouped by length, as `minisft train` does by default). The reference is the usual
transformers loop (batches padded by DataCollatorWithPadding), twice: with transformers'
length-grouped sampler (`group_by_length=True`'s LengthGroupedSampler), minisft's terms and
the fair comparison, and with plainly shuffled batches, the loop most scripts write. With
the mpi extra, minisft also runs the command under `mpiexec -n 2` (data-parallel, the same
global batch), beside its one-process run.
"""
import csv
import json
import subprocess
import sys
import tempfile
import time

from benchmarks.common import Figure
from benchmarks.distributed_bench import mpiexec

RECIPE = {"learning_rate": 5e-5, "epochs": 1, "batch_size": 32, "max_length": 128, "seed": 42}


def _rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return [(row["text"], row["label"]) for row in csv.DictReader(f)]


def run_minisft(env, quick, processes=1):
    with tempfile.TemporaryDirectory() as tmp:
        launcher = [mpiexec(), "-n", str(processes)] if processes > 1 else []
        command = [*launcher, sys.executable, "-m", "minisft", "train", "--model", str(env.model_dir),
                   "--train", str(env.data("rotten-tomatoes") / "train.csv"),
                   "--test", str(env.data("rotten-tomatoes") / "test.csv"),
                   "--output", f"{tmp}/out", "--learning-rate", str(RECIPE["learning_rate"]),
                   "--batch-size", str(RECIPE["batch_size"]), "--max-length", str(RECIPE["max_length"]),
                   "--seed", str(RECIPE["seed"])]
        command += ["--max-steps", "5"] if quick else ["--epochs", str(RECIPE["epochs"])]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        elapsed = time.perf_counter() - start
    return json.loads(result.stdout)["test_accuracy"], elapsed


def run_reference(env, quick, group_by_length=False):
    """(test accuracy, seconds) of the transformers loop; group_by_length: batches from
    transformers' LengthGroupedSampler (Trainer's group_by_length=True), else shuffled."""
    import torch
    import transformers
    from transformers.trainer_pt_utils import LengthGroupedSampler

    torch.manual_seed(RECIPE["seed"])
    start = time.perf_counter()
    directory = env.data("rotten-tomatoes")
    train, test = _rows(directory / "train.csv"), _rows(directory / "test.csv")
    names = sorted({label for _, label in train})
    tokenizer = transformers.BertTokenizer.from_pretrained(env.model_dir)
    model = transformers.BertForSequenceClassification.from_pretrained(env.model_dir, num_labels=len(names))
    collator = transformers.DataCollatorWithPadding(tokenizer)

    def features(rows):
        encoded = tokenizer([t for t, _ in rows], truncation=True, max_length=RECIPE["max_length"])
        return [{"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": names.index(label)}
                for ids, types, mask, (_, label) in zip(encoded["input_ids"], encoded["token_type_ids"],
                                                        encoded["attention_mask"], rows)]

    train_features, test_features = features(train), features(test)
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    order = ({"sampler": LengthGroupedSampler(RECIPE["batch_size"], lengths=[len(f["input_ids"]) for f in train_features],
                                              generator=generator)}
             if group_by_length else {"shuffle": True, "generator": generator})
    loader = torch.utils.data.DataLoader(train_features, batch_size=RECIPE["batch_size"], collate_fn=collator, **order)
    steps = 5 if quick else len(loader) * RECIPE["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["learning_rate"], weight_decay=0.0)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, 0, steps)
    model.train()
    done = 0
    for _ in range(RECIPE["epochs"]):
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            done += 1
            if done >= steps:
                break
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_features), 64):
            batch = collator([{k: v for k, v in f.items() if k != "labels"} for f in test_features[i:i + 64]])
            predictions = model(**batch).logits.argmax(-1).tolist()
            correct += sum(p == f["labels"] for p, f in zip(predictions, test_features[i:i + 64]))
    return correct / len(test_features), time.perf_counter() - start


def run(env, quick):
    accuracy, seconds = run_minisft(env, quick)
    note = "1 run each; " + ("--quick: 5 steps only" if quick else "lr 5e-5, 1 epoch, batch 32, seed 42")
    figures = []
    for grouped, terms in ((True, "reference: length-grouped batches too (group_by_length), the fair ratio"),
                           (False, "reference: shuffled batches (minisft's are length-grouped)")):
        reference = run_reference(env, quick, group_by_length=grouped) if env.reference else None
        kind = "length-grouped" if grouped else "shuffled"
        figures += [Figure(f"README job, reference {kind}: rotten-tomatoes test accuracy", "accuracy", [accuracy],
                           [reference[0]] if reference else None, lower_is_better=False, note=note),
                    Figure(f"README job, reference {kind}: wall-clock time (load, train, evaluate test)", "s",
                           [seconds], [reference[1]] if reference else None, note=terms)]
    if mpiexec():
        accuracy_2, seconds_2 = run_minisft(env, quick, processes=2)
        note = "mpiexec -n 2, 1 thread each; reference column: minisft's one process"
        figures += [Figure("README job on 2 processes: test accuracy", "accuracy", [accuracy_2], [accuracy],
                           lower_is_better=False, note=note),
                    Figure("README job on 2 processes: wall-clock time", "s", [seconds_2], [seconds], note=note)]
    return figures
