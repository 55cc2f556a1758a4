"""Retrieval embeddings on SQuAD, side by side: all-MiniLM-L6-v2 as a bi-encoder (mean
pooling, normalised) fine-tuned on 8,000 (question, its paragraph) pairs of the training
split with in-batch negatives (MultipleNegativesRankingLoss, scale 20), 1 epoch, batch 32, lr
5e-5 (linear decay, no warmup), seed 42; Recall@1 and MRR@10 of 2,000 questions of the
held-out dev split against all their paragraphs, by cosine similarity, before and after.

minisft runs its command line (`minisft train --task embedding`); the reference is
sentence-transformers' model and loss in a plain torch loop (its trainer needs the datasets
library). The subsets are minisft's (whole articles in a seeded order); both are scored by
minisft.tasks.metrics.retrieval_metrics.
"""
import json
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import Figure

RECIPE = {"learning_rate": 5e-5, "epochs": 1, "batch_size": 32, "max_length": 256, "seed": 42,
          "train_examples": 8000, "eval_examples": 2000}
QUICK = {"train_examples": 64, "eval_examples": 32}


def _pairs(path, count, seed):
    from minisft import tasks

    examples = tasks.get("question-answering").subset(tasks.get("embedding").read(path), count, seed)
    return [(e.text, e.text_pair) for e in examples]


def _scores(embed, pairs):
    """Recall@1/5/10 and MRR@10 of each question's paragraph among the pairs' paragraphs."""
    from minisft.tasks.metrics import retrieval_metrics

    paragraphs = list(dict.fromkeys(p for _, p in pairs))
    index = {p: i for i, p in enumerate(paragraphs)}
    return retrieval_metrics(embed([q for q, _ in pairs]), embed(paragraphs), [index[p] for _, p in pairs])


def run_minisft(env, recipe, dev):
    import minisft
    from minisft.models.auto import AutoTokenizer
    from minisft.sentence import SentenceEmbedder

    def embedder(directory):
        model, tokenizer = SentenceEmbedder.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)

        def embed(texts):
            out = []
            with minisft.no_grad():
                for i in range(0, len(texts), 64):
                    batch = tokenizer(texts[i:i + 64], padding=True, truncation=True, max_length=recipe["max_length"])
                    out.append(model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                     token_type_ids=batch["token_type_ids"]).logits.numpy())
            return np.concatenate(out)
        return embed

    before = _scores(embedder(env.model_dir), dev)
    squad = env.data("squad")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "minisft", "train", "--model", str(env.model_dir), "--task", "embedding",
                   "--train", str(squad / "train.json"), "--eval", str(squad / "dev.json"), "--output", f"{tmp}/out",
                   "--max-train-examples", str(recipe["train_examples"]),
                   "--max-eval-examples", str(recipe["eval_examples"]), "--max-length", str(recipe["max_length"]),
                   "--learning-rate", str(recipe["learning_rate"]), "--epochs", str(recipe["epochs"]),
                   "--batch-size", str(recipe["batch_size"]), "--seed", str(recipe["seed"])]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        elapsed = time.perf_counter() - start
    after = {k[len("eval_"):]: v for k, v in json.loads(result.stdout).items()}
    return before, after, elapsed


def run_reference(env, recipe, dev):
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer, losses, models

    torch.manual_seed(recipe["seed"])
    transformer = models.Transformer(str(env.model_dir), max_seq_length=recipe["max_length"])
    model = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(),
                                                                     pooling_mode="mean"), models.Normalize()],
                                device="cpu")

    def embed(texts):
        model.eval()
        return model.encode(texts, batch_size=64, convert_to_numpy=True)

    before = _scores(embed, dev)
    start = time.perf_counter()
    train = _pairs(env.data("squad") / "train.json", recipe["train_examples"], recipe["seed"])
    loss_fn = losses.MultipleNegativesRankingLoss(model)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe["seed"])).tolist()
    batches = [[train[i] for i in order[j:j + recipe["batch_size"]]] for j in range(0, len(order), recipe["batch_size"])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"], weight_decay=0.0)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, 0, len(batches) * recipe["epochs"])
    model.train()
    for _ in range(recipe["epochs"]):
        for batch in batches:
            features = [model.tokenize([q for q, _ in batch]), model.tokenize([p for _, p in batch])]
            loss_fn(features, None).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    after = _scores(embed, dev)
    return before, after, time.perf_counter() - start


def run(env, quick):
    recipe = {**RECIPE, **(QUICK if quick else {})}
    dev = _pairs(env.data("squad") / "dev.json", recipe["eval_examples"], recipe["seed"])
    ours = run_minisft(env, recipe, dev)
    theirs = run_reference(env, recipe, dev) if env.reference else None
    note = (f"{recipe['train_examples']} (question, paragraph) pairs; {len(dev)} dev questions; "
            f"lr {recipe['learning_rate']:g}, 1 epoch, batch 32, seed 42")
    figures = []
    for stage, index in (("before", 0), ("after", 1)):
        for metric in ("recall@1", "mrr@10"):
            figures.append(Figure(f"SQuAD retrieval {metric} {stage} fine-tuning", "fraction", [ours[index][metric]],
                                  [theirs[index][metric]] if theirs else None, lower_is_better=False, note=note))
    figures.append(Figure("retrieval fine-tuning wall-clock time", "s", [ours[2]], [theirs[2]] if theirs else None,
                          note="minisft: its command (train and evaluate); reference: train and evaluate"))
    return figures
