"""The end-of-run evaluation: which model a run deploys, and its perplexity beside the training-time model's.

A method merges either into integer layers (L4Q, DL-QAT, QA-LoRA, PTQ, QAT: the merged model *is* the deployed
one) or into a float model (LoRA, QLoRA, LoftQ, QAT-LoRA), which is deployed by round-to-nearest PTQ at the run's
bits and group size, the papers' "+PTQ" rows (and, on request, by GPTQ: "+GPTQ"). The merge happens in place:
the training-time model is scored first, then becomes the merged model layer by layer, so the merge costs about
one layer of memory instead of a second model. Which form is deployed follows the one rule
:func:`qaft.deploy.packed.is_integer_model` (:func:`qaft.deploy.merged.deploy_merged`), which ``qaft-eval
run_dir=...`` and ``qaft-export`` apply too. :func:`end_of_run` returns an :class:`EndOfRun`: the per-window NLL
of each :class:`ModelForm` it scored (:class:`qaft.evaluation.perplexity.ItemNLL`, whose value is the perplexity),
keyed by the form, and which one is deployed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch import nn

from qaft.deploy.merged import MERGED_FORM, MERGED_PTQ_FORM, deploy_merged, deployed_form
from qaft.deploy.packed import is_integer_model
from qaft.evaluation.perplexity import Batch, ItemNLL, batches_scores
from qaft.methods import merge_model, ptq_model
from qaft.progress import say


class ModelForm(Enum):
    """A model scored at the end of a run; the value is its perplexity's key in a run record's ``metrics``."""

    TRAINED = "ppl_trained"  # the training-time model
    MERGED = "ppl_merged"  # merged (equal to TRAINED up to float rounding for integer methods)
    MERGED_PTQ = "ppl_merged_ptq"  # a float merge after RTN at the run's bits / group size (the papers' "+PTQ")
    MERGED_GPTQ = "ppl_merged_gptq"  # a float merge after GPTQ ("+GPTQ", eval.gptq)
    FLOAT = "ppl_float"  # the untouched model (eval.baselines)
    PTQ = "ppl_ptq"  # its RTN
    PTQ_GPTQ = "ppl_ptq_gptq"  # its GPTQ

    @property
    def key(self) -> str:
        return self.value

    @property
    def label(self) -> str:
        """``merged_ptq``: how progress lines name it."""
        return self.name.lower()


# deployed_form()'s names of the two deployed forms
DEPLOYED_FORMS = {MERGED_FORM: ModelForm.MERGED, MERGED_PTQ_FORM: ModelForm.MERGED_PTQ}


@dataclass
class EndOfRun:
    """What :func:`end_of_run` scored (per-window NLL per form), whether the merge is integer, and the deployed
    model."""

    items: dict[ModelForm, ItemNLL]
    integer_merge: bool
    deployed: nn.Module
    bits: int
    group_size: int
    # A bit-exact method's training-time model is scored on the first batch only and compared with the merged
    # model's scores of it: {"windows": n, "bit_equal": bool}; None where it was scored in full.
    trained_check: dict[str, Any] | None = None

    @property
    def perplexity(self) -> dict[ModelForm, float]:
        return {form: scores.perplexity for form, scores in self.items.items()}

    @property
    def deployed_form(self) -> ModelForm:
        return ModelForm.MERGED if self.integer_merge else ModelForm.MERGED_PTQ

    @property
    def deployment(self) -> dict[str, Any]:
        """The record's ``metrics.deployed``: ``{"form": "merged"}`` or ``merged+ptq`` and its RTN settings."""
        return deployed_form(self.integer_merge, self.bits, self.group_size)

    def metrics(self) -> dict[str, Any]:
        """The perplexities under their record keys, and ``trained_vs_merged`` where the trained model was only
        compared with the merged one."""
        checked = {} if self.trained_check is None else {"trained_vs_merged": self.trained_check}
        return {form.key: value for form, value in self.perplexity.items()} | checked

    @property
    def trained_is_merged(self) -> bool:
        """The training-time model's scores are the merged model's (compared bit for bit, not scored twice)."""
        return self.trained_check is not None and self.trained_check["bit_equal"]

    def table(self, method: str) -> str:
        return format_table(self.perplexity, self.deployed_form, method, self.bits, self.group_size)


def deployed_perplexity(metrics: dict[str, Any]) -> float | None:
    """The deployed model's perplexity from a run record's ``metrics``: the form its ``deployed`` entry names
    (records written before that entry existed deployed ``merged_ptq`` exactly where they scored it)."""
    deployed = metrics.get("deployed")
    name = deployed.get("form") if isinstance(deployed, dict) else None
    if name in DEPLOYED_FORMS:
        form = DEPLOYED_FORMS[name]
    else:
        form = ModelForm.MERGED_PTQ if ModelForm.MERGED_PTQ.key in metrics else ModelForm.MERGED
    value = metrics.get(form.key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _trained_vs_merged(probe: ItemNLL, results: dict[ModelForm, ItemNLL]) -> dict[str, Any]:
    """Whether the merged model scores the probed windows bit for bit as the trained one did; if so its scores
    stand for both (``ppl_trained`` is then ``ppl_merged``), else ``ppl_trained`` is not recorded."""
    merged, n = results[ModelForm.MERGED], len(probe.tokens)
    equal = probe.nll_sum == merged.nll_sum[:n] and probe.tokens == merged.tokens[:n]
    if equal:
        results[ModelForm.TRAINED] = merged
    else:
        say(f"perplexity [trained]: the merged model differs from the trained one on the first {n} windows "
            "(a merge that should be bit-exact); ppl_trained is not recorded")
    return {"windows": n, "bit_equal": equal}


def end_of_run(model: nn.Module, batches: list[Batch], bits: int, group_size: int,
               load_float: Callable[[], nn.Module] | None,
               gptq: Callable[[nn.Module], nn.Module] | None = None,
               on_merged: Callable[[nn.Module], None] | None = None, bit_exact: bool = False,
               autocast: str | None = None) -> EndOfRun:
    """Perplexities at the end of a run and the deployed model; ``model`` is merged in place (consumed).

    Scores :attr:`ModelForm.TRAINED` and ``MERGED``; for a float merge, ``MERGED_PTQ`` (and ``MERGED_GPTQ`` when
    ``gptq``, a float model in and a quantized copy out, is given); ``FLOAT`` and ``PTQ`` (``PTQ_GPTQ``) when
    ``load_float`` is given. ``on_merged`` sees the merged model before a float merge is quantized (to save it).
    ``bit_exact`` (the method's trait): the trained model is scored on the first batch only, and its scores are
    the merged model's where those agree bit for bit on it (:attr:`EndOfRun.trained_check`). ``autocast``: the
    precision every form is scored in (:func:`qaft.evaluation.perplexity.scoring_precision`).
    """
    def score(form: ModelForm, scored: nn.Module) -> None:
        results[form] = batches_scores(scored, batches, f"perplexity [{form.label}]", autocast)

    results: dict[ModelForm, ItemNLL] = {}
    probe = batches_scores(model, batches[:1], "perplexity [trained, first batch]", autocast) if bit_exact else None
    if probe is None:
        score(ModelForm.TRAINED, model)
    merged = merge_model(model, inplace=True)
    score(ModelForm.MERGED, merged)
    check = None if probe is None else _trained_vs_merged(probe, results)
    if on_merged is not None:
        on_merged(merged)
    integer_merge = is_integer_model(merged)
    deployed = merged
    if not integer_merge:
        if gptq is not None:
            score(ModelForm.MERGED_GPTQ, gptq(merged))
        deployed, _ = deploy_merged(merged, bits, group_size)
        score(ModelForm.MERGED_PTQ, deployed)
    if load_float is not None:
        base = load_float()
        score(ModelForm.FLOAT, base)
        if gptq is not None:
            score(ModelForm.PTQ_GPTQ, gptq(base))
        score(ModelForm.PTQ, ptq_model(base, bits, group_size, inplace=True))
        del base
    return EndOfRun(results, integer_merge, deployed, int(bits), int(group_size), check)


def format_table(results: dict[ModelForm, float], deployed: ModelForm, method: str, bits: int, group_size: int) -> str:
    """The short table printed at the end of a run."""
    group = "per-channel" if group_size == -1 else f"g{group_size}"
    rows = [("float (no quantization)", results.get(ModelForm.FLOAT)),
            (f"PTQ round-to-nearest w{bits} {group}", results.get(ModelForm.PTQ)),
            (f"PTQ GPTQ w{bits} {group}", results.get(ModelForm.PTQ_GPTQ)),
            (f"{method} merged (deployed) w{bits} {group}", results.get(deployed)),
            (f"{method} merged + GPTQ w{bits} {group}", results.get(ModelForm.MERGED_GPTQ)),
            (f"{method} training-time model", results.get(ModelForm.TRAINED))]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'model'.ljust(width)}  perplexity", f"{'-' * width}  ----------"]
    lines += [f"{name.ljust(width)}  {value:10.3f}" for name, value in rows if value is not None]
    return "\n".join(lines)
