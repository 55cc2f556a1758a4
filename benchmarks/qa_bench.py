"""Extractive QA on SQuAD v1.1, side by side: fine-tune all-MiniLM-L6-v2 on 8,000 training
questions and score exact match and F1 on 2,000 questions of the held-out dev split, with one
recipe, subset and seed in both libraries. Recipe: lr 1e-4 (the issue names 5e-5, which leaves
exact match near 24 after 250 steps), 1 epoch, batch 32, max length 256, doc stride 128, linear
decay without warmup, no weight decay, clipping at 1.0, seed 42.

minisft runs its command line (`minisft train --task question-answering`); the reference is
run_qa's method written out without the datasets library: transformers' fast tokenizer cuts
the same questions into windows, labels them, trains BertForQuestionAnswering with torch's
AdamW, and keeps the best span of the 20 best starts and ends (at most 30 tokens) over each
question's windows. Both subsets are minisft's (`--max-train-examples`, `--max-eval-examples`:
whole articles in a seeded order); both are scored by minisft.tasks.metrics.squad, which equals the
official v1.1 script (tests/test_metrics.py).
"""
import json
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import Figure

RECIPE = {"learning_rate": 1e-4, "epochs": 1, "batch_size": 32, "max_length": 256, "doc_stride": 128, "seed": 42,
          "train_examples": 8000, "eval_examples": 2000}
QUICK = {"train_examples": 64, "eval_examples": 32}


def _recipe(quick):
    return {**RECIPE, **(QUICK if quick else {})}


def run_minisft(env, recipe):
    squad = env.data("squad")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "minisft", "train", "--model", str(env.model_dir), "--task",
                   "question-answering", "--train", str(squad / "train.json"), "--eval", str(squad / "dev.json"),
                   "--output", f"{tmp}/out", "--max-train-examples", str(recipe["train_examples"]),
                   "--max-eval-examples", str(recipe["eval_examples"]), "--max-length", str(recipe["max_length"]),
                   "--doc-stride", str(recipe["doc_stride"]), "--learning-rate", str(recipe["learning_rate"]),
                   "--epochs", str(recipe["epochs"]), "--batch-size", str(recipe["batch_size"]),
                   "--seed", str(recipe["seed"])]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        elapsed = time.perf_counter() - start
    metrics = json.loads(result.stdout)
    return metrics["eval_exact_match"], metrics["eval_f1"], elapsed


def _examples(path, count, seed):
    from minisft import tasks

    task = tasks.get("question-answering")
    return task.subset(task.read(path), count, seed)


def _windows(tokenizer, examples, recipe):
    return tokenizer([e.text for e in examples], [e.text_pair for e in examples], truncation="only_second",
                     max_length=recipe["max_length"], stride=recipe["doc_stride"], return_overflowing_tokens=True,
                     return_offsets_mapping=True)


def _train_labels(encoded, examples):
    """run_qa's: the answer's first and last token in each window, else [CLS] (0) twice."""
    starts, ends = [], []
    for i, offsets in enumerate(encoded["offset_mapping"]):
        example = examples[encoded["overflow_to_sample_mapping"][i]]
        text, start_char = example.label[0]
        end_char = start_char + len(text)
        sequence = encoded.sequence_ids(i)
        first = sequence.index(1)
        last = len(sequence) - 1 - sequence[::-1].index(1)
        if offsets[first][0] > start_char or offsets[last][1] < end_char:
            starts.append(0)
            ends.append(0)
            continue
        while first < len(offsets) and offsets[first][0] <= start_char and sequence[first] == 1:
            first += 1
        while offsets[last][1] >= end_char and sequence[last] == 1:
            last -= 1
        starts.append(first - 1)
        ends.append(last + 1)
    return starts, ends


def _best_answers(encoded, examples, start_logits, end_logits, n_best=20, max_answer=30):
    """run_qa's post-processing: per question, the best-scoring span over its windows."""
    best = {}
    for i, offsets in enumerate(encoded["offset_mapping"]):
        example = examples[encoded["overflow_to_sample_mapping"][i]]
        sequence = encoded.sequence_ids(i)
        for s in np.argsort(start_logits[i])[::-1][:n_best]:
            for e in np.argsort(end_logits[i])[::-1][:n_best]:
                if s >= len(offsets) or e >= len(offsets) or sequence[s] != 1 or sequence[e] != 1:
                    continue
                if e < s or e - s + 1 > max_answer:
                    continue
                score = start_logits[i][s] + end_logits[i][e]
                if example.line not in best or score > best[example.line][0]:
                    best[example.line] = (score, example.text_pair[offsets[s][0]:offsets[e][1]])
    return {qid: text for qid, (_, text) in best.items()}


def run_reference(env, recipe):
    import torch
    import transformers

    from minisft.tasks import metrics

    squad = env.data("squad")
    torch.manual_seed(recipe["seed"])
    start = time.perf_counter()
    train = _examples(squad / "train.json", recipe["train_examples"], recipe["seed"])
    dev = _examples(squad / "dev.json", recipe["eval_examples"], recipe["seed"])
    tokenizer = transformers.BertTokenizerFast.from_pretrained(env.model_dir)
    model = transformers.BertForQuestionAnswering.from_pretrained(env.model_dir)
    encoded = _windows(tokenizer, train, recipe)
    starts, ends = _train_labels(encoded, train)
    features = [{"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "start_positions": s,
                 "end_positions": e} for ids, types, mask, s, e in zip(encoded["input_ids"], encoded["token_type_ids"],
                                                                       encoded["attention_mask"], starts, ends)]
    collator = transformers.DataCollatorWithPadding(tokenizer)
    loader = torch.utils.data.DataLoader(features, batch_size=recipe["batch_size"], shuffle=True, collate_fn=collator,
                                         generator=torch.Generator().manual_seed(recipe["seed"]))
    steps = len(loader) * recipe["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"], weight_decay=0.0)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, 0, steps)
    model.train()
    for _ in range(recipe["epochs"]):
        for batch in loader:
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    model.eval()
    encoded = _windows(tokenizer, dev, recipe)
    rows = [{"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
            for ids, types, mask in zip(encoded["input_ids"], encoded["token_type_ids"], encoded["attention_mask"])]
    start_logits, end_logits = [], []
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            out = model(**collator(rows[i:i + 64]))
            for j, row in enumerate(rows[i:i + 64]):
                start_logits.append(out.start_logits[j, :len(row["input_ids"])].numpy())
                end_logits.append(out.end_logits[j, :len(row["input_ids"])].numpy())
    predicted = _best_answers(encoded, dev, start_logits, end_logits)
    scores = metrics.squad(predicted, {e.line: [t for t, _ in e.label] for e in dev})
    return scores["exact_match"], scores["f1"], time.perf_counter() - start


def run(env, quick):
    recipe = _recipe(quick)
    env.data("squad")
    ours = run_minisft(env, recipe)
    theirs = run_reference(env, recipe) if env.reference else None
    note = (f"{recipe['train_examples']} training questions, {recipe['eval_examples']} of squad:dev; "
            f"lr {recipe['learning_rate']:g}, 1 epoch, batch 32, length 256, stride 128, seed 42")
    return [Figure("SQuAD v1.1 exact match", "%", [ours[0]], [theirs[0]] if theirs else None, lower_is_better=False,
                   note=note),
            Figure("SQuAD v1.1 F1", "%", [ours[1]], [theirs[1]] if theirs else None, lower_is_better=False,
                   note=note),
            Figure("SQuAD fine-tuning wall-clock time (train, evaluate)", "s", [ours[2]],
                   [theirs[2]] if theirs else None, note="minisft: its command, load to metrics")]
