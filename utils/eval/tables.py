"""Text forms of an :class:`EvalSummary`: the paper's table, the reference script's closing lines, and
one-line accounts of what was skipped."""
from __future__ import annotations

from utils.eval.results import EvalSummary


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def summary_rows(summary: EvalSummary) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paper's table: success rate per task and overall (percent), skipped
    counts and the adherence columns; averaged summaries also get the mean of the per-run rates."""
    adherence, skipped, rates_mean = summary.adherence, summary.skipped, summary.rates_mean
    tasks = list(dict.fromkeys([*summary.tasks, *adherence.tasks, *skipped.tasks]))
    header = ["task", "correct", "total", "rate %"] + (["run-mean %"] if rates_mean else []) + \
             ["skipped", "mIoU", "coverage", "CD", "AP50"]
    rows = []
    for name in tasks + ["overall"]:
        is_overall = name == "overall"
        counts = summary.overall if is_overall else summary.tasks.get(name)
        adh = adherence.overall if is_overall else adherence.tasks.get(name)
        row = [name, str(counts.correct if counts else 0), str(counts.total if counts else 0),
               _fmt(counts.rate if counts else None, 100)]
        if rates_mean:
            row.append(_fmt(rates_mean.overall if is_overall else rates_mean.tasks.get(name), 100))
        row.append(str(skipped.total if is_overall else skipped.tasks.get(name, 0)))
        row += [_fmt(getattr(adh, m) if adh else None, 1, 3) for m in ("miou", "coverage", "centroid_distance", "ap50")]
        rows.append(row)
    return header, rows


def format_summary_table(summary: EvalSummary) -> str:
    """:func:`summary_rows` as aligned text."""
    header, rows = summary_rows(summary)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header)] + [line(row) for row in rows])


def format_reference_lines(summary: EvalSummary) -> list[str]:
    """The reference script's closing lines (spec 10.1/10.2): rates as fractions with 2 decimals. A task
    with nothing scored (prompts without a benchmark check, e.g. demo) says "not scored", never 0/0 = 0.00."""
    lines, rates = [], []
    for task, counts in summary.tasks.items():
        if not counts.total:
            rates.append(None)
            lines.append(f"Eval type: {task}, not scored (no video with a benchmark check)")
            continue
        rates.append(counts.rate or 0.0)
        lines.append(f"Eval type: {task}, success: {counts.correct}/{counts.total}, rate: {rates[-1]:.2f}")
    overall = summary.overall
    if not overall.total:
        return lines + ["Overall: not scored", "Summary: not scored"]
    lines.append(f"Overall: success: {overall.correct}/{overall.total}, rate: {overall.rate or 0.0:.2f}")
    lines.append("Summary: " + "/".join(_fmt(r) for r in rates + [overall.rate or 0.0]))
    return lines


def format_average_summary_line(combined: EvalSummary) -> str:
    """``Summary: r1/r2/.../overall`` of the mean per-run rates (the README's multi-run figures)."""
    if combined.rates_mean is None:
        raise ValueError("not an averaged summary: it has no per-run mean rates")
    rates = list(combined.rates_mean.tasks.values()) + [combined.rates_mean.overall]
    return "Summary: " + "/".join("-" if r is None else f"{r:.2f}" for r in rates)


def format_skip_line(summary: EvalSummary) -> str:
    """``evaluated 5 videos; skipped 495: 495 no prompt folder`` (skip kinds, most frequent first)."""
    skipped = summary.skipped
    text = f"evaluated {summary.evaluated_videos} video{'s' if summary.evaluated_videos != 1 else ''}"
    if skipped.total:
        kinds = sorted(skipped.kinds.items(), key=lambda kv: -kv[1])
        text += f"; skipped {skipped.total}" + (": " + ", ".join(f"{n} {kind}" for kind, n in kinds) if kinds else "")
    return text
