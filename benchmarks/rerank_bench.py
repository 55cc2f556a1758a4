"""Reranking SQuAD, side by side: for each question, the 10 paragraphs that the pretrained
all-MiniLM-L6-v2 bi-encoder ranks first among its split's paragraphs, kept where they hold its
own paragraph. A cross-encoder started from all-MiniLM-L6-v2 is trained on 1,000 training
questions (the gold paragraph labelled 1, the bi-encoder's 3 best others 0) and reorders the
candidates of 300 held-out dev questions: MRR@10 and NDCG@10, against the bi-encoder's own
order. Recipe: lr 5e-5, 1 epoch, batch 32, max length 256, seed 42.

minisft runs its command line (`minisft train --task reranking`); the reference is
sentence-transformers' CrossEncoder with its BinaryCrossEntropyLoss in a plain torch loop with
the same recipe, scored by CrossEncoder.predict; both are scored by minisft's metrics.
"""
import csv
import tempfile

import numpy as np

from benchmarks.common import Figure, minisft_train, recipe_arguments, torch_fine_tune

RECIPE = {"learning_rate": 5e-5, "epochs": 1, "batch_size": 32, "max_length": 256, "seed": 42,
          "train_questions": 1000, "eval_questions": 300, "candidates": 10, "negatives": 3}
QUICK = {"train_questions": 64, "eval_questions": 16}


def candidates(env, path, count, recipe):
    """[(question, [10 candidate paragraphs, best first], the gold's place)] for the questions
    of a subset whose paragraph the bi-encoder puts among its first 10."""
    from minisft import tasks
    from minisft.cli.workflows import _embedder

    examples = tasks.get("question-answering").subset(tasks.get("embedding").read(path), count, recipe["seed"])
    paragraphs = list(dict.fromkeys(e.text_pair for e in examples))
    embed = _embedder(str(env.model_dir), 64, "cpu", recipe["max_length"])
    scores = embed([e.text for e in examples]) @ embed(paragraphs).T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :recipe["candidates"]]
    kept = []
    for example, row in zip(examples, top):
        ranked = [paragraphs[i] for i in row]
        if example.text_pair in ranked:
            kept.append((example.text, ranked, ranked.index(example.text_pair)))
    return kept


def rows(questions, negatives=None):
    """(query, passage, label) rows: every candidate, or the gold and the first `negatives` others."""
    out = []
    for question, ranked, gold in questions:
        if negatives:
            others = [p for i, p in enumerate(ranked) if i != gold][:negatives]
            out += [(question, ranked[gold], 1)] + [(question, p, 0) for p in others]
        else:
            out += [(question, p, int(i == gold)) for i, p in enumerate(ranked)]
    return out


def _write(path, table):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "passage", "label"])
        writer.writerows(table)
    return path


def _metrics(table, scores):
    from minisft import tasks

    features = [{"query": q, "label": np.array([y], np.float32)} for q, _, y in table]
    return tasks.get("reranking").evaluate(features, np.asarray(scores).reshape(-1, 1), [])


def run_reference(env, recipe, train, test):
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder, losses

    torch.manual_seed(recipe["seed"])
    model = CrossEncoder(str(env.model_dir), num_labels=1, max_length=recipe["max_length"], device="cpu")
    loss_fn = losses.BinaryCrossEntropyLoss(model)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe["seed"])).tolist()
    batches = [[train[i] for i in order[j:j + recipe["batch_size"]]] for j in range(0, len(order), recipe["batch_size"])]
    seconds = torch_fine_tune(model, batches, lambda m, b: loss_fn([[q for q, _, _ in b], [p for _, p, _ in b]],
                                                                   torch.tensor([float(y) for _, _, y in b])),
                              recipe["learning_rate"], recipe["epochs"], recipe["seed"])
    scores = model.predict([(q, p) for q, p, _ in test], batch_size=64)
    return _metrics(test, scores), seconds


def run(env, quick):
    recipe = {**RECIPE, **(QUICK if quick else {})}
    squad = env.data("squad")
    train = rows(candidates(env, squad / "train.json", recipe["train_questions"], recipe), recipe["negatives"])
    dev_questions = candidates(env, squad / "dev.json", recipe["eval_questions"], recipe)
    test = rows(dev_questions)
    # the bi-encoder's own order: its first candidate scores highest
    bi_encoder = _metrics(test, [-i for _, ranked, _ in dev_questions for i in range(len(ranked))])
    with tempfile.TemporaryDirectory() as tmp:
        final, seconds = minisft_train([
            "--model", env.model_dir, "--task", "reranking", "--train", _write(f"{tmp}/train.csv", train),
            "--eval", _write(f"{tmp}/dev.csv", test), "--output", f"{tmp}/out", *recipe_arguments(recipe)])
    ours = {k[len("eval_"):]: v for k, v in final.items()}
    theirs, reference_seconds = run_reference(env, recipe, train, test) if env.reference else (None, None)
    note = (f"{len(train)} training rows ({recipe['train_questions']} questions' gold and 3 bi-encoder negatives); "
            f"{len(dev_questions)} dev questions x 10 bi-encoder candidates; lr {recipe['learning_rate']:g}, 1 epoch, "
            "batch 32, seed 42")
    figures = []
    for metric in ("mrr@10", "ndcg@10"):
        figures.append(Figure(f"SQuAD reranking {metric}, cross-encoder", "fraction", [ours[metric]],
                              [theirs[metric]] if theirs else None, lower_is_better=False, note=note))
        figures.append(Figure(f"SQuAD reranking {metric}, minisft's cross-encoder against the bi-encoder alone",
                              "fraction", [ours[metric]], [bi_encoder[metric]], lower_is_better=False,
                              note="reference column: the pretrained bi-encoder's own order of the same candidates"))
    figures.append(Figure("reranker fine-tuning wall-clock time", "s", [seconds], [reference_seconds] if theirs else None,
                          note="minisft: its command (load, train, evaluate); reference: the training loop"))
    return figures
