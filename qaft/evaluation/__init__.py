"""qaft.evaluation: lm-eval tasks (the papers' and qaft's offline ones) and perplexity on training-time or merged models.

Its names load on first use (:mod:`qaft.lazy`): ``qaft-eval --help`` imports this package without torch."""
from qaft.lazy import exports

_PUBLIC = {
    **dict.fromkeys(("PAPER_TASKS", "DatasetUnreachableError", "EvalError", "dequantized_once", "headline",
                     "parse_task", "run_tasks"), "qaft.evaluation.harness"),
    **dict.fromkeys(("LOCAL_TASKS", "quiz_mc_docs", "write_local_tasks"), "qaft.evaluation.tasks"),
}
__getattr__, __dir__ = exports(__name__, _PUBLIC)
__all__ = [
    "LOCAL_TASKS",
    "PAPER_TASKS",
    "DatasetUnreachableError",
    "EvalError",
    "dequantized_once",
    "headline",
    "parse_task",
    "quiz_mc_docs",
    "run_tasks",
    "write_local_tasks",
]
