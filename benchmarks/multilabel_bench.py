"""Multi-label classification, side by side: which entity types a WNUT-16 sentence holds (its
annotations' types), for the sentences that hold any: all-MiniLM-L6-v2 fine-tuned on those of
the training split (755 sentences, 10 types), scored on those of the dev and test splits
together (163 sentences) by micro and macro F1 at threshold 0.5 and subset accuracy. Recipe:
lr 2e-4, 10 epochs, batch 16, max length 128, seed 42 (BCE over rare classes learns slowly:
after 5 epochs at batch 32 every class but person is still never predicted).

minisft runs its command line (`minisft train --task multi-label-classification`); the
reference is transformers' BertForSequenceClassification(problem_type=
"multi_label_classification") in a plain torch loop with the same recipe; both are scored by
minisft's metrics. On 755 sentences one seed decides a lot (micro F1 0.43 at seed 42 and 0.56 at
seed 43, minisft alike), so each side runs at SEEDS and the table gives their median (min-max)
and their mean.
"""
import csv
import tempfile

import numpy as np

from benchmarks.common import Figure, minisft_train, recipe_arguments, torch_fine_tune

RECIPE = {"learning_rate": 2e-4, "epochs": 10, "batch_size": 16, "max_length": 128, "seed": 42}
QUICK = {"epochs": 1}
SEEDS = (42, 43, 44)


def entity_types(path):
    """(sentence, sorted entity types it holds) for each sentence of a CoNLL file that holds any."""
    from minisft.tasks.data import read_conll

    rows = [(" ".join(e.text), sorted({tag[2:] for tag in e.label if tag != "O"})) for e in read_conll(path)]
    return [(text, types) for text, types in rows if types]


def _write(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "labels"])
        writer.writerows((text, ";".join(types)) for text, types in rows)
    return path


def run_reference(env, recipe, train, test, names):
    import torch
    import transformers

    torch.manual_seed(recipe["seed"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(env.model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        env.model_dir, num_labels=len(names), problem_type="multi_label_classification",
        id2label=dict(enumerate(names)))
    index = {name: i for i, name in enumerate(names)}

    def multi_hot(rows):
        target = torch.zeros(len(rows), len(names))
        for i, (_, types) in enumerate(rows):
            target[i, [index[t] for t in types]] = 1
        return target

    def encode(rows):
        return tokenizer([text for text, _ in rows], padding=True, truncation=True, max_length=recipe["max_length"],
                         return_tensors="pt")

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe["seed"])).tolist()
    batches = [[train[i] for i in order[j:j + recipe["batch_size"]]] for j in range(0, len(order), recipe["batch_size"])]
    seconds = torch_fine_tune(model, [(encode(b), multi_hot(b)) for b in batches],
                              lambda m, batch: m(**batch[0], labels=batch[1]).loss,
                              recipe["learning_rate"], recipe["epochs"], recipe["seed"])
    with torch.no_grad():
        logits = np.concatenate([model(**encode(test[i:i + 64])).logits.numpy() for i in range(0, len(test), 64)])
    from minisft import tasks

    return tasks.get("multi-label-classification").compute_metrics(logits, multi_hot(test).numpy(), names), seconds


def run(env, quick):
    recipe = {**RECIPE, **(QUICK if quick else {})}
    wnut = env.data("wnut16")
    train = entity_types(wnut / "train.conll")
    test = entity_types(wnut / "dev.conll") + entity_types(wnut / "test.conll")
    names = sorted({t for _, types in train for t in types})
    ours, theirs = [], []
    for seed in SEEDS[:1] if quick else SEEDS:
        seeded = {**recipe, "seed": seed}
        with tempfile.TemporaryDirectory() as tmp:
            final, seconds = minisft_train([
                "--model", env.model_dir, "--task", "multi-label-classification", "--train",
                _write(f"{tmp}/train.csv", train), "--eval", _write(f"{tmp}/test.csv", test), "--output", f"{tmp}/out",
                *recipe_arguments(seeded)])
        ours.append(({k[len("eval_"):]: v for k, v in final.items()}, seconds))
        if env.reference:
            theirs.append(run_reference(env, seeded, train, test, names))
    seeds = ", ".join(str(s) for s in (SEEDS[:1] if quick else SEEDS))
    note = (f"WNUT-16 entity types of the sentences with any ({len(names)} types): {len(train)} train, {len(test)} dev+test "
            f"sentences; lr {recipe['learning_rate']:g}, {recipe['epochs']} epochs, batch {recipe['batch_size']}, seeds {seeds}")

    def values(runs, metric):
        return [scores[metric] for scores, _ in runs] or None

    figures = []
    for metric in ("micro_f1", "macro_f1", "subset_accuracy"):
        figures.append(Figure(f"WNUT-16 entity types, multi-label {metric}", "fraction", values(ours, metric),
                              values(theirs, metric), lower_is_better=False, note=note + "; median (min-max) over seeds"))
        figures.append(Figure(f"WNUT-16 entity types, multi-label {metric}, mean over seeds", "fraction",
                              [float(np.mean(values(ours, metric)))],
                              [float(np.mean(values(theirs, metric)))] if theirs else None, lower_is_better=False,
                              note=f"seeds {seeds}"))
    figures.append(Figure("multi-label fine-tuning wall-clock time", "s", [seconds for _, seconds in ours],
                          [seconds for _, seconds in theirs] or None,
                          note="minisft: its command (load, train, evaluate); reference: the training loop; per seed"))
    return figures
