"""Stage-2 evaluation (reference spec 10.2): OWL-ViT detections on generated videos, judged by the
stage-1 predicates, plus layout adherence and an HTML report.

- `utils.eval.config`: the settings (`DetectorConfig`, `EvalConfig`, `RunSelection`, `CacheSettings`).
- `utils.eval.detector`: build / load the detector and run it in batches (`VideoDetections`).
- `utils.eval.detection_cache`: the per-video cache of raw detections.
- `utils.eval.verdicts`: pure steps from detections to a verdict (frames, threshold, NMS, pseudo-layout).
- `utils.eval.explain`: why a verdict is what it is, in one line.
- `utils.eval.metrics`: pure layout-adherence metrics (mIoU, coverage, centroid distance, AP50).
- `utils.eval.runs`: a run's prompt folders -> the videos to evaluate, or why not.
- `utils.eval.evaluation`: `evaluate_run` / `evaluate_items`, the orchestration.
- `utils.eval.results`: typed results; `EvalSummary` is the schema of eval.json (`load_eval_summary`).
- `utils.eval.averaging`: several runs combined, after checking their settings match.
- `utils.eval.tables`: the summary as text; `utils.eval.report`: the HTML report.

CLIs: `scripts/eval_owl_vit.py` and `scripts/average_runs.py`.
"""
