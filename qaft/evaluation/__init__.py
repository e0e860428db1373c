"""qaft.evaluation: lm-eval tasks (the papers' and qaft's offline ones) and perplexity on training-time or merged models."""
from qaft.evaluation.harness import (
    PAPER_TASKS,
    DatasetUnreachableError,
    EvalError,
    dequantized_once,
    headline,
    parse_task,
    run_tasks,
)
from qaft.evaluation.tasks import LOCAL_TASKS, quiz_mc_docs, write_local_tasks

__all__ = ["LOCAL_TASKS", "PAPER_TASKS", "DatasetUnreachableError", "EvalError", "dequantized_once", "headline",
           "parse_task", "quiz_mc_docs", "run_tasks", "write_local_tasks"]
