"""Request and response bodies of the API, and the route adapters: /v1/sentiment, /v1/paraphrase
and /v1/similarity answer a task that declares that `route:` (core/builtin_tasks.yaml), each in
its own response shape, over the same prediction as /v1/tasks/{task}."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mtbert.core.registry import Registry
from mtbert.core.tasks import TaskSpec

# Characters that show nothing on their own: spaces and line breaks, format characters (zero-width
# space and joiners, BOM) and combining marks. A text of only these is blank.
INVISIBLE = {"Zs", "Zl", "Zp", "Cc", "Cf", "Mn", "Me"}


def is_blank(text: str) -> bool:
    return all(c.isspace() or unicodedata.category(c) in INVISIBLE for c in text)

class TextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, examples=[["A gripping, funny and moving film."]])


class PairsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[tuple[str, str]] = Field(min_length=1, examples=[[["How do I learn Python?",
                                                                  "What is the best way to learn Python?"]]])


class TaskRequest(BaseModel):
    """Any task of the run: `texts` for a single-sentence task, `pairs` for a pair task."""
    model_config = ConfigDict(extra="forbid")
    texts: list[str] | None = Field(default=None, min_length=1, examples=[["A gripping, funny and moving film."]])
    pairs: list[tuple[str, str]] | None = Field(default=None, min_length=1)


class TaskResponse(BaseModel):
    task: str
    results: list[dict] = Field(description="per item: label, label_index and probabilities (or probability, "
                                            "binary), or score; and truncated")


class SentimentResult(BaseModel):
    label: int
    label_name: str
    probability: float = Field(description="probability of the predicted label")
    probabilities: list[float] = Field(description="one per label, in label order (see /v1/info)")
    truncated: bool


class ParaphraseResult(BaseModel):
    probability: float
    is_paraphrase: bool
    truncated: bool


class SimilarityResult(BaseModel):
    score: float = Field(description="0 (unrelated) to 5 (same meaning)")
    truncated: bool


class SentimentResponse(BaseModel):
    task: str
    results: list[SentimentResult]


class ParaphraseResponse(BaseModel):
    task: str
    results: list[ParaphraseResult]


class SimilarityResponse(BaseModel):
    task: str
    results: list[SimilarityResult]


# ---------------------------------------------------------------- route adapters

@dataclass(frozen=True)
class RouteAdapter:
    """A named route over one task: what it takes, which tasks it fits, and its answer's shape."""
    name: str
    request: type[BaseModel]
    response: type[BaseModel]
    results: Callable[[TaskSpec, dict, list[bool]], list]  # the task's outputs -> the response's results
    fits: Callable[[TaskSpec], bool]             # a task this route's response shape can carry

    @property
    def field(self) -> str:
        return "pairs" if "pairs" in self.request.model_fields else "texts"


def _sentiment(spec: TaskSpec, out: dict, truncated: list[bool]) -> list:
    names, results = spec.label_names, []
    for i, cut in enumerate(truncated):
        label, probs = int(out["pred"][i]), [float(p) for p in out["prob"][i]]
        results.append(SentimentResult(label=label, label_name=names[label] if names else str(label),
                                       probability=probs[label], probabilities=probs, truncated=cut))
    return results


def _paraphrase(spec: TaskSpec, out: dict, truncated: list[bool]) -> list:
    return [ParaphraseResult(probability=float(out["prob"][i]), is_paraphrase=bool(out["pred"][i]), truncated=cut)
            for i, cut in enumerate(truncated)]


def _similarity(spec: TaskSpec, out: dict, truncated: list[bool]) -> list:
    # a regression head can overshoot the gold range; clip to the scale the API promises
    scores = np.clip(np.asarray(out["score"], dtype=np.float64), *spec.label_range)
    return [SimilarityResult(score=float(s), truncated=cut) for s, cut in zip(scores, truncated)]


ROUTE_ADAPTERS: Registry[RouteAdapter] = Registry("route", hint="a task definition's `route:`")
ROUTE_ADAPTERS.register(RouteAdapter(
    "sentiment", TextsRequest, SentimentResponse, _sentiment,
    fits=lambda spec: not spec.is_pair and spec.kind.distribution and spec.kind.positive_class is None),
    name="sentiment")
ROUTE_ADAPTERS.register(RouteAdapter(
    "paraphrase", PairsRequest, ParaphraseResponse, _paraphrase,
    fits=lambda spec: spec.is_pair and spec.kind.positive_class is not None), name="paraphrase")
ROUTE_ADAPTERS.register(RouteAdapter(
    "similarity", PairsRequest, SimilarityResponse, _similarity,
    fits=lambda spec: spec.is_pair and spec.kind.scores and spec.label_range is not None), name="similarity")
