"""The ``qaft-eval`` Hydra app behind :mod:`qaft.evaluation.cli` (``conf/eval.yaml``): perplexity and lm-eval tasks
on a run's deployed model or any HF model.

A run's deployed model is what its record scored as deployed: the merged model for an integer merge, the
float merge after its round-to-nearest PTQ (``merged+ptq``) otherwise; results name the form they scored.
With ``run_dir=``, the results go into the run's record under ``eval.<form>``, and the item scores behind them
(per-window NLL, per-document outcomes) into its ``item_scores`` under the keys ``eval.<form>.perplexity.value``
and ``eval.<form>.lm_eval.results.<task>:<shots>.scores.<metric>`` (:mod:`qaft.run_folder`).

It scores what it is asked to: the ``tasks``, and perplexity where ``perplexity.enabled`` says so (by default,
only when no tasks are given). A perplexity depends on its window length (each window's first tokens are
predicted from little context: 2,048-token windows give a lower number than a run's own 512-token ones on the
same model), so it is printed and recorded with its ``seq_len`` and token count beside the value.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from qaft import progress
from qaft.confstore import store_schema
from qaft.evaluation.harness import EvalError, dequantized_once, evaluate_tasks, headline
from qaft.evaluation.perplexity import AUTOCAST, scoring_precision
from qaft.models import load_causal_lm  # at import, before Hydra configures logging: see below
from qaft.paths import conf_dir
from qaft.quant.gptq import GPTQOptions
from qaft.quiet import silence_third_party_noise
from qaft.run_folder import EXIT_BUSY, RunBusy

# qaft.models is imported above, not in main: transformers' import imports torchao, whose import logs warnings that
# reach the output only once Hydra has given logging a handler (the known noise is dropped by qaft.quiet).
CONF_DIR = str(conf_dir())
PTQ_ALGORITHMS = ("rtn", "gptq", "smoothquant")
# conf/eval.yaml's ptq.gptq node: GPTQ's options and defaults from their one definition. At import, not in main:
# a launcher that rebuilds the config in another process imports this module without calling main.
store_schema("schema", "gptq", GPTQOptions)
silence_third_party_noise()  # known library noise out of the log (qaft.quiet)


def _model(cfg: DictConfig) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    from qaft.evaluation.runs import apply_ptq, load_deployed

    dtype = getattr(torch, cfg.model.dtype)
    if cfg.run_dir:  # the deployed model, as the run's record scored it: a float merge gets its +PTQ
        model, tokenizer, record, form = load_deployed(cfg.run_dir, dtype)
        return model, tokenizer, {"model": record["model"], "run_dir": str(cfg.run_dir), **form}
    model, tokenizer = load_causal_lm(cfg.model.name_or_path, dtype)
    about = {"model": cfg.model.name_or_path, "form": "float"}
    if cfg.ptq.algorithm:
        if cfg.ptq.algorithm not in PTQ_ALGORITHMS:
            raise ValueError(f"ptq.algorithm={cfg.ptq.algorithm!r} must be null or one of {PTQ_ALGORITHMS}")
        ptq = OmegaConf.to_container(cfg.ptq, resolve=True)
        model = apply_ptq(model, tokenizer, ptq, cfg.perplexity.source or "austen", cfg.perplexity.config)
        about |= {"form": "ptq", "ptq": ptq}
    return model, tokenizer, about


Items = dict[str, list[dict[str, Any]]]  # metric key inside the results -> item-score rows


def wants_perplexity(cfg: DictConfig) -> bool:
    """Whether ``cfg`` asks for a perplexity: ``perplexity.enabled``, or where it is null, no ``tasks`` given.
    ``ValueError`` (one line) for a command that asks for nothing, or for a perplexity of no corpus."""
    enabled = OmegaConf.select(cfg, "perplexity.enabled")
    if enabled not in (None, True, False):
        raise ValueError(f"perplexity.enabled={enabled!r} must be true, false or null (null: only without tasks)")
    wanted = not cfg.tasks if enabled is None else enabled
    if wanted and not cfg.perplexity.source:
        if enabled:
            raise ValueError("perplexity.enabled=true needs a perplexity.source")
        wanted = False
    if not wanted and not cfg.tasks:
        raise ValueError("nothing to score: tasks=[] and no perplexity (perplexity.enabled=true with a "
                         "perplexity.source, or tasks=[...])")
    if cfg.get("autocast") not in (None, *AUTOCAST):
        raise ValueError(f"autocast={cfg.autocast!r} must be null (float32) or {' or '.join(AUTOCAST)}")
    return bool(wanted)


def windows_note(p: dict[str, Any]) -> str:
    """What a perplexity was measured on, as printed beside its value (``austen test, 2048-token windows,
    16384 tokens``)."""
    corpus = " ".join(str(v) for v in (p["source"], p.get("config"), p["split"]) if v)
    return f"{corpus}, {p['seq_len']}-token windows, {p['tokens']} tokens"


def _perplexity(model: torch.nn.Module, tokenizer: Any, p: DictConfig) -> tuple[dict[str, Any], Items]:
    from qaft.data import lm_eval_windows, load_lm_texts
    from qaft.evaluation.perplexity import window_scores

    windows = lm_eval_windows(tokenizer, load_lm_texts(p.source, p.config)[p.split], int(p.seq_len), p.max_tokens)
    about = {"source": p.source, "config": p.config, "split": p.split, "seq_len": int(p.seq_len),
             "tokens": sum(w.numel() for w in windows)}
    scores = window_scores(model, windows, int(p.batch_size), what=f"perplexity ({windows_note(about)})")
    return {**about, "value": scores.perplexity}, {"perplexity.value": scores.rows()}


def _scores(cfg: DictConfig, perplexity: bool) -> tuple[dict[str, Any], Items]:
    """The results, and their item scores keyed by the metric's path inside them."""
    model, tokenizer, about = _model(cfg)
    autocast = cfg.get("autocast")
    results: dict[str, Any] = {**about, **({"autocast": autocast} if autocast else {})}
    items: Items = {}
    if perplexity:
        with dequantized_once(model), scoring_precision(model, autocast):
            results["perplexity"], items = _perplexity(model, tokenizer, cfg.perplexity)
    if cfg.tasks:
        with scoring_precision(model, autocast):
            lm = evaluate_tasks(model, tokenizer, list(cfg.tasks), int(cfg.lm_eval.batch_size),
                                int(cfg.lm_eval.max_length), about["form"], cfg.lm_eval.limit)
        results["lm_eval"], results["headline"] = lm.results, headline(lm.results)
        items |= {f"lm_eval.{key}": rows for key, rows in lm.items.items()}
    return results, items


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Everything ``cfg`` asks for, as one JSON-ready dict (also written to ``output`` / the run's record). A run
    folder is held under its lock meanwhile (a rerun of its training waits its turn) and cleared of what killed
    writers left first."""
    from qaft.files import write_json
    from qaft.run_folder import RunFolder

    perplexity = wants_perplexity(cfg)  # asking for nothing is refused before a model loads or a folder is locked
    if not cfg.run_dir:
        results, _ = _scores(cfg, perplexity)  # no run folder: no record to name item scores in
        write_json(Path(cfg.output or "eval_results.json"), results)
        return results
    folder = RunFolder(cfg.run_dir)
    with folder.lock():
        folder.remove_debris()
        results, items = _scores(cfg, perplexity)
        write_json(Path(cfg.output) if cfg.output else folder.eval_path, results)
        form = results["form"]  # the results are keyed by the form scored, their items' keys too
        folder.add_eval(form, results, {f"eval.{form}.{key}": rows for key, rows in items.items()})
    return results


def summary(results: dict[str, Any]) -> list[str]:
    """The lines ``qaft-eval`` ends with: the model and form, then each score (a perplexity with its windows)."""
    lines = [f"qaft-eval: {results['model']} ({results['form']})"]
    if "perplexity" in results:
        p = results["perplexity"]
        lines.append(f"  perplexity: {p['value']:.4f} ({windows_note(p)})")
    lines += [f"  {key}: {value:.4f}" for key, value in results.get("headline", {}).items()]
    return lines


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    """The Hydra app (exit statuses: :mod:`qaft.evaluation.cli`)."""
    try:
        with progress.reporting(True, float(OmegaConf.select(cfg, "progress.every_s", default=30))):
            results = evaluate(cfg)
    except (EvalError, FileNotFoundError, ValueError) as err:
        print(f"qaft-eval: {err}", file=sys.stderr)
        sys.exit(2)
    except RunBusy as err:
        print(f"qaft-eval: {err}", file=sys.stderr)
        sys.exit(EXIT_BUSY)
    print("\n".join(summary(results)))
