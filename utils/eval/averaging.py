"""Several runs' evaluations combined, the way the README's 1000-video numbers are made (run0 and run1),
after checking that they were made with the same settings."""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from utils.eval.results import (ADHERENCE_METRICS, AdherenceSummary, AdherenceTable, EvalSummary, RateMeans,
                                SkippedCounts, TaskCount)

NOT_RECORDED = "not recorded"


class MixedSettingsError(ValueError):
    """The evaluations to average were made with different thresholds, NMS, frames or detectors."""


def find_setting_differences(summaries: Sequence[EvalSummary]) -> dict[str, tuple[Any, ...]]:
    """Setting -> its value in each summary, for every setting that is not the same in all of them.

    Compared: ``config.COMPARED_SETTINGS`` and the detector's identity. A summary that does not record
    its settings (the reference's eval.json) shows ``"not recorded"`` for each, so it only matches others
    that do not record them either.
    """
    settings = [s.settings for s in summaries]
    names = list(dict.fromkeys(name for values in settings if values is not None for name in values))
    differences = {}
    for name in names:
        values = tuple(NOT_RECORDED if s is None else s.get(name) for s in settings)
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            differences[name] = values
    return differences


def format_setting_differences(differences: dict[str, tuple[Any, ...]], names: Sequence[str]) -> str:
    """``detection_score_threshold (run0: 0.1, run1: 0.05); class_aware_nms (...)``."""
    return "; ".join(f"{setting} ({', '.join(f'{name}: {value}' for name, value in zip(names, values))})"
                     for setting, values in differences.items())


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def average_summaries(summaries: Sequence[EvalSummary], names: Sequence[str], *,
                      allow_mixed: bool = False) -> EvalSummary:
    """Combine the summaries of several runs (e.g. run0 and run1 = the README's 1000 videos).

    ``tasks`` / ``overall`` hold the summed counts (same JSON shape as one run), ``rates_mean`` the
    mean of the per-run rates (what the README reports; equal to the pooled rate when the runs have
    the same counts), ``adherence`` the mean of the per-run adherence values.

    Raises :class:`MixedSettingsError` naming the settings that differ, unless ``allow_mixed`` (then
    they are recorded in ``mixed_settings`` and ``config`` is None).
    """
    if len(names) != len(summaries):
        raise ValueError(f"expected one name per summary, got {len(names)} names for {len(summaries)} summaries")
    differences = find_setting_differences(summaries)
    if differences and not allow_mixed:
        raise MixedSettingsError(
            f"the evaluations were made with different settings: {format_setting_differences(differences, names)}. "
            "Their average would mix incomparable numbers: evaluate every run with the same flags (detections "
            "are cached, so a rerun is fast), or pass --allow-mixed")
    tasks = list(dict.fromkeys(task for s in summaries for task in s.tasks))
    combined_tasks, rates = {}, {}
    for task in tasks:
        counts = [s.tasks[task] for s in summaries if task in s.tasks]
        combined_tasks[task] = TaskCount(sum(c.correct for c in counts), sum(c.total for c in counts))
        rates[task] = _mean(c.rate for c in counts)
    overall = TaskCount(sum(s.overall.correct for s in summaries), sum(s.overall.total for s in summaries))
    skipped_tasks: dict[str, int] = {}
    skipped_kinds: dict[str, int] = {}
    for s in summaries:
        for task, count in s.skipped.tasks.items():
            skipped_tasks[task] = skipped_tasks.get(task, 0) + count
        for kind, count in s.skipped.kinds.items():
            skipped_kinds[kind] = skipped_kinds.get(kind, 0) + count

    def mean_adherence(parts: list[AdherenceSummary]) -> AdherenceSummary:
        return AdherenceSummary(sum(p.videos for p in parts),
                                *(_mean(getattr(p, m) for p in parts) for m in ADHERENCE_METRICS))

    adherence_tasks = list(dict.fromkeys(t for s in summaries for t in s.adherence.tasks))
    adherence = AdherenceTable(
        {t: mean_adherence([s.adherence.tasks[t] for s in summaries if t in s.adherence.tasks])
         for t in adherence_tasks},
        mean_adherence([s.adherence.overall for s in summaries]))
    first = summaries[0] if summaries else None
    return EvalSummary(
        tasks=combined_tasks, overall=overall, evaluated_videos=sum(s.evaluated_videos for s in summaries),
        skipped=SkippedCounts(skipped_tasks, skipped_kinds), adherence=adherence,
        config=None if differences or first is None else first.config,
        detector=None if differences or first is None else first.detector,
        rates_mean=RateMeans(rates, _mean(s.overall.rate for s in summaries)),
        runs=tuple(names), mixed_settings=differences)
