"""The same work for both libraries: a BERT forward pass and a full fine-tuning step
(BertForSequenceClassification forward, cross-entropy, backward, clipping, AdamW) on
all-MiniLM-L6-v2 with random token ids, and the model FLOPs that work takes."""
import numpy as np


def inputs(batch, length, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(1000, 20000, (batch, length)).astype(np.int64),
            np.ones((batch, length), np.int64), rng.integers(0, 2, batch).astype(np.int64))


def model_flops(config, batch, length, training):
    """Multiply-adds x 2 of the forward pass (x 3 with backward): the linear layers,
    attention scores and context, pooler and classifier."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    per_token = layers * (2 * (4 * h * h + 2 * h * i) + 2 * 2 * length * h)
    forward = batch * length * per_token + batch * 2 * (h * h + 2 * h)
    return forward * (3 if training else 1)


LORA_R, LORA_ALPHA = 8, 16  # the lean benchmark's LoRA (query and value)

class Minisft:
    name = "minisft"

    def __init__(self, model_dir, device="cpu"):
        import minisft  # noqa: F401
        from minisft.engine.runtime import keep_freed_memory

        keep_freed_memory()  # as minisft's trainer does
        self.model_dir, self.device = model_dir, device

    def forward(self, batch, length):
        import minisft
        from minisft import lean
        from minisft.models.bert import BertModel

        model = lean.apply(BertModel.from_pretrained(self.model_dir).eval().to(self.device))  # minisft's defaults
        ids, mask, _ = inputs(batch, length)

        def run():
            with minisft.no_grad():
                model(ids, attention_mask=mask).last_hidden_state.numpy()
        return run

    def train_step(self, batch, length, mode="full"):
        """One AdamW step of fine-tuning: every weight ("full"), LoRA r=8 alpha 16 on query and
        value ("lora"), all but the embeddings ("frozen-embeddings"), every weight with
        gradient checkpointing ("checkpointing"), LoRA with it ("lora-checkpointing"), or
        every weight with attention over whole (L, L) score matrices however long the input
        ("whole-attention", as before block attention), or every weight in mixed precision
        ("fp16": float16 products, loss scaling; minisft.engine.amp)."""
        from minisft import lean, peft
        from minisft.engine import amp
        from minisft.models.auto import AutoModelForSequenceClassification
        from minisft.optim import AdamW, clip_grad_norm_, parameter_groups

        model = AutoModelForSequenceClassification.from_pretrained(self.model_dir, lean=False,
                                                                   num_labels=2).train().to(self.device)
        lean.apply(model, block_attention_from=None if mode == "whole-attention" else lean.BLOCK_ATTENTION_FROM,
                   checkpointing=mode.endswith("checkpointing"))  # minisft train's passes
        if mode.startswith("lora"):
            model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA))
        elif mode == "frozen-embeddings":
            peft.freeze(model, embeddings=True)
        optimizer = AdamW(parameter_groups(model, 0.01), lr=2e-5)
        ids, mask, labels = inputs(batch, length)
        scaler = amp.GradScaler() if mode == "fp16" else None

        def run():
            with amp.autocast(enabled=scaler is not None):
                loss = model(ids, attention_mask=mask, labels=labels).loss
            (loss if scaler is None else scaler.scale(loss)).backward()
            overflow = scaler is not None and scaler.unscale_(model.parameters())
            if not overflow:
                clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            if scaler is not None:
                scaler.update(overflow)
            optimizer.zero_grad()
            return loss.item()  # on a GPU: waits for the step's kernels
        return run

    def matmul(self, n):
        xp = np if self.device == "cpu" else __import__("cupy")
        a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
        b = xp.asarray(np.random.default_rng(1).standard_normal((n, n), dtype=np.float32))

        def run():
            (a @ b)[0, 0].item()
        return run


class Reference:
    name = "torch"

    def __init__(self, model_dir, device="cpu", attention=None):
        """attention: transformers' attn_implementation ("eager", "sdpa"; None: its default)."""
        import torch
        import transformers

        self.torch, self.transformers = torch, transformers
        self.model_dir, self.device = model_dir, device
        self.options = {} if attention is None else {"attn_implementation": attention}

    def forward(self, batch, length):
        torch = self.torch
        model = self.transformers.BertModel.from_pretrained(self.model_dir, **self.options).eval().to(self.device)
        ids, mask, _ = (torch.from_numpy(a).to(self.device) for a in inputs(batch, length))

        def run():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask).last_hidden_state.cpu().numpy()
        return run

    def train_step(self, batch, length, mode="full"):
        """As Minisft.train_step, with transformers (and peft for "lora")."""
        torch = self.torch
        model = self.transformers.AutoModelForSequenceClassification.from_pretrained(
            self.model_dir, num_labels=2, **self.options).train().to(self.device)
        if mode.endswith("checkpointing"):  # non-reentrant: LoRA's frozen inputs need no grad
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode.startswith("lora"):
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=LORA_R, lora_alpha=LORA_ALPHA,
                                                               target_modules=["query", "value"]))
        elif mode == "frozen-embeddings":
            model.bert.embeddings.requires_grad_(False)
        no_decay = ("bias", "LayerNorm.weight")
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in trainable if not n.endswith(no_decay)], "weight_decay": 0.01},
                  {"params": [p for n, p in trainable if n.endswith(no_decay)], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=2e-5)
        ids, mask, labels = (torch.from_numpy(a).to(self.device) for a in inputs(batch, length))
        scaler = torch.amp.GradScaler(self.device) if mode == "fp16" else None

        def run():
            with torch.autocast(self.device, dtype=torch.float16, enabled=scaler is not None):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            if scaler is None:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad()
            return loss.item()
        return run

    def matmul(self, n):
        torch = self.torch
        a = torch.randn(n, n, device=self.device)
        b = torch.randn(n, n, device=self.device)

        def run():
            (a @ b)[0, 0].item()
        return run
