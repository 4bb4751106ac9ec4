"""The settings of a stage-2 evaluation, as frozen dataclasses (no module state).

- :class:`DetectorConfig`: which detector and where it runs.
- :class:`EvalConfig`: how detections become a verdict and which video of a prompt folder is judged;
  recorded in eval.json (``"config"``) and compared before runs are averaged.
- :class:`RunSelection`: which entries of a run and which files of a prompt folder to read.
- :class:`CacheSettings`: where detections are cached.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DETECTOR_KINDS = ("owlvit", "owlv2")
TINY_DETECTOR_KINDS = ("tiny", "tiny-owlvit", "tiny-owlv2")
DEFAULT_MODEL_IDS = {
    "owlvit": "google/owlvit-base-patch32",          # spec 10.2
    "owlv2": "google/owlv2-base-patch16-ensemble",
}
CACHE_DIR_NAME = ".detections"
# Formats a video is read from, best first. joblib is exact; mp4 (h264, crf 17) is close to it. GIF is left
# out by default: its 256-colour palette shifts colours, and Pillow merges identical consecutive frames,
# which changes the frame count and so the evaluated frames (utils.video_io.write_gif).
VIDEO_FORMATS = ("joblib", "mp4", "gif")
DEFAULT_VIDEO_FORMATS = ("joblib", "mp4")
# The settings whose differences make two evaluations incomparable (checked before averaging them):
# the verdict's, the adherence frames, and which videos were read.
COMPARED_SETTINGS = ("prompt_type", "num_eval_frames", "detection_score_threshold", "nms_threshold",
                    "class_aware_nms", "video_variant", "adherence_all_frames")


@dataclass(frozen=True)
class DetectorConfig:
    """Which detector to run and how."""

    kind: str = "owlvit"              # owlvit | owlv2 | tiny | tiny-owlvit | tiny-owlv2
    model_id: str | None = None       # default: DEFAULT_MODEL_IDS[kind] (spec 10.2 for owlvit)
    model_path: str | None = None     # a local folder holding the model (overrides the hub cache)
    revision: str | None = None
    device: str = "cpu"
    batch_size: int = 32              # frames per vision-tower forward
    seed: int = 0                     # tiny detectors only


@dataclass(frozen=True)
class EvalConfig:
    """How detections become a verdict. Defaults are the reference script's (spec 10.2); the README
    numbers use detection_score_threshold=0.1, nms_threshold=0.1, class_aware_nms=True."""

    prompt_type: str = "lvd"
    num_eval_frames: int = 6                  # spec 10.2
    detection_score_threshold: float = 0.05   # spec 10.2 default (README: 0.1)
    nms_threshold: float = 0.5                # spec 10.2 default (README: 0.1)
    class_aware_nms: bool = False             # spec 10.2 default (README: on)
    adherence: bool = True                    # ours: compare detections with the generating layout
    adherence_all_frames: bool = False        # ours: adherence on every frame, not only the evaluated ones
    # ours: "" judges the generated video_<k>; "zsxl", "sdxl", "zsxl_sdxl_s0.1", ... judge the upsampled
    # copy video_<k>_<variant> that scripts/upsample.py wrote next to it (spec 11).
    video_variant: str = ""


@dataclass(frozen=True)
class RunSelection:
    """Which entries of a run are evaluated (spec 10.2 flags) and which file of a prompt folder is read."""

    skip_first_prompts: int = 0
    num_prompts: int | None = None
    run_start_ind: int = 0                    # entry ind lives in <run>/<ind + run_start_ind>/
    all_repeats: bool = False                 # evaluate every video_<k>, not only a folder holding exactly one
    video_formats: tuple[str, ...] = DEFAULT_VIDEO_FORMATS  # read the first of these that exists


@dataclass(frozen=True)
class CacheSettings:
    """Where detections are cached: ``<prompt folder>/.detections/`` unless ``directory`` is given."""

    enabled: bool = True
    directory: str | None = None

    def folder_for(self, prompt_folder: Path) -> Path:
        if self.directory is None:
            return prompt_folder / CACHE_DIR_NAME
        return Path(self.directory) / prompt_folder.parent.name / prompt_folder.name
