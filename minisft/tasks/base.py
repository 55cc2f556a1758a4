"""What every task shares: the Task record's defaults, and the base of the tasks whose
labels are token positions or whole inputs (question answering, multiple choice, embeddings)."""
import json

import numpy

from minisft.tasks import metrics as M
from minisft.tasks.data import (LABEL_COLUMNS, PAIR_COLUMNS, TEXT_COLUMNS, DataError, Example, LabelVocab,
                          check_label_types, pick_columns, read_records, rows_error)


class Task:
    """A text task on one (or two) strings per example, with a sequence-level head."""
    name = description = None
    metrics = ()           # what compute_metrics reports, the first being the default metric
    pair = False           # a second text is required
    numeric_labels = False  # labels are numbers (made floats), not class names
    file_suffixes = ()     # data files whose format implies this task (see for_file)
    default_max_length = None  # the task's --max-length when none is given (else TrainingArguments')
    class_weighted = False  # the loss is a cross-entropy over classes that --class-weights can weigh
    own_options = ()       # TrainingArguments fields that only this task reads (given to another: an error)
    text_columns, pair_columns = TEXT_COLUMNS, PAIR_COLUMNS  # the columns read() looks for, in order
    rankings = None        # a ranking task's (examples, scores) -> {query: candidates best first}
    exported_outputs = ("logits",)  # an ONNX export's outputs, as transformers' exports name them
    choices_axis = False   # inputs are (batch, choices, sequence), not (batch, sequence)

    @property
    def default_metric(self):
        return self.metrics[0]

    # --- reading and checking ----------------------------------------------------------
    def read_options(self, args):
        """The task's own keyword options of read(), from the training arguments."""
        return {}

    def export_settings(self, model):
        """What an exported model's labels.json records of `model` beyond its labels (minisft.export)."""
        return {}

    def output_options(self, args):
        """The task's own keyword options of evaluate() and predictions()."""
        return {}

    def read(self, path, text_column=None, text_pair_column=None, label_column=None, require_labels=True,
             skip_misaligned=False, **options):
        """Examples from a labeled file (CSV, TSV, JSON lines); columns default to the usual
        names (text/sentence/sentence1, text_pair/sentence2, label). skip_misaligned: see
        QuestionAnswering; options: the task's read_options, for read_labels."""
        records = read_records(path)
        columns = list(records[0][1])
        wants_pair = self.pair or text_pair_column
        wants_label = require_labels or label_column or any(c in columns for c in LABEL_COLUMNS)
        wanted = [(text_column, self.text_columns, "text", "--text-column")]
        wanted += [(text_pair_column, self.pair_columns, "text pair", "--text-pair-column")] * bool(wants_pair)
        wanted += [(label_column, LABEL_COLUMNS, "label", "--label-column")] * bool(wants_label)
        names = pick_columns(path, columns, *wanted)
        text, pair, label = names[0], names[1] if wants_pair else None, names[-1] if wants_label else None

        def blank(value):
            return not isinstance(value, str) or not value.strip()
        empty = [number for number, record in records if blank(record.get(text)) or (pair and blank(record.get(pair)))]
        if empty:
            raise rows_error(path, empty, "have an empty or missing text (column " + repr(text)
                             + (f" or {pair!r})" if pair else ")"), "fill them in or remove them")
        examples = [Example(record[text], record[pair] if pair else None, record.get(label) if label else None,
                            number) for number, record in records]
        if label:
            self.read_labels(path, examples, **options)
        return examples

    def read_labels(self, path, examples):
        """Check (and normalise) the labels as read: all numbers, or all names."""
        check_label_types(path, examples, numeric=self.numeric_labels)

    def check_training_examples(self, path, examples):
        """What makes fine-tuning on these examples meaningless, before any work."""

    def subset(self, examples, count, seed):
        """The first `count` examples (--max-train-examples, --max-eval-examples), as
        run_glue's max_train_samples takes them."""
        return examples[:count]

    def stdin_example(self, line, number):
        """An example from one line of standard input (predict --data -): a text, or a text
        and its pair separated by a tab."""
        text, _, pair = line.partition("\t")
        return Example(text, pair or None, line=number)

    # --- labels and encoding -----------------------------------------------------------
    def label_vocab(self, examples):
        """The label vocabulary built from the training examples."""
        return LabelVocab.of_names({e.label for e in examples})

    def encode(self, examples, tokenizer, labels, max_length=128, label_all_tokens=False, source="data",
               doc_stride=128):
        """Features: dicts of input_ids, token_type_ids and label (a class id or a float)."""
        self.check_labels(examples, labels, source)
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples] if examples and examples[0].text_pair is not None else None
        batch = tokenizer(texts, pairs, truncation=True, max_length=max_length, return_tensors=None)
        features = []
        for i, example in enumerate(examples):
            feature = {"input_ids": batch["input_ids"][i], "token_type_ids": batch["token_type_ids"][i]}
            if example.label is not None:
                feature["label"] = self.encode_label(example, labels, source)
            features.append(feature)
        return features

    def check_labels(self, examples, labels, source):
        """Every label of evaluation or test examples is one training knows."""
        labels.check(examples, source, lambda e: [e.label])

    def encode_label(self, example, labels, source):
        return labels.encode(example.label, source, example.line)

    def loss_terms(self, feature, class_weights=None):
        """How many terms of the loss's mean a training feature brings (with class weights, the
        sum of its terms' weights): data-parallel training weighs each rank's mean loss by its
        share of a batch's terms."""
        if class_weights is None:
            return 1
        return float(sum(class_weights[c] for c in self.loss_classes(feature)))

    def training_loss(self, model, batch, args, class_weights=None):
        """The mean loss of a collated training batch: the model's own (its labels' loss), or,
        with class weights, the task's weighted cross-entropy of its logits."""
        inputs = {"attention_mask": batch["attention_mask"], "token_type_ids": batch["token_type_ids"]}
        if class_weights is None:
            return model(batch["input_ids"], **inputs, labels=batch["labels"]).loss
        return self.weighted_loss(model(batch["input_ids"], **inputs).logits, batch["labels"], class_weights)

    def loss_classes(self, feature):
        """The class ids of a training feature's loss terms (class_weighted tasks)."""
        raise NotImplementedError(f"{self.name} has no classes")

    def weighted_loss(self, logits, labels, class_weights):
        """The class-weighted cross-entropy of a batch's logits (class_weighted tasks)."""
        raise NotImplementedError(f"{self.name} has no classes")

    # --- the model, its outputs and metrics ------------------------------------------------
    def model(self, directory, labels, **overrides):
        """The task's model from a pretrained or fine-tuned checkpoint directory."""
        from minisft.models.auto import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            directory, id2label=dict(enumerate(labels.names)), problem_type="single_label_classification", **overrides)

    def gather(self, outputs):
        """The model's per-example outputs (in order) as the metrics take them."""
        return numpy.stack(outputs)

    def evaluate(self, features, outputs, label_names):
        """Metrics of the gathered outputs of labeled features."""
        return self.compute_metrics(outputs, [f["label"] for f in features], label_names)

    def predictions(self, examples, features, outputs, label_names, **options):
        """predict's JSON records, one per example; options: the task's output_options, which
        a record may not need (an embedding's Matryoshka dimensions)."""
        for example, feature, logits in zip(examples, features, outputs):
            yield self.prediction(example, feature, logits, label_names)

    def compute_metrics(self, logits, labels, label_names):
        predictions = [int(i) for i in numpy.asarray(logits).argmax(-1)]
        _, (precision, recall, f1) = M.precision_recall_f1(list(labels), predictions)
        return {"accuracy": M.accuracy(list(labels), predictions), "f1": f1, "precision": precision,
                "recall": recall, "mcc": M.matthews_corrcoef(list(labels), predictions)}

    def prediction(self, example, feature, logits, label_names):
        """One JSON record for predict: the text(s), the label and every class's probability."""
        shifted = numpy.exp(logits - logits.max())
        probabilities = shifted / shifted.sum()
        record = {"text": example.text}
        if example.text_pair is not None:
            record["text_pair"] = example.text_pair
        return {**record, "label": label_names[int(probabilities.argmax())],
                "probabilities": {name: round(float(p), 6) for name, p in zip(label_names, probabilities)}}


class PositionTask(Task):
    """A task whose labels are positions (of an answer, of the right choice), not class
    names, and whose standard-input lines are JSON objects with `stdin_keys`."""
    stdin_keys = ()

    def stdin_example(self, line, number):
        try:
            return self.stdin_record(json.loads(line), number)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise DataError(f"standard input line {number}: expected a JSON object with "
                            + " and ".join(f'"{key}"' for key in self.stdin_keys)) from None

    def label_vocab(self, examples):
        return LabelVocab([])

    def check_labels(self, examples, labels, source):
        pass
