"""Sentence embeddings, as sentence-transformers makes them: a BERT-family base model, mean
(or [CLS]) pooling over the tokens, L2 normalisation; MultipleNegativesRankingLoss for
(anchor, positive) pairs; retrieval metrics; and the directory layout sentence-transformers
reads (modules.json, 1_Pooling/config.json, sentence_bert_config.json beside the base model's
files).

    model = SentenceEmbedder.from_pretrained("weights/all-MiniLM-L6-v2")   # mean pooling, normalised
    out = model(input_ids, attention_mask=mask)        # out.logits: (B, H) embeddings
    out = model(pair_ids, attention_mask=pair_mask, labels=...)   # (B, 2, L): anchor, positive
    out.loss                                           # in-batch negatives, scale 20 (B, 2 + k, L): k hard negatives
"""
import json
import pathlib
from dataclasses import dataclass

import numpy

from minisft.engine.errors import ModelFileError
from minisft import nn
from minisft.engine import functional as F
from minisft.engine.ops import cat
from minisft.engine.tensor import Tensor, array_of
from minisft.files.atomic import write_json_atomic
from minisft.models.auto import AutoModel
from minisft.models.bert import token_counts, token_weights

POOLING_MODES = ("mean", "cls")
MNRL_SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default


@dataclass
class EmbeddingOutput:
    loss: Tensor = None          # MultipleNegativesRankingLoss, for (B, 2, L) pairs with labels
    logits: Tensor = None        # the embeddings: (B, H), or (B, 2, H) for pairs
    hidden_states: tuple = None  # the base model's; for pairs, one tuple per column (anchors, positives)
    attentions: tuple = None


def pool(last_hidden_state, attention_mask, mode):
    """(B, L, H) -> (B, H): the mean over the attended tokens ("mean"), or the first token's."""
    if mode == "cls":
        return last_hidden_state[:, 0]
    put = last_hidden_state.device.put
    mask = Tensor(put(token_weights(attention_mask, last_hidden_state.dtype)))
    return (last_hidden_state * mask).sum(dim=1) / Tensor(put(token_counts(attention_mask, last_hidden_state.dtype, 1e-9)))


def normalize(x):
    """x / its L2 norm along the last axis."""
    return x / (x * x).sum(dim=-1, keepdim=True).sqrt()


def multiple_negatives_ranking_loss(anchors, candidates, scale=MNRL_SCALE):
    """sentence-transformers' MultipleNegativesRankingLoss: the cross-entropy of each anchor's
    cosine similarities (x scale) to every candidate of the batch, the right one being its
    own positive. anchors (B, H); candidates (B, H), the positives, or (k B, H), the positives
    and then each column of hard negatives: the other candidates are each anchor's negatives."""
    scores = normalize(anchors) @ normalize(candidates).transpose(0, 1) * scale
    return F.cross_entropy(scores, numpy.arange(anchors.shape[0]))


def matryoshka_loss(anchors, candidates, dims, weights=None, scale=MNRL_SCALE):
    """sentence-transformers' MatryoshkaLoss around MultipleNegativesRankingLoss: the
    weighted sum (weights default 1) over `dims` of the loss on the first d dimensions of
    every embedding, so that the leading dimensions carry most of the meaning."""
    weights = [1.0] * len(dims) if weights is None else weights
    losses = [w * multiple_negatives_ranking_loss(anchors[:, :d], candidates[:, :d], scale) for d, w in zip(dims, weights)]
    return sum(losses[1:], losses[0])


def pairs_loss(embeddings, matryoshka_dims=None):
    """The loss of (B, C, H) embeddings of (anchor, positive, negative...) rows: MNRL with
    the negatives, or Matryoshka's around it."""
    anchors = embeddings[:, 0]
    candidates = cat([embeddings[:, c] for c in range(1, embeddings.shape[1])], dim=0)
    if matryoshka_dims:
        return matryoshka_loss(anchors, candidates, matryoshka_dims)
    return multiple_negatives_ranking_loss(anchors, candidates)


class SentenceEmbedder(nn.Module):
    """A base model (`model`), pooling and optional normalisation: texts -> embeddings."""
    peft_task_type = "FEATURE_EXTRACTION"

    def __init__(self, model, pooling="mean", normalize=True, max_seq_length=None):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling {pooling!r}: choose {' or '.join(POOLING_MODES)}")
        self.model, self.pooling, self.normalize = model, pooling, normalize
        self.max_seq_length = max_seq_length or model.config.max_position_embeddings

    @property
    def config(self):
        return self.model.config

    def base_model(self):
        return self.model

    def encoder_layers(self):
        return self.model.encoder_layers()

    def loading_report(self):
        return self.model.loading_report()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        """input_ids (B, L), or (B, C, L) rows of an anchor, its positive and C - 2 hard
        negatives; the loss (MultipleNegativesRankingLoss) when rows come with labels (any: the
        positives are the rows' own)."""
        ids = array_of(input_ids)
        mask = numpy.ones(ids.shape, numpy.int64) if attention_mask is None else array_of(attention_mask)
        types = None if token_type_ids is None else array_of(token_type_ids)
        if ids.ndim == 2:
            embeddings, out = self._embed(ids, mask, types, output_hidden_states, output_attentions)
            return EmbeddingOutput(None, embeddings, out.hidden_states, out.attentions)
        # pairs: the anchors and the positives each run as their own batch, cut to their own
        # longest row (a question need not be padded to its paragraph's length)
        columns = [self._embed(ids[:, c], mask[:, c], None if types is None else types[:, c], output_hidden_states,
                               output_attentions) for c in range(ids.shape[1])]
        embeddings = cat([e.reshape(e.shape[0], 1, e.shape[1]) for e, _ in columns], dim=1)
        loss = None if labels is None else pairs_loss(embeddings)
        return EmbeddingOutput(loss, embeddings, tuple(out.hidden_states for _, out in columns),
                               tuple(out.attentions for _, out in columns))

    def _embed(self, ids, mask, types, output_hidden_states, output_attentions):
        """Embeddings (B, H) of ids (B, L), with the base model's output. The columns after the
        last one any row attends to are padding for every row and are cut off."""
        attended = mask.any(axis=0).cumsum()  # columns attended so far; it peaks at the last one
        length = int(attended.argmax()) + 1 if mask.size else ids.shape[-1]
        if length < ids.shape[-1]:
            ids, mask, types = (None if a is None else a[:, :length] for a in (ids, mask, types))
        out = self.model(ids, attention_mask=mask, token_type_ids=types,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        embeddings = pool(out.last_hidden_state, mask, self.pooling)
        return (normalize(embeddings) if self.normalize else embeddings), out

    # --- sentence-transformers' directory ---------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory, pooling=None, normalize=None, **overrides):
        """The base model of `directory` with the pooling and normalisation its
        sentence-transformers files name (else mean pooling, normalised; `pooling` and
        `normalize` override)."""
        directory = pathlib.Path(directory)
        saved = _read_modules(directory)
        model = AutoModel.from_pretrained(directory, **overrides)
        return cls(model, pooling or saved.get("pooling", "mean"),
                   saved.get("normalize", True) if normalize is None else normalize, saved.get("max_seq_length"))

    def save_pretrained(self, directory):
        """The base model's config.json and model.safetensors, and the files that make the
        directory a sentence-transformers model (Transformer, Pooling, Normalize)."""
        directory = pathlib.Path(directory)
        self.model.save_pretrained(directory)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (directory / "2_Normalize").mkdir(exist_ok=True)
        (directory / "1_Pooling").mkdir(exist_ok=True)
        write_json_atomic({"word_embedding_dimension": self.config.hidden_size, "pooling_mode_cls_token": self.pooling == "cls",
                           "pooling_mode_mean_tokens": self.pooling == "mean", "pooling_mode_max_tokens": False,
                           "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                           "pooling_mode_lasttoken": False, "include_prompt": True},
                          directory / "1_Pooling" / "config.json")
        write_json_atomic({"max_seq_length": self.max_seq_length, "do_lower_case": False},
                          directory / "sentence_bert_config.json")
        write_json_atomic(modules, directory / "modules.json")

    def load_saved(self, directory):
        self.model.load_saved(directory)


def _read_modules(directory):
    """{"pooling", "normalize", "max_seq_length"} as a sentence-transformers directory names
    them ({} for a plain checkpoint)."""
    path = directory / "modules.json"
    if not path.is_file():
        return {}
    modules = json.loads(path.read_text(encoding="utf-8"))
    found = {"normalize": any(m.get("type", "").endswith("Normalize") for m in modules)}
    pooling = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
    if pooling is not None:
        config = json.loads((directory / pooling["path"] / "config.json").read_text(encoding="utf-8"))
        mode = config.get("pooling_mode") or ("cls" if config.get("pooling_mode_cls_token") else "mean")
        if mode not in POOLING_MODES or config.get("pooling_mode_max_tokens"):
            raise ModelFileError(f"{directory / pooling['path'] / 'config.json'}: pooling {mode!r}; minisft pools by "
                             f"{' or '.join(POOLING_MODES)}")
        found["pooling"] = mode
    settings = directory / "sentence_bert_config.json"
    if settings.is_file():
        found["max_seq_length"] = json.loads(settings.read_text(encoding="utf-8")).get("max_seq_length")
    return found
