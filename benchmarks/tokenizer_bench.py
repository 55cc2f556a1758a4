"""Tokenizer throughput: minisft's BertTokenizer vs transformers' (Rust) on 10,000 real
English sentences (Rotten Tomatoes reviews), as one padded, truncated batch."""
import csv

from benchmarks.common import Figure, alternate

COUNT = 10_000


def sentences(data_dir, count=COUNT):
    with open(data_dir / "train.csv", encoding="utf-8", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    return texts[:count]


def run(env, quick):
    from minisft.tokenizer import BertTokenizer

    texts = sentences(env.data("rotten-tomatoes"), 2000 if quick else COUNT)
    ours = BertTokenizer.from_pretrained(env.model_dir)

    def cold():
        ours._pieces.clear()  # every word normalised and split again
        return ours(texts, padding=True, truncation=True, max_length=128)

    functions = {"ours": lambda: ours(texts, padding=True, truncation=True, max_length=128),
                 "ours_cold": cold}
    if env.reference:
        import transformers

        theirs = transformers.BertTokenizer.from_pretrained(env.model_dir)
        functions["reference"] = lambda: theirs(texts, padding=True, truncation=True, max_length=128,
                                                return_tensors="np")
    times = alternate(functions, repeats=3 if quick else 7)
    rate = {name: [len(texts) / t for t in ts] for name, ts in times.items()}
    name = f"tokenizer, batch of {len(texts)} sentences"
    return [Figure(name, "sentences/s", rate["ours"], rate.get("reference"), lower_is_better=False,
                   note="padding + truncation to 128; word cache warm"),
            Figure(name + ", cold", "sentences/s", rate["ours_cold"], rate.get("reference"),
                   lower_is_better=False, note="word cache emptied before each run")]
