"""The HTML report of a stage-2 evaluation: the summary table, then for every video its verdict with the
reason (what the check asked for, what was detected), the playable video, its evaluated frames with the
layout boxes (solid, track colours) and the detections that entered the pseudo-layout (dashed,
"query score"), and the adherence metrics.

Layout on disk (images are files next to the page, not inlined, so 500 videos stay a light page)::

    DIR/index.html
    DIR/media/<index>_<video>/frame_<k>.jpg     the evaluated frames, annotated
    DIR/media/<index>_<video>/video.gif         only when the run saved no .mp4 / .gif to link to

The videos are linked by relative path: keep the report next to the run (or copy both). With several
runs, ``write_runs_index`` writes ``DIR/index.html`` with the averaged table, linking each run's page
in ``DIR/<i>_<run name>/``.
"""
from __future__ import annotations

import html
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import numpy as np

from utils.eval.results import EvalSummary, VideoResult
from utils.eval.tables import format_skip_line, summary_rows
from utils.io import atomic_write_text
from utils.layout import resample_boxes

logger = logging.getLogger(__name__)

REPORT_FILE = "index.html"
MEDIA_DIR = "media"
MIN_DRAW_SIDE_PX = 192     # small (tiny-model) frames are enlarged before drawing so labels stay legible
MAX_THUMB_WIDTH_PX = 320
JPEG_QUALITY = 80
QUERY_PREFIX = "a photo of "
PLAYABLE_FORMATS = ("mp4", "gif")   # linked from the page, in this order of preference

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
table.summary { border-collapse: collapse; margin: 1em 0; }
table.summary td, table.summary th { border: 1px solid #bbb; padding: 3px 8px; text-align: left; }
table.summary td.num, table.summary th.num { text-align: right; }
details > summary { cursor: pointer; font-size: 1.2em; font-weight: bold; margin: 1em 0 0.5em; }
.warning { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em; margin: 1em 0; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.6em; margin: 0.8em 0; }
.card.failed { border-color: #b03030; }
.frames { display: grid; gap: 4px; align-items: start; margin-top: 0.3em; }
.frames figure { margin: 0; font-size: 0.75em; text-align: center; }
.frames img, .frames video { display: block; width: 100%; height: auto; }
.pass { color: #fff; background: #2a8a3a; padding: 1px 6px; border-radius: 3px; }
.fail { color: #fff; background: #b03030; padding: 1px 6px; border-radius: 3px; }
.none { color: #fff; background: #777; padding: 1px 6px; border-radius: 3px; }
.meta { color: #555; font-size: 0.85em; margin: 0.2em 0; }
.reason { font-size: 0.9em; margin: 0.3em 0; }
.reason.why { background: #fbeaea; border-left: 4px solid #b03030; padding: 0.3em 0.5em; }
"""


def _short_query(query: str) -> str:
    return query[len(QUERY_PREFIX):] if query.startswith(QUERY_PREFIX) else query


def _url(path: Path, page_dir: Path) -> str:
    """``path`` relative to the page's folder, as a URL."""
    return quote(Path(os.path.relpath(path.resolve(), page_dir.resolve())).as_posix())


def _save_jpeg(frame: np.ndarray, path: Path) -> None:
    from PIL import Image

    image = Image.fromarray(frame)
    if image.width > MAX_THUMB_WIDTH_PX:
        height = max(1, round(image.height * MAX_THUMB_WIDTH_PX / image.width))
        image = image.resize((MAX_THUMB_WIDTH_PX, height), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=JPEG_QUALITY)


def render_video_frames(result: VideoResult, frames: np.ndarray) -> np.ndarray:
    """The evaluated frames of ``frames`` (F, H, W, 3) with boxes drawn: (len(frame_indices), h, w, 3) uint8."""
    from utils.visualize import annotate_video

    indices = list(result.frame_indices)
    selected = frames[indices]
    scale = max(1, int(np.ceil(MIN_DRAW_SIDE_PX / max(1, min(selected.shape[1:3])))))
    if scale > 1:  # nearest-neighbour enlargement: keeps the pixels honest
        selected = selected.repeat(scale, axis=1).repeat(scale, axis=2)
    if result.layout is not None and result.layout.tracks:
        layout_boxes = resample_boxes(result.layout, frames.shape[0])[:, indices]
        phrases = list(result.layout.phrases)
    else:
        layout_boxes, phrases = np.zeros((0, len(indices), 4)), []
    detections = None
    if result.verdict is not None:
        queries = result.verdict.queries
        detections = [[(box, _short_query(queries[int(label)]), float(score))
                       for box, score, label in zip(fb.boxes_xyxy, fb.scores, fb.labels)]
                      for fb in result.verdict.frame_boxes]
    elif result.adherence is not None:  # no benchmark check (e.g. demo prompts): the matched detections
        adherence = result.adherence
        positions = [list(result.adherence_frame_indices).index(i) for i in indices]
        detections = [[(adherence.matched_boxes_xyxy[t, p], obj.phrase, float(adherence.matched_scores[t, p]))
                       for t, obj in enumerate(adherence.objects) if adherence.matched_scores[t, p] > 0]
                      for p in positions]
    return annotate_video(np.ascontiguousarray(selected), layout_boxes, phrases, detections)


def find_playable_video(video_path: Path) -> Path | None:
    """The .mp4 or .gif saved next to ``video_path`` with the same stem (or the file itself)."""
    if video_path.suffix.lstrip(".") in PLAYABLE_FORMATS:
        return video_path
    for fmt in PLAYABLE_FORMATS:
        candidate = video_path.with_suffix(f".{fmt}")
        if candidate.is_file():
            return candidate
    return None


def _verdict_badge(result: VideoResult) -> str:
    if result.skip is not None:
        return '<span class="none">SKIPPED</span>'
    if result.verdict is None:
        return '<span class="none">no check</span>'
    return '<span class="pass">PASS</span>' if result.verdict.success else '<span class="fail">FAIL</span>'


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """An HTML table of already escaped cells; the ``numeric`` columns are right-aligned."""
    def cell(tag: str, index: int, content: str) -> str:
        return f"<{tag} class='num'>{content}</{tag}>" if index in numeric else f"<{tag}>{content}</{tag}>"

    return ("<table class='summary'><tr>" + "".join(cell("th", i, html.escape(h)) for i, h in enumerate(header))
            + "</tr>" + "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>"
                                for row in rows) + "</table>")


def _summary_table(summary: EvalSummary) -> str:
    header, rows = summary_rows(summary)
    return _table(header, [[html.escape(c) for c in row] for row in rows], numeric=range(1, len(header)))


def _settings_text(summary: EvalSummary) -> str:
    if summary.config is None:
        return "settings not recorded"
    settings = summary.settings or {}
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in settings.items())


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _media_key(result: VideoResult) -> str:
    stem = result.item.video_path.stem if result.item.video_path else "video"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{result.item.index}_{stem}")


class ReportWriter:
    """Collects one HTML card per video as results come in (writing its images under ``media/``),
    then writes ``<directory>/index.html``."""

    def __init__(self, directory: str | Path, title: str = "LVD stage-2 evaluation",
                 max_videos: int | None = None):
        self.directory = Path(directory)
        self.title = title
        self.max_videos = max_videos
        self.cards: list[str] = []
        self.skipped: list[str] = []
        self.omitted = 0
        self.counts = {"PASS": 0, "FAIL": 0, "no check": 0}

    def _playable_html(self, result: VideoResult, frames: np.ndarray | None, media: Path) -> str:
        video_path = result.item.video_path
        playable = find_playable_video(video_path) if video_path is not None else None
        caption = playable.name if playable is not None else ""
        if playable is None and frames is not None:  # joblib only: write a GIF next to the page
            from utils.video_io import write_gif

            playable = write_gif(frames, media / "video.gif")
            caption = f"{video_path.name} as GIF"
        if playable is None:
            return "<p class='meta'>no playable video (.mp4 or .gif) saved</p>"
        url = html.escape(_url(playable, self.directory))
        if playable.suffix == ".mp4":
            player = f'<video src="{url}" controls loop muted preload="metadata"></video>'
        else:
            player = f'<img src="{url}" loading="lazy" alt="video">'
        annotated = playable.with_name(playable.stem + "_annotated.gif")
        extra = (f' · <a href="{html.escape(_url(annotated, self.directory))}">with layout boxes</a>'
                 if annotated.is_file() else "")
        return (f'<figure>{player}<figcaption><a href="{url}">{html.escape(caption)}</a>{extra}'
                "</figcaption></figure>")

    def add(self, result: VideoResult, frames: np.ndarray | None = None) -> None:
        item = result.item
        if result.skip is not None:
            self.skipped.append([str(item.index), html.escape(item.task), html.escape(result.skip.kind),
                                 html.escape(result.skip.message)])
            return
        badge = "no check" if result.verdict is None else "PASS" if result.verdict.success else "FAIL"
        self.counts[badge] += 1
        if self.max_videos is not None and len(self.cards) >= self.max_videos:
            self.omitted += 1
            return
        media = self.directory / MEDIA_DIR / _media_key(result)
        try:
            if frames is None:
                from utils.video_io import load_video

                frames = load_video(item.video_path)
            player = self._playable_html(result, frames, media)
            figures = []
            for index, frame in zip(result.frame_indices, render_video_frames(result, frames)):
                path = media / f"frame_{index:04d}.jpg"
                _save_jpeg(frame, path)
                url = html.escape(_url(path, self.directory))
                figures.append(f'<figure><a href="{url}"><img src="{url}" loading="lazy" alt="frame {index}"></a>'
                               f"<figcaption>frame {index}</figcaption></figure>")
            # One row: the video, then the evaluated frames, each column at most MAX_THUMB_WIDTH_PX wide.
            columns = f"repeat({len(figures) + 1}, minmax(0, {MAX_THUMB_WIDTH_PX}px))"
            images_html = (f'<div class="frames" style="grid-template-columns: {columns}">{player}'
                           f'{"".join(figures)}</div>')
        except (OSError, ValueError) as error:  # a report must not stop the evaluation
            logger.warning("report: cannot draw %s: %s", item.video_path, error)
            images_html = f"<p class='meta'>frames unavailable: {html.escape(str(error))}</p>"
        adherence = result.adherence
        metrics = ("no layout.json: adherence not measured" if adherence is None else
                   f"adherence: mIoU {_metric(adherence.miou)} · coverage {_metric(adherence.coverage)} · "
                   f"centroid distance {_metric(adherence.centroid_distance)} · AP50 {_metric(adherence.ap50)}")
        objects = ""
        if adherence is not None:
            objects = "<br>".join(
                f"{html.escape(o.phrase)} (id {o.track_id}): mIoU {_metric(o.miou)}, coverage "
                f"{_metric(o.coverage)} ({o.covered_frames}/{o.expected_frames} frames overlapped), "
                f"CD {_metric(o.centroid_distance)}" for o in adherence.objects)
        reason = ""
        if result.verdict is not None:
            failed = not result.verdict.success
            reason = (f'<div class="reason{" why" if failed else ""}"><b>{"why it failed" if failed else "why"}:</b> '
                      f"{html.escape(result.verdict.reason)}</div>")
        video = result.video
        size = f" · {video.num_frames} frames {video.width}x{video.height}" if video else ""
        self.cards.append(
            f'<div class="card{" failed" if badge == "FAIL" else ""}" id="v{html.escape(_media_key(result))}">'
            f"<div><b>#{item.index}</b> [{html.escape(item.task)}] {_verdict_badge(result)} "
            f"{html.escape(item.prompt)}</div>{reason}"
            f'<div class="meta">{html.escape(str(item.video_path))}{size} · evaluated frames '
            f"{', '.join(str(i) for i in result.frame_indices)}"
            f"{' · detections from cache' if video and video.from_cache else ''}</div>"
            f'<div class="meta">{metrics}</div><div class="meta">{objects}</div>{images_html}</div>')

    def write(self, summary: EvalSummary, notes: Sequence[str] = ()) -> Path:
        """Write the page; ``notes`` are shown as warnings at the top (e.g. a random-weight detector)."""
        warnings = "".join(f'<div class="warning">{html.escape(note)}</div>' for note in notes)
        skipped = (f"<details><summary>Skipped: {len(self.skipped)}</summary>"
                   + _table(["index", "task", "kind", "reason"], self.skipped, numeric=(0,)) + "</details>"
                   if self.skipped else "")
        omitted = (f"<p class='meta'>{self.omitted} more videos not shown (--report-max-videos).</p>"
                   if self.omitted else "")
        counts = " · ".join(f"{name}: {n}" for name, n in self.counts.items() if n)
        body = (f"{warnings}<p class='meta'>{html.escape(_settings_text(summary))}</p>"
                f"<p class='meta'>{html.escape(format_skip_line(summary))}</p>{_summary_table(summary)}"
                "<p class='meta'>Boxes: solid = the layout the video was generated from; dashed = detections "
                "that entered the pseudo-layout (after threshold, NMS and one box per class), or, for prompts "
                "without a benchmark check, the detections matched to the layout objects.</p>"
                f"<h2>Videos</h2><p class='meta'>{html.escape(counts)}</p>{''.join(self.cards)}{omitted}{skipped}")
        path = self.directory / REPORT_FILE
        atomic_write_text(path, _page(self.title, body))
        return path


@dataclass(frozen=True)
class RunPage:
    """One run's report page, for the index of a multi-run report."""

    name: str
    page: Path
    summary: EvalSummary


def write_runs_index(directory: str | Path, pages: Sequence[RunPage], combined: EvalSummary | None,
                     notes: Sequence[str] = (), title: str = "LVD stage-2 evaluation") -> Path:
    """``<directory>/index.html``: the averaged table and one row per run linking its page."""
    directory = Path(directory)
    warnings = "".join(f'<div class="warning">{html.escape(note)}</div>' for note in notes)
    rows = []
    for page in pages:
        s = page.summary
        rate = "-" if s.overall.rate is None else f"{100 * s.overall.rate:.2f}"
        rows.append([f'<a href="{html.escape(_url(page.page, directory))}">{html.escape(page.name)}</a>',
                     str(s.overall.correct), str(s.overall.total), rate, html.escape(format_skip_line(s))])
    body = warnings
    if combined is not None:
        body += (f"<h2>Average over {len(pages)} runs</h2><p class='meta'>{html.escape(_settings_text(combined))}</p>"
                 f"{_summary_table(combined)}<p class='meta'>rate % = pooled counts; run-mean % = mean of the "
                 "per-run rates (the README's figures).</p>")
    body += "<h2>Runs</h2>" + _table(["run", "correct", "total", "rate %", "videos"], rows, numeric=(1, 2, 3))
    path = directory / REPORT_FILE
    atomic_write_text(path, _page(f"{title}: {len(pages)} runs", body))
    return path
