"""Tokenizer throughput: minisft's tokenizers vs transformers' (Rust) on 10,000 real English
sentences (Rotten Tomatoes reviews), as one padded, truncated batch: WordPiece with
all-MiniLM-L6-v2's vocabulary, and byte-level BPE with the 1,000-token vocabulary of the
tiny RoBERTa fixture (trained on these reviews by tests/fixtures/make_family_fixtures.py)."""
import csv
import pathlib

from benchmarks.common import Figure, alternate

BPE_DIRECTORY = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-roberta"

COUNT = 10_000


def sentences(data_dir, count=COUNT):
    with open(data_dir / "train.csv", encoding="utf-8", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    return texts[:count]


def run(env, quick):
    from minisft.tokenizer import BertTokenizer
    from minisft.tokenizers.bpe import ByteLevelBPETokenizer

    texts = sentences(env.data("rotten-tomatoes"), 2000 if quick else COUNT)
    reference = None
    if env.reference:
        import transformers

        reference = {"WordPiece": lambda: transformers.BertTokenizer.from_pretrained(env.model_dir),
                     "byte-level BPE": lambda: transformers.RobertaTokenizer.from_pretrained(BPE_DIRECTORY)}
    ours = {"WordPiece": lambda: BertTokenizer.from_pretrained(env.model_dir),
            "byte-level BPE": lambda: ByteLevelBPETokenizer.from_pretrained(BPE_DIRECTORY)}
    figures = []
    for kind, make in ours.items():
        figures += _throughput(kind, make(), reference[kind]() if reference else None, texts, quick)
    return figures


def _throughput(kind, ours, theirs, texts, quick):
    """Warm (caches filled by the warm-up) and cold (caches emptied before each run)."""
    def cold():
        ours._cache.clear()  # every word split (or merged) again
        return ours(texts, padding=True, truncation=True, max_length=128)

    functions = {"ours": lambda: ours(texts, padding=True, truncation=True, max_length=128), "ours_cold": cold}
    if theirs is not None:
        functions["reference"] = lambda: theirs(texts, padding=True, truncation=True, max_length=128,
                                                return_tensors="np")
    times = alternate(functions, repeats=3 if quick else 7)
    rate = {name: [len(texts) / t for t in ts] for name, ts in times.items()}
    name = f"tokenizer ({kind}), batch of {len(texts)} sentences"
    return [Figure(name, "sentences/s", rate["ours"], rate.get("reference"), lower_is_better=False,
                   note="padding + truncation to 128; cache warm"),
            Figure(name + ", cold", "sentences/s", rate["ours_cold"], rate.get("reference"),
                   lower_is_better=False, note="cache emptied before each run")]
