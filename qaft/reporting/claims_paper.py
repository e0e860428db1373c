"""The papers' own numbers beside a claim's verdict: the optional ``paper:`` field of a claim
(:mod:`qaft.reporting.claims`).

A claim tested at paper scale (``experiments/claims/paper/*.yaml``) may carry what the paper printed for its two
sides, so that a sweep's verdict table reads against the paper::

    paper:
      a: 44.6                      # the paper's number for side a, as printed: accuracy in % (0-100),
      b: 42.5                      #   perplexity as is (> 0); side b likewise
      table: 'DL-QAT Table 1, rows "Ours 4" and "QA-LoRA* 4", column MMLU 0-Shot'   # where they are printed
      model: LLaMA2-7B             # optional: the model the paper's numbers are of
      protocol:                    # how the paper measured them
        metric: acc                # acc | acc_norm (accuracy claims: must be the claim's own metric);
                                   #   token_perplexity | word_perplexity (perplexity claims)
        shots: 0                   # few-shot examples per question (required for accuracy claims)
        context: 2048              # optional: the longest input in tokens the paper's evaluation gave the model
        window: 2048               # optional, perplexity only: the tokens of one scored window of the corpus

Only what is known of the paper's evaluation goes in (from the paper, or where it is silent the papers' common
protocol in METHODS.md's "Evaluation in the papers", said so in the claim file); a key nothing states is left
out (no paper of the seeds states its lm-eval context length). Every key
is checked when the claim file is read (:class:`~qaft.reporting.claims.ClaimError`, one line naming the claim
and the field): an unknown key, a number that is not a number (or out of range), a missing ``a`` / ``b`` /
``table`` / ``protocol.metric``, an accuracy claim without ``shots``, or a protocol metric that is not the
claim's (a paper's ``acc_norm`` against our ``acc`` compares two different numbers).

The paper's effect is computed as ours (:func:`qaft.reporting.claims.evaluate`), same sign convention (> 0: the
claim's direction holds): ``log(b / a)`` for perplexities where lower is claimed better (``log(a / b)`` where
higher is), ``a - b`` points for accuracies where higher is (``b - a`` where lower is). ``paper_in_ci`` says
whether the paper's effect lies inside our 95% interval: the paper's size of the effect reproduced, not merely
its direction. A ``word_perplexity`` log ratio is not on the scale of our token perplexity's (it is larger by the
tokens-per-word ratio): compare signs then, not sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PAPER_KEYS = ("a", "b", "table", "model", "protocol")
PROTOCOL_KEYS = ("metric", "shots", "context", "window")
PROTOCOL_METRICS = {"accuracy": ("acc", "acc_norm"), "perplexity": ("token_perplexity", "word_perplexity")}


class PaperError(ValueError):
    """A bad ``paper:`` field; the message names the field (``paper.protocol.shots``), the caller the claim."""


@dataclass(frozen=True)
class Protocol:
    """How the paper measured its numbers (module doc)."""

    metric: str
    shots: int | None = None
    context: int | None = None
    window: int | None = None

    def text(self) -> str:
        """``acc, 0-shot``; ``token_perplexity, 2048-token windows, context 2048``."""
        parts = [self.metric]
        parts += [f"{self.shots}-shot"] if self.shots is not None else []
        parts += [f"{self.window}-token windows"] if self.window is not None else []
        parts += [f"context {self.context}"] if self.context is not None else []
        return ", ".join(parts)


@dataclass(frozen=True)
class PaperNumbers:
    """A claim's two sides as the paper printed them, where, on which model, and how measured."""

    a: float
    b: float
    table: str
    protocol: Protocol
    model: str = ""

    def effect(self, kind: str, better: str) -> float:
        """The paper's effect, as :func:`qaft.reporting.claims.evaluate` computes ours (module doc)."""
        sign = -1.0 if better == "lower" else 1.0
        if kind == "perplexity":
            return sign * (math.log(self.a) - math.log(self.b))
        return sign * (self.a - self.b)

    def row(self, kind: str, better: str, ci: tuple[float | None, float | None]) -> dict[str, Any]:
        """The ``paper_*`` entries of a claim's row; ``paper_in_ci`` None where we have no interval."""
        effect = self.effect(kind, better)
        low, high = ci
        inside = None if low is None or high is None else bool(low <= effect <= high)
        protocol = {k: v for k, v in vars(self.protocol).items() if v is not None}
        return {"paper_a": self.a, "paper_b": self.b, "paper_effect": effect, "paper_in_ci": inside,
                "paper_table": self.table, "paper_model": self.model, "paper_protocol": protocol}


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PaperError(f"{name} {value!r} is not a number")
    return float(value)


def _count(protocol: dict[str, Any], key: str, least: int) -> int | None:
    value = protocol.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise PaperError(f"paper.protocol.{key} {value!r} is not a whole number >= {least}")
    return value


def _protocol(node: Any, kind: str, metric_names: set[str]) -> Protocol:
    if not isinstance(node, dict):
        raise PaperError(f"paper.protocol must be a mapping of {', '.join(PROTOCOL_KEYS)}")
    unknown = sorted(set(node) - set(PROTOCOL_KEYS))
    if unknown:
        raise PaperError(f"unknown field 'paper.protocol.{unknown[0]}' (keys: {', '.join(PROTOCOL_KEYS)})")
    metric = node.get("metric")
    if metric not in PROTOCOL_METRICS[kind]:
        raise PaperError(f"paper.protocol.metric {metric!r} is not one of {', '.join(PROTOCOL_METRICS[kind])} "
                         f"(a {kind} claim)")
    if kind == "accuracy" and metric_names != {metric}:
        raise PaperError(f"paper.protocol.metric {metric!r} is not the claim's metric "
                         f"({' / '.join(sorted(metric_names))}): compare like with like")
    if kind == "accuracy" and node.get("shots") is None:
        raise PaperError("paper.protocol.shots is missing (an accuracy claim: how many examples per question)")
    if kind == "accuracy" and node.get("window") is not None:
        raise PaperError("paper.protocol.window is for perplexity claims only")
    return Protocol(metric, _count(node, "shots", 0), _count(node, "context", 1), _count(node, "window", 1))


def parse_paper(node: Any, kind: str, metrics: tuple[str, str]) -> PaperNumbers:
    """A claim's ``paper:`` field, checked (module doc); ``kind`` is the claim's (``perplexity`` / ``accuracy``),
    ``metrics`` its sides' record keys. :class:`PaperError` names the bad field."""
    if not isinstance(node, dict):
        raise PaperError(f"paper must be a mapping of {', '.join(PAPER_KEYS)}")
    unknown = sorted(set(node) - set(PAPER_KEYS))
    if unknown:
        raise PaperError(f"unknown field 'paper.{unknown[0]}' (keys: {', '.join(PAPER_KEYS)})")
    for key in ("a", "b", "table", "protocol"):
        if key not in node:
            raise PaperError(f"paper.{key} is missing")
    a, b = (_number(node[s], f"paper.{s}") for s in ("a", "b"))
    for side, value in (("a", a), ("b", b)):
        if kind == "perplexity" and value <= 0:
            raise PaperError(f"paper.{side} {value!r} is not a perplexity (> 0)")
        if kind == "accuracy" and not 0 <= value <= 100:
            raise PaperError(f"paper.{side} {value!r} is not an accuracy in % (0-100)")
    for key in ("table", "model"):
        if key in node and (not isinstance(node[key], str) or not node[key].strip()):
            raise PaperError(f"paper.{key} {node[key]!r} is not a non-empty text")
    names = {m.rsplit(".", 1)[-1] for m in metrics}
    return PaperNumbers(a, b, node["table"], _protocol(node["protocol"], kind, names), node.get("model", ""))
