"""The OWL-ViT / OWLv2 detector (reference spec 10.2): load or build it, and run it in batches.

Frames of one or several videos go through the vision tower in batches; text queries are encoded
once per query set; per box, ``score = sigmoid(max over queries of the logit)`` and
``label = argmax``, through transformers' ``post_process_grounded_object_detection`` with no
threshold (the reference's deprecated ``post_process`` did not threshold either). The output,
:class:`VideoDetections`, holds every predicted box in pixels, unthresholded: what the detection
cache stores and what `utils.eval.verdicts` turns into a verdict.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from utils.eval.config import DEFAULT_MODEL_IDS, DETECTOR_KINDS, TINY_DETECTOR_KINDS, DetectorConfig

logger = logging.getLogger(__name__)

OWL_MAX_TOKENS = 16          # the OWL text tower has 16 positions
TINY_IMAGE_SIZE = 64         # tiny detectors: 64x64 input, 16-pixel patches -> 16 boxes per frame
TINY_HIDDEN_SIZE = 32
DETECTOR_PATH_FLAG = "--detector-path"  # named in the missing-weights message


class DetectorLoadError(RuntimeError):
    """The detector could not be built or loaded (wrong folder, wrong model type, unreadable files)."""


@dataclass(frozen=True)
class Detector:
    """A loaded OWL-ViT / OWLv2 with its tokenizer and (PIL) image processor."""

    kind: str                 # "owlvit" or "owlv2" (architecture)
    model: Any                # OwlViTForObjectDetection | Owlv2ForObjectDetection, eval mode
    processor: Any            # OwlViTProcessor | Owlv2Processor (PIL image processor, CLIP tokenizer)
    identity: str             # names the weights, for the detection cache
    random_weights: bool      # tiny detectors: verdicts are meaningless
    batch_size: int = 32

    @property
    def device(self):
        return next(self.model.parameters()).device


def build_owl_tokenizer():
    """The OWL tokenizer: CLIP BPE, pad "!" (id 0), 16 positions. A fresh instance (safe to mutate)."""
    from transformers import CLIPTokenizer

    from models.tokenizer import (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, build_clip_vocab_and_merges,
                                  find_clip_bpe_file)

    vocab, merges = build_clip_vocab_and_merges(find_clip_bpe_file())
    return CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                         unk_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=OWL_MAX_TOKENS)


def _architecture(kind: str) -> str:
    if kind in DETECTOR_KINDS:
        return kind
    if kind in ("tiny", "tiny-owlvit"):
        return "owlvit"
    if kind == "tiny-owlv2":
        return "owlv2"
    raise DetectorLoadError(f"unknown detector kind {kind!r}; expected one of "
                            f"{list(DETECTOR_KINDS + TINY_DETECTOR_KINDS)}")


def _classes(architecture: str):
    import transformers

    if architecture == "owlvit":
        return (transformers.OwlViTConfig, transformers.OwlViTForObjectDetection,
                transformers.OwlViTImageProcessorPil, transformers.OwlViTProcessor)
    from transformers.models.owlv2 import Owlv2ImageProcessorPil

    return (transformers.Owlv2Config, transformers.Owlv2ForObjectDetection, Owlv2ImageProcessorPil,
            transformers.Owlv2Processor)


def build_tiny_owl_model(kind: str = "owlvit", seed: int = 0):
    """A seeded random OWL-ViT / OWLv2 (hidden 32, 2 layers, 64x64 images, 16-pixel patches) that
    accepts the real CLIP token ids. Does not touch the global torch RNG."""
    import torch

    architecture = _architecture(kind)
    config_class, model_class, _, _ = _classes(architecture)
    small = dict(hidden_size=TINY_HIDDEN_SIZE, intermediate_size=2 * TINY_HIDDEN_SIZE, num_hidden_layers=2,
                 num_attention_heads=2)
    config = config_class(
        text_config=dict(small, vocab_size=49408, max_position_embeddings=OWL_MAX_TOKENS),
        vision_config=dict(small, image_size=TINY_IMAGE_SIZE, patch_size=16),
        projection_dim=TINY_HIDDEN_SIZE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval().requires_grad_(False)


def build_tiny_processor(kind: str = "owlvit"):
    _, _, image_processor_class, processor_class = _classes(_architecture(kind))
    image_processor = image_processor_class(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return processor_class(image_processor=image_processor, tokenizer=build_owl_tokenizer())


def build_tiny_detector(kind: str = "owlvit", seed: int = 0, device: str = "cpu",
                        batch_size: int = 32) -> Detector:
    """A tiny random-weight detector for tests and the offline demo. Its verdicts are meaningless."""
    architecture = _architecture(kind)
    model = build_tiny_owl_model(architecture, seed).to(device)
    return Detector(kind=architecture, model=model, processor=build_tiny_processor(architecture),
                    identity=f"tiny-{architecture}(seed={seed},size={TINY_IMAGE_SIZE})",
                    random_weights=True, batch_size=batch_size)


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        if tokenizer.model_max_length is None or tokenizer.model_max_length > OWL_MAX_TOKENS:
            tokenizer.model_max_length = OWL_MAX_TOKENS
        return tokenizer
    logger.info("%s has no tokenizer files; using the CLIP vocabulary from open_clip", folder)
    return build_owl_tokenizer()


def _folder_fingerprint(folder: Path) -> str:
    """Names, sizes and mtimes of the weight and config files: changes when the weights change."""
    entries = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin"):
            stat = path.stat()
            entries.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha1("|".join(entries).encode()).hexdigest()[:12]


def load_detector(config: DetectorConfig) -> Detector:
    """Build the detector a :class:`DetectorConfig` names, in fp32 eval mode on ``config.device``.

    Tiny kinds are built from configs; real ones load from ``config.model_path`` or the local model
    cache via ``models.hub.resolve_model_folder`` (which raises ``MissingWeightsError`` offline).
    """
    if config.kind in TINY_DETECTOR_KINDS:
        return build_tiny_detector(config.kind, seed=config.seed, device=config.device,
                                   batch_size=config.batch_size)
    architecture = _architecture(config.kind)
    from models.hub import resolve_model_folder

    model_id = config.model_id or DEFAULT_MODEL_IDS[architecture]
    folder = Path(resolve_model_folder(model_id, model_path=config.model_path, revision=config.revision,
                                       required_files=("config.json", "preprocessor_config.json"),
                                       path_flag=DETECTOR_PATH_FLAG))
    config_class, model_class, image_processor_class, processor_class = _classes(architecture)
    config_file = folder / "config.json"
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as error:
        raise DetectorLoadError(f"{config_file}: cannot read the model config ({error}); expected the "
                                f"folder of {model_id} (a {model_class.__name__})") from error
    if model_type != config_class.model_type:
        raise DetectorLoadError(f"{folder} holds a {model_type!r} model but --detector {config.kind} needs "
                                f"{config_class.model_type!r}; pass --detector "
                                f"{'owlv2' if model_type == 'owlv2' else 'owlvit'} or another folder")
    try:
        model = model_class.from_pretrained(str(folder), dtype="float32")
        image_processor = image_processor_class.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise DetectorLoadError(f"cannot load {model_class.__name__} from {folder}: {error}") from error
    processor = processor_class(image_processor=image_processor, tokenizer=_load_tokenizer(folder))
    model = model.eval().requires_grad_(False).to(config.device)
    identity = f"{model_id}@{config.revision or 'default'}#{_folder_fingerprint(folder)}"
    return Detector(kind=architecture, model=model, processor=processor, identity=identity,
                    random_weights=False, batch_size=config.batch_size)


# --------------------------------------------------------------------------------------------
# Running it


@dataclass(frozen=True)
class VideoDetections:
    """Every box the detector predicts on the selected frames of one video, for one query set.

    Unthresholded, before NMS: what the cache stores. Boxes are xyxy pixels of the original frame.
    """

    queries: tuple[str, ...]
    frame_indices: tuple[int, ...]
    num_frames: int                 # frames in the video
    height: int
    width: int
    boxes_xyxy_px: np.ndarray       # (frames, boxes, 4) float32
    scores: np.ndarray              # (frames, boxes) float32, sigmoid(max logit)
    labels: np.ndarray              # (frames, boxes) int64, argmax query

    def frame(self, position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.boxes_xyxy_px[position], self.scores[position], self.labels[position]


@dataclass(frozen=True)
class DetectionRequest:
    """The selected frames of one video and the query sets to detect in them."""

    frames: np.ndarray                       # (frames, H, W, 3) uint8, already selected
    frame_indices: tuple[int, ...]           # their indices in the video
    num_frames: int                          # frames in the whole video
    query_sets: tuple[tuple[str, ...], ...]


def _base_model(model):
    return getattr(model, model.base_model_prefix)


def encode_queries(detector: Detector, queries: Sequence[str]):
    """Text embeddings of one query set: ``(queries, dim)`` float tensor and ``(queries,)`` bool mask."""
    import torch

    tokens = detector.processor.tokenizer(list(queries), padding="max_length", truncation=True,
                                          max_length=OWL_MAX_TOKENS, return_tensors="pt")
    input_ids = tokens["input_ids"].to(detector.device)
    attention_mask = tokens["attention_mask"].to(detector.device)
    with torch.inference_mode():
        pooled = _base_model(detector.model).get_text_features(
            input_ids=input_ids, attention_mask=attention_mask).pooler_output
        # As the stock forward does: L2-normalised projected text features.
        embeds = pooled / torch.linalg.norm(pooled, ord=2, dim=-1, keepdim=True)
    return embeds, input_ids[:, 0] > 0  # stock rule: a query whose first id is 0 is padding


def _post_process(detector: Detector, logits, pred_boxes, sizes_hw: Sequence[tuple[int, int]]):
    """transformers' grounded post-processing with no threshold. OWLv2's processor scales its boxes
    (relative to the padded square) by max(H, W), which undoes the padding; OWL-ViT's by (W, H)."""
    from transformers.models.owlvit.modeling_owlvit import OwlViTObjectDetectionOutput

    outputs = OwlViTObjectDetectionOutput(logits=logits, pred_boxes=pred_boxes)
    # Scores are sigmoids (>= 0) and the API keeps score > threshold: -1 keeps every box.
    return detector.processor.post_process_grounded_object_detection(
        outputs=outputs, threshold=-1.0, target_sizes=[tuple(size) for size in sizes_hw])


def run_detector(detector: Detector, requests: Sequence[DetectionRequest]) -> list[list[VideoDetections]]:
    """Detect every query set of every request; ``result[i][j]`` is request i, query set j.

    All frames of all requests go through the vision tower in batches of ``detector.batch_size``;
    each query set is encoded once; the class head runs per (frame batch, query set).
    Equivalent to the stock ``model(**processor(text, images))`` per frame up to batching noise.
    A detector that is no OWL model (e.g. ``shapes.detector.ShapesDetector``: ``kind``, ``identity``,
    ``random_weights``, ``device`` and ``detect(requests)``, with the same result) runs itself.
    """
    if not isinstance(detector, Detector):
        return detector.detect(requests)
    import torch

    model = detector.model
    device = detector.device
    query_embeddings = {}
    for request in requests:
        for queries in request.query_sets:
            if queries not in query_embeddings:
                query_embeddings[queries] = encode_queries(detector, queries)
    # Flatten (request, frame) pairs.
    owners = [(r, p) for r, request in enumerate(requests) for p in range(len(request.frames))]
    per_frame: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    image_processor = detector.processor.image_processor
    for start in range(0, len(owners), max(1, detector.batch_size)):
        chunk = owners[start:start + detector.batch_size]
        images = [requests[r].frames[p] for r, p in chunk]
        pixel_values = image_processor(images=images, return_tensors="pt").pixel_values.to(device)
        with torch.inference_mode():
            feature_map, _ = model.image_embedder(pixel_values=pixel_values)  # (b, h, w, d)
            batch, grid_h, grid_w, dim = feature_map.shape
            image_feats = feature_map.reshape(batch, grid_h * grid_w, dim)
            pred_boxes = model.box_predictor(image_feats, feature_map)          # (b, boxes, 4) cxcywh
            groups: dict[tuple[str, ...], list[int]] = {}
            for row, (r, _) in enumerate(chunk):
                for queries in requests[r].query_sets:
                    groups.setdefault(queries, []).append(row)
            for queries, rows in groups.items():
                embeds, mask = query_embeddings[queries]
                index = torch.tensor(rows, device=device)
                logits, _ = model.class_predictor(image_feats[index], embeds.expand(len(rows), -1, -1),
                                                  mask.expand(len(rows), -1))  # (n, boxes, queries)
                sizes = [requests[chunk[row][0]].frames.shape[1:3] for row in rows]
                results = _post_process(detector, logits, pred_boxes[index], sizes)
                for row, result in zip(rows, results):
                    r, p = chunk[row]
                    set_index = requests[r].query_sets.index(queries)
                    per_frame[(r, set_index, p)] = (result["boxes"].float().cpu().numpy(),
                                                    result["scores"].float().cpu().numpy(),
                                                    result["labels"].cpu().numpy().astype(np.int64))
    outputs = []
    for r, request in enumerate(requests):
        height, width = request.frames.shape[1:3]
        video_outputs = []
        for set_index, queries in enumerate(request.query_sets):
            frames = [per_frame[(r, set_index, p)] for p in range(len(request.frames))]
            video_outputs.append(VideoDetections(
                queries=tuple(queries), frame_indices=tuple(request.frame_indices),
                num_frames=request.num_frames, height=int(height), width=int(width),
                boxes_xyxy_px=np.stack([f[0] for f in frames]).astype(np.float32),
                scores=np.stack([f[1] for f in frames]).astype(np.float32),
                labels=np.stack([f[2] for f in frames])))
        outputs.append(video_outputs)
    return outputs

