"""lm-eval on qaft models, in memory: quantized layers are evaluated exactly as they are.

The model object goes to lm-eval's HF wrapper (``HFLM(pretrained=model, ...)``), so a training-time model
(method layers) and a merged one (``QuantizedLinear`` or float layers) are scored by the same code. Tasks are
lm-eval's own, by their names (``mmlu``, ``arc_challenge``, ``arc_easy``, ``boolq``, ``hellaswag``,
``openbookqa``, ``piqa``, ``winogrande``), plus qaft's offline ``quiz_mc`` and ``austen_ppl``
(:mod:`qaft.evaluation.tasks`). A task is ``"name"`` (0 shots) or ``"name:shots"`` (``"mmlu:5"``).

Every result carries what the papers' numbers depend on: harness version, task versions, shots, batch size,
max length, limit and the model's form (``training`` or ``merged``). MMLU moves by points with the harness's
prompt and averaging, so these travel with every score.

Each accuracy also comes with its items (:func:`evaluate_tasks`): every document's outcome, from lm-eval's
per-sample log, as rows ``{"item": doc_id, "correct": 0 or 1}`` keyed like the score in the results
(``results.quiz_mc:0.scores.acc``); their mean is the reported accuracy. A group (``mmlu``) has no items of its
own: its subtasks have them.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch.nn.functional as F
from torch import nn

from qaft import progress
from qaft.evaluation.tasks import LOCAL_TASKS, write_local_tasks
from qaft.quant.linear import QuantizedLinear

PAPER_TASKS = ("mmlu:0", "mmlu:5", "arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa",
               "winogrande")
MODEL_FORMS = ("training", "merged", "merged+ptq", "float", "ptq")
ITEM_METRICS = ("acc", "acc_norm", "exact_match")  # per-document outcomes whose mean is the task's score


class EvalError(RuntimeError):
    """An evaluation that cannot run, told in one line (the CLI prints it without a traceback)."""


class DatasetUnreachableError(EvalError):
    """A task's dataset is neither local nor cached, and the hub cannot be reached."""


@contextlib.contextmanager
def dequantized_once(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, each ``QuantizedLinear`` computes with its weight dequantized once instead of per call.

    The numbers are identical (the same ``s * q + b``); unpacking 3-bit codes costs ~0.2 s per SmolLM2 layer,
    which per forward would dominate an lm-eval run of thousands of requests on CPU.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:
        weight = layer.dequantize_weight()
        layer.forward = lambda x, w=weight, b=layer.bias: F.linear(
            x, w.to(x.dtype), None if b is None else b.to(x.dtype))
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute; the class's forward applies again


def parse_task(spec: str) -> tuple[str, int]:
    """``"mmlu:5"`` -> ``("mmlu", 5)``; ``"arc_easy"`` -> ``("arc_easy", 0)``."""
    name, _, shots = str(spec).partition(":")
    if not name or (shots and not shots.isdigit()):
        raise EvalError(f"task {spec!r}: write a task as 'name' or 'name:shots', e.g. 'mmlu:5'")
    return name, int(shots or 0)


@lru_cache(maxsize=2)
def task_manager(include_defaults: bool) -> Any:
    """lm-eval's task index with qaft's local tasks; indexing lm-eval's own tasks takes ~20 s, so only on demand."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(write_local_tasks()), include_defaults=include_defaults)


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or its cause) is a dataset that could not be fetched, rather than a bug."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    kinds = (ConnectionError, TimeoutError, DatasetNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled)
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, kinds) or (isinstance(err, FileNotFoundError) and "cached" in str(err)):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _lm(model: nn.Module, tokenizer: Any, batch_size: int, max_length: int) -> Any:
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    return _with_progress(lm) if progress.enabled() else lm


REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")
MODEL_CALLS = ("_model_call", "_model_generate")  # HFLM's forward and generate, first argument [B, T] tokens


def _with_progress(lm: Any) -> Any:
    """``lm`` reporting in progress lines (lm-eval's own bars are unreadable in a log file): each request type
    as a phase, counted in scored rows per model call. A row is a request, one of several windows of a long
    rolling request, or several choices sharing one context, so the count of requests is only the scale while
    the phase runs (``7/~80 requests``); its end says how many requests it answered (``done, 80/80 requests``)."""
    current: list[progress.Phase | None] = [None]

    def request_type(name: str) -> Any:
        inner = getattr(lm, name)

        def run(requests: list, *args: Any, **kwargs: Any) -> Any:
            phase = current[0] = progress.Phase(f"lm-eval {name}", len(requests), "requests", about=True)
            try:
                out = inner(requests, *args, **kwargs)
            finally:
                current[0] = None
            # Answered, every request: the count is exact now (the rows counted meanwhile were only its scale).
            phase.done, phase.about = len(requests), False
            phase.end()
            return out
        return run

    def model_call(name: str) -> Any:
        inner = getattr(lm, name)

        def call(tokens: Any, *args: Any, **kwargs: Any) -> Any:
            out = inner(tokens, *args, **kwargs)
            if current[0] is not None:
                current[0].step(int(tokens.shape[0]))
            return out
        return call

    for name in REQUEST_TYPES:
        setattr(lm, name, request_type(name))
    for name in MODEL_CALLS:
        setattr(lm, name, model_call(name))
    return lm


def _evaluate(lm: Any, names: list[str], shots: int, limit: int | float | None, bootstrap_iters: int) -> dict:
    """One ``simple_evaluate`` call; dataset and unknown-task failures become one-line :class:`EvalError`."""
    from lm_eval import simple_evaluate

    manager = task_manager(include_defaults=any(n not in LOCAL_TASKS for n in names))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s) {unknown}; qaft's offline tasks are {list(LOCAL_TASKS)}")
    try:
        return simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=limit, task_manager=manager,
                               log_samples=True, bootstrap_iters=bootstrap_iters, verbosity="WARNING")
    except Exception as err:  # noqa: BLE001  (only dataset reachability is translated; the rest re-raises)
        if not _unreachable(err):
            raise
        message = (f"dataset not reachable for lm-eval task(s) {names}: {_first_line(err)}. Hub tasks need "
                   "network access (unset HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) or a filled datasets cache; "
                   f"offline, use qaft's local tasks {list(LOCAL_TASKS)}")
    raise DatasetUnreachableError(message)


def _scores(entry: dict) -> dict[str, float]:
    """``{"acc,none": x, "acc_stderr,none": y}`` -> ``{"acc": x, "acc_stderr": y}`` (numbers only)."""
    out = {}
    for key, value in entry.items():
        metric, _, filt = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
    return out


def _outcome(value: Any) -> int | float:
    """A document's outcome: 0 / 1 as an int (lm-eval logs floats), any other fraction as it is."""
    value = float(value)
    return int(value) if value in (0.0, 1.0) else value


def _items(raw: dict, shots: int) -> dict[str, list[dict[str, Any]]]:
    """Every document's outcome per accuracy, keyed like its score: ``results.<task>:<shots>.scores.<metric>``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, samples in (raw.get("samples") or {}).items():
        for sample in sorted(samples, key=lambda s: s["doc_id"]):
            filt = sample.get("filter", "none")
            for metric in ITEM_METRICS:
                value = sample.get(metric)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    label = metric if filt in ("", "none") else f"{metric},{filt}"
                    out.setdefault(f"results.{name}:{shots}.scores.{label}", []).append(
                        {"item": sample["doc_id"], "correct": _outcome(value)})
    return out


def _collect(raw: dict, shots: int) -> dict[str, dict]:
    out = {}
    for name, entry in raw["results"].items():
        out[f"{name}:{shots}"] = {
            "task": name, "shots": shots, "scores": _scores(entry),
            "version": raw.get("versions", {}).get(name),
            "n_samples": raw.get("n-samples", {}).get(name),
        }
    return out


@dataclass
class TaskScores:
    """lm-eval's results as a record holds them (``harness``, ``results``), and every document's outcome per
    accuracy (``items``, keyed like the score inside ``results``: ``results.quiz_mc:0.scores.acc``)."""

    results: dict[str, Any]
    items: dict[str, list[dict[str, Any]]]


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str] | tuple[str, ...],
    batch_size: int = 8,
    max_length: int = 2048,
    model_form: str = "merged",
    limit: float | None = None,
    bootstrap_iters: int = 1000,
) -> TaskScores:
    """Run lm-eval ``tasks`` (``"name"`` or ``"name:shots"``) on ``model`` in memory.

    ``results`` is ``{"harness": {...settings...}, "results": {"name:shots": {task, shots, scores, version,
    n_samples}}}``; groups such as ``mmlu`` appear with their subtasks. ``limit`` caps documents per task
    (tests only: such scores are not comparable). ``model_form`` is recorded, one of ``MODEL_FORMS``.
    """
    import lm_eval

    if model_form not in MODEL_FORMS:
        raise EvalError(f"model_form={model_form!r} is not one of {MODEL_FORMS}")
    by_shots: dict[int, list[str]] = {}
    for spec in tasks:
        name, shots = parse_task(spec)
        by_shots.setdefault(shots, []).append(name)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    was_training = model.training
    model.eval()
    lm = _lm(model, tokenizer, batch_size, max_length)
    start, results, items = time.perf_counter(), {}, {}
    try:
        with dequantized_once(model):
            for shots, names in sorted(by_shots.items()):
                capped = "" if limit is None else f", limit {limit}"
                progress.say(f"lm-eval: {', '.join(names)} at {shots} shots{capped}")
                raw = _evaluate(lm, names, shots, limit, bootstrap_iters)
                results |= _collect(raw, shots)
                items |= _items(raw, shots)
    finally:
        model.train(was_training)
    harness = {"name": "lm-eval", "version": lm_eval.__version__, "batch_size": batch_size,
               "max_length": max_length, "limit": limit, "model_form": model_form,
               "tasks": list(tasks), "seconds": round(time.perf_counter() - start, 2)}
    return TaskScores({"harness": harness, "results": results}, items)


def run_tasks(model: nn.Module, tokenizer: Any, tasks: list[str] | tuple[str, ...], batch_size: int = 8,
              max_length: int = 2048, model_form: str = "merged", limit: float | None = None,
              bootstrap_iters: int = 1000) -> dict[str, Any]:
    """:func:`evaluate_tasks`' results without the per-document items."""
    return evaluate_tasks(model, tokenizer, tasks, batch_size, max_length, model_form, limit, bootstrap_iters).results


def headline(results: dict[str, Any]) -> dict[str, float]:
    """The numbers a table shows: ``acc``, ``acc_norm`` and perplexities per ``task:shots``."""
    keep = ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte")
    return {f"{key}/{metric}": value for key, entry in results["results"].items()
            for metric, value in entry["scores"].items() if metric in keep}


__all__ = ["DatasetUnreachableError", "EvalError", "ITEM_METRICS", "PAPER_TASKS", "TaskScores", "evaluate_tasks",
           "headline", "parse_task", "run_tasks", "task_manager"]
