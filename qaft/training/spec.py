"""The typed run spec: what a validated config means, read once, so the pipeline never looks into raw ``cfg``.

:func:`qaft.training.config.validate` checks the composed config and returns :func:`run_spec` of it. Lightning's
Trainer and the DataModule are still built from their config nodes (``instantiate``: Hydra's business), and the
resolved config is what ``config.yaml`` and the identity hold; every other value the pipeline needs is here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qaft.methods import GPTQOptions, MethodConfig


def _opt(value: Any, kind: type) -> Any:
    return None if value is None else kind(value)


@dataclass(frozen=True)
class CorpusSpec:
    """``eval.corpus``: a second perplexity corpus for the deployed model (``metrics.ppl_<name>``)."""

    name: str
    source: str
    config: str | None
    split: str
    seq_len: int
    batch_size: int
    max_tokens: int | None

    @classmethod
    def of(cls, node: Any) -> "CorpusSpec | None":
        if not node:
            return None
        return cls(str(node.name), str(node.source), _opt(node.get("config"), str), str(node.split),
                   int(node.seq_len), int(node.batch_size), _opt(node.get("max_tokens"), int))


@dataclass(frozen=True)
class EvalSpec:
    """``eval``: the end-of-run perplexities (held-out split of the run's data), baselines, GPTQ, lm-eval."""

    split: str
    seq_len: int
    max_tokens: int | None
    max_batches: int | None
    batch_size: int
    baselines: bool
    gptq: GPTQOptions | None
    corpus: CorpusSpec | None
    tasks: tuple[str, ...]
    lm_eval: dict[str, Any]  # batch_size, max_length, limit
    autocast: str | None = None  # the precision scoring runs in (qaft.evaluation.perplexity.scoring_precision)


@dataclass(frozen=True)
class RunSpec:
    """A validated run: the method config and the bits / group size it is deployed at, and the run's settings."""

    method: MethodConfig
    bits: int
    group_size: int
    seed: int
    max_steps: int
    model: str  # model.name_or_path
    dtype: str  # model.dtype
    data_name: str
    data_kind: str  # lm | instruct
    data_source: str
    data_config: str | None
    eval: EvalSpec
    save_model: bool
    resume: str  # auto | never | a checkpoint path
    progress_every_n_steps: int
    progress_every_s: float
    divergence_loss_vs_uniform: float | None
    checkpoint_every_n_steps: int

    @property
    def eval_gptq(self) -> GPTQOptions | None:
        return self.eval.gptq


def _eval_spec(node: DictConfig, gptq: GPTQOptions | None) -> EvalSpec:
    lm = OmegaConf.to_container(node.lm_eval, resolve=True) if node.get("lm_eval") else {}
    return EvalSpec(split=str(node.split), seq_len=int(node.seq_len), max_tokens=_opt(node.get("max_tokens"), int),
                    max_batches=_opt(node.get("max_batches"), int), batch_size=int(node.batch_size),
                    baselines=bool(node.baselines), gptq=gptq, corpus=CorpusSpec.of(node.get("corpus")),
                    tasks=tuple(str(t) for t in node.get("tasks") or ()),
                    lm_eval={"batch_size": 8, "max_length": 2048, "limit": None} | lm,
                    autocast=_opt(node.get("autocast"), str))


def run_spec(cfg: DictConfig, method: MethodConfig, bits: int, group_size: int,
             eval_gptq: GPTQOptions | None) -> RunSpec:
    """The spec of a config whose values :func:`qaft.training.config.validate` has checked."""
    progress = {"every_n_steps": 10, "every_s": 30.0} | dict(cfg.get("progress") or {})
    limit = OmegaConf.select(cfg, "divergence.loss_vs_uniform")
    return RunSpec(
        method=method, bits=bits, group_size=group_size, seed=int(cfg.seed), max_steps=int(cfg.trainer.max_steps),
        model=str(cfg.model.name_or_path), dtype=str(cfg.model.dtype), data_name=str(cfg.data.name),
        data_kind=str(cfg.data.kind), data_source=str(cfg.data.source), data_config=_opt(cfg.data.get("config"), str),
        eval=_eval_spec(cfg.eval, eval_gptq), save_model=bool(cfg.save_model), resume=str(cfg.get("resume", "auto")),
        progress_every_n_steps=int(progress["every_n_steps"]), progress_every_s=float(progress["every_s"]),
        divergence_loss_vs_uniform=_opt(limit, float),
        checkpoint_every_n_steps=int(OmegaConf.select(cfg, "checkpoint.every_n_steps", default=10)))


__all__ = ["CorpusSpec", "EvalSpec", "RunSpec", "run_spec"]
