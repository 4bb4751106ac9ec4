"""A self-contained HTML report of a stage-2 evaluation: the summary table, then for every video
its evaluated frames with the layout boxes (solid, track colours) and the detections that entered
the pseudo-layout (dashed, "query score"), the verdict and the adherence metrics.

Frames are embedded as base64 JPEG thumbnails, so the page is one file that can be mailed around.
"""
from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.eval.evaluation import VideoResult, summary_rows
from utils.io import atomic_write_text
from utils.layout import resample_boxes

logger = logging.getLogger(__name__)

REPORT_FILE = "index.html"
MIN_DRAW_SIDE_PX = 192     # small (tiny-model) frames are enlarged before drawing so labels stay legible
MAX_THUMB_WIDTH_PX = 320
JPEG_QUALITY = 80
QUERY_PREFIX = "a photo of "

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table.summary { border-collapse: collapse; margin: 1em 0; }
table.summary td, table.summary th { border: 1px solid #bbb; padding: 3px 8px; text-align: right; }
table.summary td:first-child, table.summary th:first-child { text-align: left; }
.warning { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em; margin: 1em 0; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.6em; margin: 0.8em 0; }
.frames { display: flex; flex-wrap: wrap; gap: 4px; }
.frames figure { margin: 0; font-size: 0.75em; text-align: center; }
.pass { color: #fff; background: #2a8a3a; padding: 1px 6px; border-radius: 3px; }
.fail { color: #fff; background: #b03030; padding: 1px 6px; border-radius: 3px; }
.none { color: #fff; background: #777; padding: 1px 6px; border-radius: 3px; }
.meta { color: #555; font-size: 0.85em; }
"""


def _short_query(query: str) -> str:
    return query[len(QUERY_PREFIX):] if query.startswith(QUERY_PREFIX) else query


def _encode_jpeg(frame: np.ndarray) -> str:
    from PIL import Image

    image = Image.fromarray(frame)
    if image.width > MAX_THUMB_WIDTH_PX:
        height = max(1, round(image.height * MAX_THUMB_WIDTH_PX / image.width))
        image = image.resize((MAX_THUMB_WIDTH_PX, height), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_video_frames(result: VideoResult, frames: np.ndarray) -> list[str]:
    """The evaluated frames of ``frames`` (F, H, W, 3) with boxes drawn, as base64 JPEGs."""
    from utils.visualize import annotate_video

    indices = list(result.frame_indices)
    selected = frames[indices]
    scale = max(1, int(np.ceil(MIN_DRAW_SIDE_PX / max(1, min(selected.shape[1:3])))))
    if scale > 1:  # nearest-neighbour enlargement: keeps the pixels honest
        selected = selected.repeat(scale, axis=1).repeat(scale, axis=2)
    if result.layout is not None and result.layout.tracks:
        layout_boxes = resample_boxes(result.layout, result.num_frames)[:, indices]
        phrases = list(result.layout.phrases)
    else:
        layout_boxes, phrases = np.zeros((0, len(indices), 4)), []
    detections = None
    if result.frame_boxes is not None:
        detections = [[(box, _short_query(result.queries[int(label)]), float(score))
                       for box, score, label in zip(fb.boxes_xyxy, fb.scores, fb.labels)]
                      for fb in result.frame_boxes]
    elif result.adherence is not None:  # no benchmark check (e.g. demo prompts): the matched detections
        adherence = result.adherence
        positions = [list(result.adherence_frame_indices).index(i) for i in indices]
        detections = [[(adherence.matched_boxes_xyxy[t, p], obj.phrase, float(adherence.matched_scores[t, p]))
                       for t, obj in enumerate(adherence.objects) if adherence.matched_scores[t, p] > 0]
                      for p in positions]
    annotated = annotate_video(np.ascontiguousarray(selected), layout_boxes, phrases, detections)
    return [_encode_jpeg(frame) for frame in annotated]


def _verdict_badge(result: VideoResult) -> str:
    if result.skipped:
        return '<span class="none">SKIPPED</span>'
    if result.success is None:
        return '<span class="none">no check</span>'
    return '<span class="pass">PASS</span>' if result.success else '<span class="fail">FAIL</span>'


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


class ReportWriter:
    """Collects one HTML card per video as results come in, then writes ``<directory>/index.html``."""

    def __init__(self, directory: str | Path, title: str = "LVD stage-2 evaluation",
                 max_videos: int | None = None):
        self.directory = Path(directory)
        self.title = title
        self.max_videos = max_videos
        self.cards: list[str] = []
        self.skipped: list[str] = []
        self.omitted = 0

    def add(self, result: VideoResult, frames: np.ndarray | None = None) -> None:
        item = result.item
        if result.skipped:
            self.skipped.append(f"<tr><td>{item.index}</td><td>{html.escape(item.task)}</td>"
                                f"<td>{html.escape(result.skipped)}</td></tr>")
            return
        if self.max_videos is not None and len(self.cards) >= self.max_videos:
            self.omitted += 1
            return
        images_html = ""
        try:
            if frames is None:
                from utils.video_io import load_video

                frames = load_video(item.video_path)
            images = render_video_frames(result, frames)
            images_html = "".join(
                f'<figure><img src="data:image/jpeg;base64,{data}" alt="frame {index}">'
                f"<figcaption>frame {index}</figcaption></figure>"
                for index, data in zip(result.frame_indices, images))
        except (OSError, ValueError) as error:  # a report must not stop the evaluation
            logger.warning("report: cannot draw %s: %s", item.video_path, error)
            images_html = f"<p class='meta'>frames unavailable: {html.escape(str(error))}</p>"
        adherence = result.adherence
        metrics = ("no layout.json: adherence not measured" if adherence is None else
                   f"mIoU {_metric(adherence.miou)} · coverage {_metric(adherence.coverage)} · "
                   f"centroid distance {_metric(adherence.centroid_distance)} · AP50 {_metric(adherence.ap50)}")
        objects = ""
        if adherence is not None:
            objects = "<br>".join(
                f"{html.escape(o.phrase)} (id {o.track_id}): mIoU {_metric(o.miou)}, coverage "
                f"{_metric(o.coverage)} ({o.matched_frames}/{o.expected_frames}), CD {_metric(o.centroid_distance)}"
                for o in adherence.objects)
        self.cards.append(
            f'<div class="card"><div><b>#{item.index}</b> [{html.escape(item.task)}] {_verdict_badge(result)} '
            f"{html.escape(item.prompt)}</div>"
            f'<div class="meta">{html.escape(str(item.video_path))} · {result.num_frames} frames '
            f"{result.width}x{result.height} · evaluated {list(result.frame_indices)}"
            f"{' · detections from cache' if result.from_cache else ''}</div>"
            f'<div class="meta">{metrics}</div><div class="meta">{objects}</div>'
            f'<div class="frames">{images_html}</div></div>')

    def write(self, summary: dict, notes: Sequence[str] = ()) -> Path:
        """Write the page; ``notes`` are shown as warnings at the top (e.g. a random-weight detector)."""
        header, rows = summary_rows(summary)
        table = ("<table class='summary'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                 + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                 + "</table>")
        config = summary.get("config", {})
        config_html = html.escape(", ".join(f"{k}={v}" for k, v in config.items()))
        warnings = "".join(f'<div class="warning">{html.escape(note)}</div>' for note in notes)
        skipped = ("<h2>Skipped</h2><table class='summary'><tr><th>index</th><th>task</th><th>reason</th></tr>"
                   + "".join(self.skipped) + "</table>") if self.skipped else ""
        omitted = f"<p class='meta'>{self.omitted} more videos not shown (--report-max-videos).</p>" \
            if self.omitted else ""
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{warnings}"
                f"<p class='meta'>{config_html}</p>{table}"
                "<p class='meta'>Boxes: solid = the layout the video was generated from; dashed = detections "
                "that entered the pseudo-layout (after threshold, NMS and one box per class), or, for prompts "
                "without a benchmark check, the detections matched to the layout objects.</p>"
                f"<h2>Videos</h2>{''.join(self.cards)}{omitted}{skipped}</body></html>")
        path = self.directory / REPORT_FILE
        atomic_write_text(path, page)
        return path
