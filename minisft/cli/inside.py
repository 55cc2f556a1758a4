"""The work behind `minisft graph`, `attention`, `summary` and `plot`: a checkpoint loaded and
run on a sentence or a batch, then drawn (minisft.inspect.viz) or summarised (minisft.inspect.summary)."""
import pathlib

import numpy

from minisft.engine.errors import MissingFile
from minisft.cli.fetch import resolve_model
from minisft.inspect import summary, viz
from minisft.models.auto import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from minisft.training.options import OptionError

GRAPH_SENTENCE = "Fine-tuning starts here."


def _model(spec, layers=None, lean=True):
    """The checkpoint (a directory, or a fetchable name, fetched) as a sequence classifier
    (a new head where it has none), with its lowest `layers` encoder layers only when given;
    lean=False: the plain model, no pass applied."""
    model_dir = resolve_model(spec)
    if not (pathlib.Path(model_dir) / "config.json").is_file():
        raise MissingFile(f"{model_dir} is not a checkpoint directory (it has no config.json): give one "
                                "that `minisft fetch` or `minisft train` wrote")
    config = AutoConfig.from_pretrained(model_dir)
    overrides = {}
    if layers is not None:
        total = getattr(config, config.layers_field)
        if not 1 <= layers <= total:
            raise OptionError("--layers", layers, f"{model_dir} has {total} layers", f"give 1 to {total}")
        overrides[config.layers_field] = layers
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, strict=False, lean=lean, **overrides)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def graph(model_dir, output="graph.svg", layers=1):
    """Draw the autograd graph of one training step's loss on a short sentence, with each
    parameter's gradient norm. Returns (written path, note or None)."""
    model, tokenizer = _model(model_dir, layers)
    out = model(**_inputs(tokenizer([GRAPH_SENTENCE])), labels=numpy.array([0]))
    out.loss.backward(retain_graph=True)
    return viz.render_dot(viz.to_dot(out.loss, model, grad_norms=True), output)


def attention(model_dir, sentence, output="attention.png", layer=None, head=None):
    """Draw the attention probabilities of `layer` (default the last) over `sentence`'s word
    pieces, one panel per head or the chosen `head`. Returns (path, probabilities (heads, L, L))."""
    if not sentence.strip():
        raise OptionError("sentence", sentence, "it is empty", "give a sentence with words")
    model, tokenizer = _model(model_dir)
    batch = tokenizer([sentence])
    attentions = model(**_inputs(batch), output_attentions=True).attentions
    layers = len(attentions)
    layer = layers - 1 if layer is None else layer
    if not 0 <= layer < layers:
        raise OptionError("--layer", layer, f"{model_dir} has layers 0 to {layers - 1}", f"give 0 to {layers - 1}")
    probabilities = attentions[layer].numpy()[0]
    heads = probabilities.shape[0]
    if head is not None and not 0 <= head < heads:
        raise OptionError("--head", head, f"layer {layer} has heads 0 to {heads - 1}", f"give 0 to {heads - 1}")
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    title = f"{pathlib.Path(model_dir).name}: layer {layer}" + (f", head {head}" if head is not None else "")
    viz.draw_attention(probabilities, tokens, output, heads=None if head is None else [head], title=title)
    return pathlib.Path(output), probabilities


def model_summary(model_dir, batch_size=32, length=128, profile=False):
    """The summary table of one training step at batch_size x length (random ids), of the
    plain model (every module runs its own forward, so every one has a row)."""
    model, tokenizer = _model(model_dir, lean=False)
    limit = getattr(model.config, "max_position_embeddings", length)
    if length > limit:
        raise OptionError("--length", length, f"{model_dir} takes at most {limit} positions", f"give 1 to {limit}")
    rng = numpy.random.default_rng(0)
    ids = rng.integers(0, len(tokenizer), (batch_size, length))
    inputs = {"input_ids": ids, "attention_mask": numpy.ones_like(ids), "token_type_ids": numpy.zeros_like(ids),
              "labels": numpy.zeros(batch_size, dtype=numpy.int64)}
    model.train()
    return summary.format_summary(summary.summarize(model, inputs, profile=profile))


def plot(run_directories, output=None):
    """Draw the training curves of one or more runs into `output` (default: the first run's
    curves.png). Returns the path."""
    output = pathlib.Path(output) if output else pathlib.Path(run_directories[0]) / "curves.png"
    viz.draw_curves(run_directories, output)
    return output
