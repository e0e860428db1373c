"""The end-of-run evaluation: which model a run deploys, and its perplexity beside the training-time model's.

A method merges either into integer layers (L4Q, DL-QAT, QA-LoRA, PTQ, QAT: the merged model *is* the deployed
one) or into a float model (LoRA, QLoRA, LoftQ, QAT-LoRA), which is deployed by round-to-nearest PTQ at the run's
bits and group size, the papers' "+PTQ" rows (and, on request, by GPTQ: "+GPTQ"). The merge happens in place:
the training-time model is scored first, then becomes the merged model layer by layer, so the merge costs about
one layer of memory instead of a second model. The rule for the "+PTQ" deployment is
:func:`qaft.deploy.checkpoint.deploy_merged`, which ``qaft-eval run_dir=...`` and ``qaft-export`` apply too.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from qaft.deploy.checkpoint import deploy_merged, is_integer_model
from qaft.evaluation.perplexity import Batch, batches_perplexity
from qaft.methods import merge_model, ptq_model


def deployed_key(results: dict[str, Any]) -> str:
    """The one rule for which result describes the deployed model: ``merged``, or ``merged_ptq`` where the
    merge is float (keys as :func:`end_of_run` returns them; records prefix them with ``ppl_``)."""
    return "merged_ptq" if "merged_ptq" in results else "merged"


def deployed_perplexity(metrics: dict[str, Any]) -> float | None:
    """The deployed model's perplexity from a run record's ``metrics`` (``ppl_`` keys)."""
    return metrics.get("ppl_" + deployed_key({k[4:]: v for k, v in metrics.items() if k.startswith("ppl_")}))


def end_of_run(model: nn.Module, batches: list[Batch], bits: int, group_size: int,
               load_float: Callable[[], nn.Module] | None,
               gptq: Callable[[nn.Module], nn.Module] | None = None,
               on_merged: Callable[[nn.Module], None] | None = None) -> tuple[dict[str, float], nn.Module]:
    """Perplexities at the end of a run and the deployed model; ``model`` is merged in place (consumed).

    ``trained``: the training-time model; ``merged``: the merged one (equal to ``trained`` up to float rounding
    for integer methods); ``merged_ptq``: a float merge quantized by RTN at ``bits`` / ``group_size`` (the papers'
    "+PTQ"); ``float`` and ``ptq``: the untouched model and its plain RTN, when ``load_float`` is given.
    ``gptq`` (a float model in, a quantized copy out) adds the same two deployments by GPTQ: ``merged_gptq`` and
    ``ptq_gptq``. ``on_merged`` sees the merged model before a float merge is quantized (to save it).
    """
    def score(name: str, scored: nn.Module) -> None:
        results[name] = batches_perplexity(scored, batches, f"perplexity [{name}]")

    results: dict[str, float] = {}
    score("trained", model)
    merged = merge_model(model, inplace=True)
    score("merged", merged)
    if on_merged is not None:
        on_merged(merged)
    deployed = merged
    if not is_integer_model(merged):
        if gptq is not None:
            score("merged_gptq", gptq(merged))
        deployed, _ = deploy_merged(merged, bits, group_size)
        score("merged_ptq", deployed)
    if load_float is not None:
        base = load_float()
        score("float", base)
        if gptq is not None:
            score("ptq_gptq", gptq(base))
        score("ptq", ptq_model(base, bits, group_size, inplace=True))
        del base
    return results, deployed


def format_table(results: dict[str, float], method: str, bits: int, group_size: int) -> str:
    """The short table printed at the end of a run."""
    group = "per-channel" if group_size == -1 else f"g{group_size}"
    rows = [("float (no quantization)", results.get("float")),
            (f"PTQ round-to-nearest w{bits} {group}", results.get("ptq")),
            (f"PTQ GPTQ w{bits} {group}", results.get("ptq_gptq")),
            (f"{method} merged (deployed) w{bits} {group}", results.get(deployed_key(results))),
            (f"{method} merged + GPTQ w{bits} {group}", results.get("merged_gptq")),
            (f"{method} training-time model", results.get("trained"))]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'model'.ljust(width)}  perplexity", f"{'-' * width}  ----------"]
    lines += [f"{name.ljust(width)}  {value:10.3f}" for name, value in rows if value is not None]
    return "\n".join(lines)
