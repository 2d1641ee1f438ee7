"""The LR Finder's refine option, its pure parts: the confirmation runs' candidate rates, the choice
among their results, the settings appended to the node, the refine.jsonl line, the summary's cost and
the chart. The runs themselves are in tests/comfy/test_lr_finder.py."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from lora_lab.training.lr.charts import sweep_chart
from lora_lab.training.lr.finder import (REFINE_MIN_SPAN, FinderResult, FinderSettings, RefineRun, pick_refined,
                                         refine_candidates, summary)
from lora_lab.training.lr.rates import LearningRates
from lora_lab.training.run.loop import StepRecord
from lora_lab.training.settings import SettingError, specs

SETTINGS = FinderSettings(min_lr=1e-6, max_lr=1e-1, steps=60, refine_runs=3, refine_steps=20)


def decades(rates: list[float]) -> list[float]:
    return [math.log10(rate) for rate in rates]


def test_candidates_run_log_evenly_from_the_suggestion_to_the_minimum():
    rates = refine_candidates(1e-3, 1e-2, 3, SETTINGS)
    assert rates[0] == 1e-3 and rates[-1] == 1e-2                 # the ends exactly
    assert decades(rates) == pytest.approx([-3.0, -2.5, -2.0])
    five = refine_candidates(2e-4, 2e-3, 5, SETTINGS)
    steps = [b - a for a, b in zip(decades(five), decades(five)[1:])]
    assert five[0] == 2e-4 and five[-1] == 2e-3 and steps == pytest.approx([0.25] * 4)


def test_candidates_span_at_least_half_a_decade_widened_downward():
    rates = refine_candidates(1e-3, 1.5e-3, 3, SETTINGS)        # suggestion and minimum 0.18 decades apart
    assert rates[-1] == 1.5e-3 and rates[0] < 1e-3               # never above the minimum: lower instead
    assert decades(rates)[-1] - decades(rates)[0] == pytest.approx(REFINE_MIN_SPAN)
    alone = refine_candidates(1e-3, None, 2, SETTINGS)           # no minimum (too few points): below the suggestion
    assert alone[-1] == 1e-3 and decades(alone)[0] == pytest.approx(-3.0 - REFINE_MIN_SPAN)


def test_candidates_stay_in_the_sweep_and_off_means_none():
    rates = refine_candidates(1.2e-6, 2e-6, 4, SETTINGS)         # widening would go below min_lr: upward instead
    assert min(rates) == SETTINGS.min_lr and rates == sorted(set(rates)) and len(rates) == 4
    assert decades(rates)[-1] - decades(rates)[0] == pytest.approx(REFINE_MIN_SPAN)
    bottom = refine_candidates(SETTINGS.min_lr, None, 3, SETTINGS)   # a sweep that never fell: still 3 rates
    assert decades(bottom) == pytest.approx([-6.0, -5.75, -5.5])
    assert refine_candidates(1e-3, 1e-2, 0, SETTINGS) == []
    assert refine_candidates(1e-3, 1e-2, 1, SETTINGS) == []


def test_the_choice_is_the_lowest_final_loss_ties_to_the_lower_rate_and_divergence_never_wins():
    runs = [RefineRun(1e-3, 0.50, 20, 1.0), RefineRun(3e-3, 0.42, 20, 1.0), RefineRun(1e-2, math.inf, 7, 1.0, "diverged")]
    assert pick_refined(runs) is runs[1]
    tied = [RefineRun(3e-3, 0.4, 20, 1.0), RefineRun(1e-3, 0.4, 20, 1.0)]
    assert pick_refined(tied).rate == 1e-3
    assert pick_refined([RefineRun(1e-2, math.inf, 3, 1.0, "diverged")]) is None


def test_refine_settings_are_appended_and_off_by_default():
    # The node's input order is a public API (saved workflows fill widgets by position): appended only.
    assert list(specs(FinderSettings)) == [
        "min_lr", "max_lr", "steps", "rank", "alpha", "target", "optimizer", "batch_size", "precision",
        "training_seed", "memory", "vram_budget_gb", "base_weights", "refine_runs", "refine_steps", "network",
        "lokr_factor", "lokr_decompose_both", "loha_rank", "loha_alpha"]
    assert [field.name for field in dataclasses.fields(FinderSettings)] == list(specs(FinderSettings))
    assert FinderSettings().refine_runs == 0
    with pytest.raises(SettingError, match=r"LR Finder: refine_runs = 1 compares nothing"):
        FinderSettings(refine_runs=1)
    with pytest.raises(SettingError, match=r"refine_steps"):
        FinderSettings(refine_steps=2)


def test_a_refine_line_records_the_run_and_a_diverged_loss_as_null():
    line = json.loads(RefineRun(1e-3, 0.5, 20, 1.23456, chosen=True).line())
    assert line == {"lr": 1e-3, "val_loss": 0.5, "steps": 20, "seconds": 1.235, "stopped": "", "chosen": True}
    assert json.loads(RefineRun(1e-2, math.inf, 4, 0.5, "diverged").line())["val_loss"] is None


def result_with(refine: list[RefineRun]) -> FinderResult:
    records = [StepRecord(step=step, loss=0.5, lr={"unet": SETTINGS.rate(step)},
                          val_loss=1.0 - 0.01 * step if step % 3 == 2 else None) for step in range(60)]
    chosen = next((run.rate for run in refine if run.chosen), 1e-3)
    return FinderResult(records=records, suggested_lr=chosen, min_loss_lr=1e-2, steepest_lr=1e-3,
                        baseline_val_loss=1.2, stopped="reached max_lr after 60 steps", validate_every=3,
                        run_dir=Path("/tmp/sweep_0001"), learning_rates=LearningRates(learning_rate=chosen),
                        curve=[(1e-4, 0.9), (1e-3, 0.6), (1e-2, 0.4)], sweep_lr=1e-3, refine=refine,
                        sweep_seconds=30.0, refine_seconds=33.0)


def test_the_summary_states_the_runs_the_choice_and_the_cost_against_the_sweep():
    runs = [RefineRun(1e-3, 0.5, 20, 11.0), RefineRun(3.16e-3, 0.41, 20, 11.0, chosen=True),
            RefineRun(1e-2, 0.45, 20, 11.0)]
    text = summary(result_with(runs), SETTINGS)
    assert text.startswith("Suggested rate: 0.00316 (refined: the lowest validation loss of 3 confirmation runs; "
                           "the sweep's suggestion was 0.001")
    assert "  0.00316: 0.4100  <- chosen" in text
    assert "Refine cost: 3 x 20 = 60 training steps, 1x the sweep's 60, 33 s against the sweep's 30 s." in text
    assert text.splitlines()[-2] == "Confirmation runs: /tmp/sweep_0001/refine.jsonl"
    assert text.splitlines()[-1] == "Steps: /tmp/sweep_0001/sweep.jsonl"
    plain = summary(result_with([]), SETTINGS)
    assert "Refine" not in plain and "Confirmation" not in plain
    assert plain.startswith("Suggested rate: 0.001 (where the smoothed validation loss falls fastest)")
    diverged = summary(result_with([RefineRun(1e-2, math.inf, 3, 1.0, "diverged: the training loss became nan")]),
                       SETTINGS)
    assert "every confirmation run diverged: the sweep's suggestion is kept" in diverged


def test_the_chart_draws_the_confirmation_runs():
    runs = [RefineRun(1e-3, 0.5, 20, 1.0), RefineRun(3.16e-3, 0.41, 20, 1.0, chosen=True),
            RefineRun(1e-2, math.inf, 4, 1.0, "diverged")]
    result = result_with(runs)
    with_runs = sweep_chart(result.records, SETTINGS.rate, result.curve, result.suggested_lr, result.min_loss_lr,
                            result.steepest_lr, refine=runs)
    without = sweep_chart(result.records, SETTINGS.rate, result.curve, result.suggested_lr, result.min_loss_lr,
                          result.steepest_lr)
    assert with_runs.size == without.size and with_runs.tobytes() != without.tobytes()
