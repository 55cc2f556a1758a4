"""The encoders fine-tuned today, side by side with torch: a training step at 32x128 (AdamW,
all weights, minisft's default passes) of random-weight models of DeBERTa-v3-xsmall's shape
(12 layers, hidden 384, 6 heads, intermediate 1536, 128,100 pieces, 256 log buckets) and of a
ModernBERT of the same width and depth (global attention every third layer, a 128-token local
window), and the peak RSS of 5 such steps, each library in its own process. The models are made
by transformers from a seed and saved once under weights/bench-*; both libraries load them.
"""
import json

from benchmarks.common import Figure, alternate
from benchmarks.memory_bench import peak_mb
from benchmarks.workloads import Minisft, Reference, model_flops

SHAPE = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536}
MODELS = {
    "DeBERTa-v3-xsmall shape": ("bench-deberta-v3-xsmall", "DebertaV2Config", {
        **SHAPE, "vocab_size": 128100, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
        "position_buckets": 256, "max_relative_positions": -1, "norm_rel_ebd": "layer_norm", "share_att_key": True,
        "position_biased_input": False, "type_vocab_size": 0, "layer_norm_eps": 1e-7, "max_position_embeddings": 512}),
    "ModernBERT, same width and depth": ("bench-modernbert-384", "ModernBertConfig", {
        **SHAPE, "vocab_size": 50368, "local_attention": 128, "global_attn_every_n_layers": 3,
        "max_position_embeddings": 8192}),
}


def checkpoint(env, directory, config_class, fields):
    """weights/DIRECTORY: a random-weight 2-label classifier made by transformers (seed 0)."""
    path = env.root / "weights" / directory
    if not (path / "config.json").is_file():
        import torch
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, config_class)(num_labels=2, **fields)
        transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    return path


def run(env, quick):
    if not env.reference:
        return []
    batch, length = (4, 32) if quick else (32, 128)
    repeats = 2 if quick else 5
    figures = []
    for label, (directory, config_class, fields) in MODELS.items():
        path = checkpoint(env, directory, config_class, fields)
        libraries = [Minisft(path), Reference(path)]
        steps = {lib.name: lib.train_step(batch, length) for lib in libraries}
        times = alternate(steps, repeats=repeats)
        flops = model_flops(json.loads((path / "config.json").read_text()), batch, length, training=True)
        figures.append(Figure(f"{label}: training step {batch}x{length}", "s", times["minisft"], times["torch"],
                              note=f"{flops / 1e9:.0f} GFLOP per step by BERT's count of products; AdamW, all weights"))
        figures.append(Figure(f"{label}: peak RSS, 5 training steps {batch}x{length}", "MB",
                              [peak_mb(env, "minisft", batch, length, model_dir=path)],
                              [peak_mb(env, "torch", batch, length, model_dir=path)],
                              note="each library in its own process"))
    return figures
