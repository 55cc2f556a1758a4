"""Hard negatives and Matryoshka embeddings on SQuAD, side by side: 2,000 (question, its
paragraph) training pairs, each given the hardest other paragraph that the pretrained
all-MiniLM-L6-v2 finds for it (`minisft mine-hard-negatives`, one negative, the same rows for
both libraries); all-MiniLM-L6-v2 fine-tuned on those triplets with MatryoshkaLoss around
MultipleNegativesRankingLoss at 384, 256, 128 and 64 dimensions; Recall@1 and MRR@10 of 1,000
held-out dev questions against all their paragraphs at 384 and at 64 dimensions. Recipe: lr
5e-5, 1 epoch, batch 32, max length 256, seed 42.

minisft runs its command line (`minisft train --task embedding --matryoshka-dims ...`); the
reference is sentence-transformers' model, MatryoshkaLoss and MultipleNegativesRankingLoss in
a plain torch loop with the same recipe; both are scored by minisft's retrieval metrics.
"""
import csv
import tempfile

from benchmarks.common import Figure, minisft_train, recipe_arguments, torch_fine_tune

RECIPE = {"learning_rate": 5e-5, "epochs": 1, "batch_size": 32, "max_length": 256, "seed": 42,
          "train_examples": 2000, "eval_examples": 1000, "dims": (384, 256, 128, 64)}
QUICK = {"train_examples": 64, "eval_examples": 32}


def _pairs(path, count, seed):
    from minisft import tasks

    examples = tasks.get("question-answering").subset(tasks.get("embedding").read(path), count, seed)
    return [(e.text, e.text_pair) for e in examples]


def _scores(embed, pairs, dims):
    """{dim: retrieval metrics of each question's paragraph among the pairs' paragraphs, on
    the embeddings' first dim dimensions}."""
    from minisft.tasks.metrics import retrieval_metrics

    paragraphs = list(dict.fromkeys(p for _, p in pairs))
    index = {p: i for i, p in enumerate(paragraphs)}
    queries, corpus = embed([q for q, _ in pairs]), embed(paragraphs)
    return {d: retrieval_metrics(queries[:, :d], corpus[:, :d], [index[p] for _, p in pairs]) for d in dims}


def triplets(env, pairs, recipe, tmp):
    """(question, paragraph, negative) rows mined by minisft with the pretrained model."""
    from minisft.cli import mining, workflows

    source = f"{tmp}/pairs.csv"
    with open(source, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("anchor", "positive"), *pairs])
    workflows.mine_hard_negatives(str(env.model_dir), source, f"{tmp}/triplets.csv", mining.Mining(num_negatives=1),
                                  max_length=recipe["max_length"])
    with open(f"{tmp}/triplets.csv", newline="", encoding="utf-8") as f:
        return f"{tmp}/triplets.csv", [tuple(row) for row in list(csv.reader(f))[1:]]


def run_reference(env, recipe, train, dev):
    import torch
    from sentence_transformers import SentenceTransformer, losses, models

    torch.manual_seed(recipe["seed"])
    transformer = models.Transformer(str(env.model_dir), max_seq_length=recipe["max_length"])
    model = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(),
                                                                     pooling_mode="mean"), models.Normalize()],
                                device="cpu")
    loss_fn = losses.MatryoshkaLoss(model, losses.MultipleNegativesRankingLoss(model), list(recipe["dims"]))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe["seed"])).tolist()
    batches = [[train[i] for i in order[j:j + recipe["batch_size"]]] for j in range(0, len(order), recipe["batch_size"])]
    seconds = torch_fine_tune(model, batches, lambda m, b: loss_fn([m.tokenize([row[c] for row in b]) for c in range(3)],
                                                                   None),
                              recipe["learning_rate"], recipe["epochs"], recipe["seed"])
    return _scores(lambda texts: model.encode(texts, batch_size=64, convert_to_numpy=True), dev, recipe["dims"]), seconds


def run(env, quick):
    recipe = {**RECIPE, **(QUICK if quick else {})}
    squad = env.data("squad")
    dev = _pairs(squad / "dev.json", recipe["eval_examples"], recipe["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        path, train = triplets(env, _pairs(squad / "train.json", recipe["train_examples"], recipe["seed"]), recipe, tmp)
        dev_path = f"{tmp}/dev.csv"
        with open(dev_path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("anchor", "positive"), *dev])
        final, seconds = minisft_train([
            "--model", env.model_dir, "--task", "embedding", "--train", path, "--eval", dev_path,
            "--output", f"{tmp}/out", "--matryoshka-dims", ",".join(map(str, recipe["dims"])),
            *recipe_arguments(recipe)])
    ours = {d: {m: final[f"eval_{m}/dim{d}"] for m in ("recall@1", "mrr@10")} for d in recipe["dims"]}
    theirs, reference_seconds = run_reference(env, recipe, train, dev) if env.reference else (None, None)
    note = (f"{len(train)} (question, paragraph, mined negative) triplets; {len(dev)} dev questions against all their "
            f"paragraphs; MatryoshkaLoss at {','.join(map(str, recipe['dims']))}; lr {recipe['learning_rate']:g}, "
            "1 epoch, batch 32, seed 42")
    figures = [Figure(f"SQuAD retrieval {metric} at {d} dimensions, hard negatives + Matryoshka", "fraction",
                      [ours[d][metric]], [theirs[d][metric]] if theirs else None, lower_is_better=False, note=note)
               for d in (recipe["dims"][0], recipe["dims"][-1]) for metric in ("recall@1", "mrr@10")]
    figures.append(Figure("Matryoshka fine-tuning wall-clock time", "s", [seconds], [reference_seconds] if theirs else None,
                          note="minisft: its command (load, train, evaluate); reference: the training loop"))
    return figures
