"""The multitask model: one shared BERT encoder, one small head per task.

Single sentences and cross-encoded pairs go through the encoder once and a head reads the
sentence vector. Bi-encoded pairs encode each side separately and a pair head combines them.
`cross+cos` pairs do both: a cross-encoder score plus a learned multiple of the bi-encoder cosine
(paper 002). Sentence vectors come from a pooler: [CLS], mean, n-gram CNN, BiLSTM, or a concatenation.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mtbert.core.errors import ConfigError
from mtbert.core.tasks import TaskSpec
from mtbert.modeling.encoder import BertModel
from mtbert.modeling.heads import (
    PAIR_ENCODINGS,
    PAIR_HEADS,
    CrossPlusCosineHead,
    LinearHead,
    Rep,
)
from mtbert.modeling.poolers import build_pooler


class MultitaskModel(nn.Module):
    def __init__(self, encoder: BertModel, tasks: list[TaskSpec], pair_encoding: dict[str, str],
                 bi_head: str = "concat", pooling: str = "cls", dropout: float = 0.1,
                 shared_pair_layer: int = 0):
        super().__init__()
        self.encoder = encoder
        self.tasks = {t.name: t for t in tasks}
        self.pair_encoding = {t.name: (pair_encoding.get(t.name, t.pair_encoding or "cross") if t.is_pair else "single") for t in tasks}
        self.pooling, self.bi_head, self.shared_pair_layer = pooling, bi_head, shared_pair_layer
        hidden = encoder.config.hidden_size
        self.pooler = build_pooler(pooling, hidden)
        dim = self.pooler.dim
        pair_head = PAIR_HEADS.get(bi_head)
        pair_width = hidden if pair_head.reads_tokens else dim
        bi_tasks = [t for t in tasks if self.pair_encoding[t.name] == "bi"]
        # Optional first layer shared by all bi-encoded pair tasks (paper 003: Para and STS).
        self.shared_pair = None
        if shared_pair_layer and pair_head.n_features and len(bi_tasks) > 1:
            self.shared_pair = nn.Sequential(nn.Linear(pair_head.n_features * pair_width, shared_pair_layer),
                                             nn.LeakyReLU())
        heads = {}
        for t in tasks:
            out_dim, mode = t.kind.out_dim(t.num_labels), self.pair_encoding[t.name]
            regression = not t.kind.distribution  # the head emits the score itself
            if mode == "bi":
                if pair_head.single_output and out_dim != 1:
                    raise ConfigError(f"the {bi_head} head gives one score; task {t.name} needs {out_dim} outputs")
                heads[t.name] = pair_head(pair_width, out_dim, dropout, regression=regression, shared=self.shared_pair)
            elif mode == "cross+cos":
                heads[t.name] = CrossPlusCosineHead(dim, out_dim, dropout, regression)
            elif mode == "cross" or (mode == "single" and not t.is_pair):
                heads[t.name] = LinearHead(dim, out_dim, dropout)
            else:
                raise ConfigError(f"pair encoding for {t.name} must be one of {PAIR_ENCODINGS}, got {mode!r}")
            if regression and t.label_range and mode in ("cross", "single"):  # start mid-range
                nn.init.constant_(heads[t.name].proj.bias, sum(t.label_range) / 2)
        self.heads = nn.ModuleDict(heads)
        self.extensions: dict[str, dict] = {}  # structural changes applied (modeling.extensions)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters every task uses: the encoder, the pooler and a shared pair layer
        (what gradient combiners such as PCGrad operate on). Heads belong to one task each."""
        shared = [self.encoder, self.pooler] + ([self.shared_pair] if self.shared_pair is not None else [])
        return [p for m in shared for p in m.parameters() if p.requires_grad]

    def encode(self, inputs: dict, inputs_embeds=None) -> Rep:
        out = self.encoder(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
                           inputs_embeds=inputs_embeds)
        return Rep(self.pooler(out, inputs["attention_mask"]), out["last_hidden_state"], inputs["attention_mask"])

    def embed(self, inputs: dict, inputs_embeds=None) -> torch.Tensor:
        """Pooled sentence vectors of one padded batch."""
        return self.encode(inputs, inputs_embeds).vec

    def forward(self, task: str, inputs: list[dict], inputs_embeds: list | None = None) -> torch.Tensor:
        """Logits (or scores) for one batch of `task`. `inputs` holds the padded sequence batches the
        task's encoding needs (one; two for bi-encoding; pair then each side for cross+cos);
        `inputs_embeds` optionally replaces their word embeddings."""
        embeds = inputs_embeds or [None] * len(inputs)
        return self.heads[task](*[self.encode(x, e) for x, e in zip(inputs, embeds)])
