"""Progress lines (qaft.progress): silent in library use, one flushed line per event when a tool turns them on,
and no part of a run's identity."""
from __future__ import annotations

import datetime
import math
import re
from types import SimpleNamespace

import pytest

from qaft import progress
from qaft.evaluation.perplexity import batches_perplexity
from qaft.methods import gptq_quantize_model
from qaft.training.identity import config_digest

from helpers import tiny_llama, token_batch


def test_library_calls_print_nothing(capsys):
    model = tiny_llama()
    batches_perplexity(model, [{"input_ids": token_batch()}])
    gptq_quantize_model(model, [token_batch()], bits=4, group_size=32)
    assert capsys.readouterr().out == ""


def test_phases_say_what_they_do_and_how_far_along_they_are(capsys):
    model = tiny_llama()
    with progress.reporting(True, every_s=0):
        value = batches_perplexity(model, [{"input_ids": token_batch(seed=s)} for s in range(3)], "perplexity [x]")
        gptq_quantize_model(model, [token_batch()], bits=3, group_size=-1)
    assert not progress.enabled()  # as it was before the block
    lines = capsys.readouterr().out.splitlines()
    # durations read as T: a loaded machine may take seconds over these batches (what matters is the shape)
    assert [re.sub(r"\d+s", "T", line) for line in lines[:4]] == [
        "perplexity [x]: started (3 batches)", "perplexity [x]: 1/3 batches, T, ETA T",
        "perplexity [x]: 2/3 batches, T, ETA T", f"perplexity [x]: done, 3/3 batches in T, perplexity {value:.3f}"]
    assert lines[4] == "GPTQ w3 pc: started (2 blocks)" and lines[-1].startswith("GPTQ w3 pc: done, 2/2 blocks in ")


def test_lines_are_spaced_by_every_s(capsys):
    with progress.reporting(True, every_s=3600):
        phase = progress.Phase("work", 100, "items")
        for _ in range(100):
            phase.step()
        phase.end("fine")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["work: started (100 items)", "work: done, 100/100 items in 0s, fine"]


@pytest.mark.parametrize("seconds,text", [(0.4, "0s"), (42, "42s"), (185, "3m05s"), (7620, "2h07m"),
                                          (float("inf"), "?")])
def test_durations_read_short(seconds, text):
    assert progress.duration(seconds) == text


def test_a_bad_interval_is_refused():
    with pytest.raises(ValueError, match="every_s"):
        progress.configure(True, every_s=-1)


def test_progress_settings_are_not_part_of_the_identity():
    base = {"seed": 0, "method": {"name": "l4q"}, "trainer": {"max_steps": 4}}
    shown = {**base, "progress": {"every_n_steps": 1, "every_s": 0},
             "trainer": {"max_steps": 4, "enable_progress_bar": True}}
    assert config_digest(shown) == config_digest(base)


@pytest.mark.parametrize("step_s", [2.0, 45.0])
def test_the_terminal_bar_shows_a_rate_and_an_eta_however_slow_a_step(step_s):
    """Lightning's rich bar estimates speed over the last 30 s only: with steps slower than that it read
    ``3/32 0:01:40 • -:--:-- 0.00it/s``. qaft's bar, after two steps of ``step_s`` seconds (a fake clock), shows the
    rate and the time the other 30 steps take at it."""
    from pytorch_lightning.callbacks import RichProgressBar

    from qaft.training.progress_bar import RateProgressBar

    def rendered(bar_class: type[RichProgressBar]) -> str:
        bar, now = bar_class(), [100.0]
        # the trainer is read only by the metrics column, which then draws nothing
        bar._init_progress(SimpleNamespace(progress_bar_callback=bar, state=SimpleNamespace(fn="validate")))
        try:
            bar.progress.get_time = lambda: now[0]  # read by each task at every update
            task = bar._add_task(32, "Epoch 0")
            for step in (1, 2, 3):  # the first update starts the clock; two steps of step_s follow
                bar.progress.update(task, completed=step)
                now[0] += step_s
            now[0] -= step_s
            columns = bar.progress.columns[2:5]  # steps done, elapsed • ETA, rate
            return " ".join(str(column.render(bar.progress.tasks[task])) for column in columns)
        finally:
            bar._stop_progress()

    eta = str(datetime.timedelta(seconds=math.ceil(29 * step_s)))
    assert rendered(RateProgressBar) == f"3/32 {datetime.timedelta(seconds=int(2 * step_s))} • {eta} " \
        f"{1 / step_s:.2f}it/s"
    if step_s > 30:  # what Lightning's own bar shows
        assert rendered(RichProgressBar).endswith("• -:--:-- 0.00it/s")
