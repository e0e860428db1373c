"""The end of a run: the held-out perplexities of every model form, the deployed model, a second corpus and
lm-eval tasks, from the run's typed spec (:mod:`qaft.training.spec`). What is scored and deployed is
:func:`qaft.evaluation.deployed.end_of_run`; this module only feeds it the run's data and settings. Each score
comes with its items (per-window NLL, per-question outcomes) under the record key a report reads it by
(:func:`form_items`), for the run folder's ``item_scores`` (:mod:`qaft.run_folder`). A bit-exact method's
training-time model is not scored twice: its first batch is compared with the merged model's
(:func:`qaft.evaluation.deployed.end_of_run`) and ``ppl_trained`` names the merged scores.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qaft.data import lm_eval_windows, load_lm_texts
from qaft.data.stream import RunData
from qaft.deploy.merged import save_merged
from qaft.evaluation.deployed import EndOfRun, ModelForm, end_of_run
from qaft.evaluation.perplexity import Batch, ItemNLL, batches_scores, scoring_precision, window_batches
from qaft.methods import gptq_quantize_model
from qaft.models import load_causal_lm
from qaft.training.module import QaftModule
from qaft.training.records import Diverged
from qaft.training.spec import CorpusSpec, RunSpec

if TYPE_CHECKING:  # lm-eval's wrapper is imported only by runs that evaluate tasks
    from qaft.evaluation.harness import TaskScores


def _lm_batches(spec: RunSpec, tokenizer: Any, data: RunData) -> list[Batch]:
    data.setup("test")  # a run that trained has read its data already; one that did not (PTQ) reads it now
    # the documents the data module parsed (and digested), not a second read that could meet an edited file
    texts = data.inner.texts[spec.eval.split]
    windows = lm_eval_windows(tokenizer, texts, spec.eval.seq_len, spec.eval.max_tokens)
    return window_batches(windows, spec.eval.batch_size)


def _instruct_batches(spec: RunSpec, tokenizer: Any, data: RunData) -> list[Batch]:
    data.inner.setup("test")
    loaders = {"test": data.inner.test_dataloader, "validation": data.inner.val_dataloader}
    batches = list(loaders[spec.eval.split]())
    return batches[: spec.eval.max_batches] if spec.eval.max_batches else batches


EVAL_SETS = {"lm": _lm_batches, "instruct": _instruct_batches}


def _gptq_deployment(spec: RunSpec, data: RunData) -> Callable[[torch.nn.Module], torch.nn.Module] | None:
    """GPTQ of a float model at the run's bits / group size on training batches (``eval.gptq``), or None."""
    options = spec.eval.gptq
    if options is None:
        return None
    return functools.partial(gptq_quantize_model, calib_batches=data.calibration_batches(options.calib_batches),
                             bits=spec.bits, group_size=spec.group_size, act_order=options.act_order,
                             percdamp=options.percdamp)


def scored_on(spec: RunSpec, tokens: int) -> str:
    """The line under the run's table: what its perplexities were measured on. A perplexity depends on the window
    length (a window's first tokens are predicted from little context), so ``qaft-eval``'s default 2,048-token
    windows give a lower number than the run's own 512 on the same model: both are right, this says which."""
    held_out = f"{spec.data_name} {spec.eval.split}"
    if spec.data_kind == "lm":
        return f"perplexity on {held_out}: {spec.eval.seq_len}-token windows (eval.seq_len), {tokens} tokens scored"
    return f"perplexity on {held_out}: the responses' tokens, {tokens} scored"


def evaluate(spec: RunSpec, module: QaftModule, data: RunData,
             staged: Path | None) -> tuple[EndOfRun, int, dict[str, str]]:
    """The end-of-run scores, the number of held-out tokens, and the digests of the merged model's files, saved to
    ``staged`` (if given) before a float merge is quantized for deployment."""
    batches = EVAL_SETS[spec.data_kind](spec, module.tokenizer, data)
    device = next(module.model.parameters()).device
    saved: dict[str, str] = {}

    def load_float() -> torch.nn.Module:
        return load_causal_lm(spec.model, getattr(torch, spec.dtype))[0].to(device)

    def save(merged: torch.nn.Module) -> None:
        saved.update(save_merged(merged, staged, module.tokenizer))

    result = end_of_run(module.model, batches, spec.bits, spec.group_size,
                        load_float if spec.eval.baselines else None, _gptq_deployment(spec, data),
                        save if staged is not None else None, bit_exact=module.method.traits.bit_exact,
                        autocast=spec.eval.autocast)
    tokens = sum(int((b.get("labels", b["input_ids"])[:, 1:] != -100).sum()) for b in batches)
    return result, tokens, saved


Items = dict[str, list[dict[str, Any]]]  # record key (``metrics.ppl_merged``) -> item-score rows


def form_items(result: EndOfRun) -> tuple[Items, dict[str, str]]:
    """Every scored form's per-window NLL under its record key, and ``metrics.deployed`` as an alias of the
    deployed form's (the key a report reads the deployed perplexity by)."""
    same = {ModelForm.TRAINED} if result.trained_is_merged else set()
    items = {f"metrics.{form.key}": scores.rows() for form, scores in result.items.items() if form not in same}
    aliases = {f"metrics.{form.key}": f"metrics.{ModelForm.MERGED.key}" for form in same}
    return items, aliases | {"metrics.deployed": f"metrics.{result.deployed_form.key}"}


def corpus_perplexity(corpus: CorpusSpec, deployed: torch.nn.Module, tokenizer: Any,
                      read: dict[str, str], autocast: str | None = None) -> dict[str, ItemNLL]:
    """``eval.corpus``: the deployed model's perplexity on a second corpus (the papers' WikiText-2, 2048-token
    windows, while the run trains on instructions), as ``ppl_<name>``; ``read`` collects the digests of the local
    files it parsed; the value is per-window NLL (its ``perplexity`` is the reported one)."""
    texts = load_lm_texts(corpus.source, corpus.config, read=read)[corpus.split]
    windows = lm_eval_windows(tokenizer, texts, corpus.seq_len, corpus.max_tokens)
    batches = window_batches(windows, corpus.batch_size)
    return {f"ppl_{corpus.name}": batches_scores(deployed, batches, f"perplexity [{corpus.name}]", autocast)}


def lm_eval(spec: RunSpec, deployed: torch.nn.Module, tokenizer: Any, form: str) -> TaskScores:
    """The config's lm-eval tasks on the deployed model, with the harness settings recorded beside them, and
    every document's outcome."""
    from qaft.evaluation.harness import evaluate_tasks

    opts = spec.eval.lm_eval
    with scoring_precision(deployed, spec.eval.autocast):
        return evaluate_tasks(deployed, tokenizer, list(spec.eval.tasks), batch_size=int(opts["batch_size"]),
                              max_length=int(opts["max_length"]), model_form=form, limit=opts["limit"])


def check_finite(perplexities: dict[str, float]) -> None:
    bad = sorted(k for k, v in perplexities.items() if not math.isfinite(v))
    if bad:
        raise Diverged(f"non-finite final metric(s) {bad}: the deployed model's outputs are not finite")


__all__ = ["EVAL_SETS", "Items", "check_finite", "corpus_perplexity", "evaluate", "form_items", "lm_eval"]
