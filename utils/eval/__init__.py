"""Stage-2 evaluation (reference spec 10.2): OWL-ViT detections on generated videos, judged by the
stage-1 predicates, plus layout adherence and an HTML report.

- `utils.eval.detection`: load / build the detector, run it in batches, the detection cache, and
  the pure steps from detections to a verdict (frame selection, threshold, NMS, pseudo-layout).
- `utils.eval.metrics`: pure layout-adherence metrics (mIoU, coverage, centroid distance, AP50).
- `utils.eval.evaluation`: run directories -> per-video results -> the paper's table; run averaging.
- `utils.eval.report`: the self-contained HTML report.

CLI: `scripts/eval_owl_vit.py` (and `scripts/average_runs.py`).
"""
