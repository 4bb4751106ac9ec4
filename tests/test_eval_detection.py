"""Running tiny random OWL-ViT / OWLv2 detectors (real CLIP tokenizer), loading them from a folder,
and the detection cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval_run_fixtures import make_detections
from utils.eval.config import DetectorConfig
from utils.eval.detection_cache import build_cache_key, cache_file_path, load_cached_detections, save_cached_detections
from utils.eval.detector import (OWL_MAX_TOKENS, DetectionRequest, DetectorLoadError, build_tiny_detector,
                                 load_detector, run_detector)

QUERIES = ("a photo of a cat", "a photo of a dog")


@pytest.fixture(scope="module", params=["owlvit", "owlv2"])
def tiny(request):
    return build_tiny_detector(request.param, seed=0)


def _frames(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def _stock(detector, frame, queries):
    """The reference's per-frame path: processor(text, images) -> model -> post-processing."""
    inputs = detector.processor(text=[list(queries)], images=frame, return_tensors="pt")
    with torch.no_grad():
        outputs = detector.model(**inputs)
    result = detector.processor.post_process_grounded_object_detection(
        outputs=outputs, threshold=-1.0, target_sizes=[frame.shape[:2]])[0]
    return outputs, result


def test_tokenizer_is_clip_with_16_positions(tiny):
    tokenizer = tiny.processor.tokenizer
    ids = tokenizer(list(QUERIES), padding="max_length", return_tensors="pt")["input_ids"]
    assert tokenizer.model_max_length == OWL_MAX_TOKENS and ids.shape == (2, 16)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and ids[0, -1] == 0  # pad "!"


def test_batched_detection_equals_the_stock_forward(tiny):
    # Two videos of different sizes in one batch, two query sets for the first one.
    video_a, video_b = _frames((3, 48, 80, 3), 1), _frames((2, 64, 64, 3), 2)
    requests = [DetectionRequest(video_a, (0, 5, 9), 10, (QUERIES, ("a photo of a bird",))),
                DetectionRequest(video_b, (0, 1), 2, (QUERIES,))]
    batched = build_tiny_detector(tiny.kind, seed=0, batch_size=4)  # 5 frames -> batches of 4 and 1
    outputs = run_detector(batched, requests)
    assert [len(o) for o in outputs] == [2, 1]
    a = outputs[0][0]
    assert (a.frame_indices, a.num_frames, a.height, a.width) == ((0, 5, 9), 10, 48, 80)
    assert a.boxes_xyxy_px.shape == (3, 16, 4) and a.scores.dtype == np.float32
    for request, video_outputs in zip(requests, outputs):
        for queries, detections in zip(request.query_sets, video_outputs):
            for position, frame in enumerate(request.frames):
                _, expected = _stock(tiny, frame, queries)
                np.testing.assert_allclose(detections.boxes_xyxy_px[position], expected["boxes"].numpy(), atol=1e-4)
                np.testing.assert_allclose(detections.scores[position], expected["scores"].numpy(), atol=1e-5)
                assert (detections.labels[position] == expected["labels"].numpy()).all()


def test_boxes_are_in_pixels_of_the_original_frame(tiny):
    """OWL-ViT boxes scale by (W, H); OWLv2's are relative to the zero-padded square (bottom and
    right padding), so they scale by max(H, W) on both axes."""
    frame = _frames((48, 96, 3), 3)
    outputs, _ = _stock(tiny, frame, QUERIES)
    cx, cy, w, h = outputs.pred_boxes[0].unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).numpy()
    scale = np.array([96, 48, 96, 48]) if tiny.kind == "owlvit" else np.array([96, 96, 96, 96])
    detections = run_detector(tiny, [DetectionRequest(frame[None], (0,), 1, (QUERIES,))])[0][0]
    np.testing.assert_allclose(detections.boxes_xyxy_px[0], corners * scale, rtol=1e-5, atol=1e-3)


def test_scores_are_sigmoid_of_the_max_logit_with_no_threshold(tiny):
    frame = _frames((64, 64, 3), 4)
    outputs, _ = _stock(tiny, frame, QUERIES)
    logits = outputs.logits[0]
    detections = run_detector(tiny, [DetectionRequest(frame[None], (0,), 1, (QUERIES,))])[0][0]
    assert detections.scores.shape == (1, logits.shape[0])  # every box, unthresholded
    np.testing.assert_allclose(detections.scores[0], torch.sigmoid(logits.max(-1).values).numpy(), atol=1e-6)
    assert (detections.labels[0] == logits.argmax(-1).numpy()).all()


def test_tiny_detectors_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    one, two = build_tiny_detector("owlvit", seed=1), build_tiny_detector("owlvit", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(one.model.parameters(), two.model.parameters()):
        assert torch.equal(p, q)
    other = build_tiny_detector("owlvit", seed=2)
    assert not torch.equal(one.model.box_head.dense0.weight, other.model.box_head.dense0.weight)
    assert one.random_weights and "seed=1" in one.identity


def test_load_detector_from_a_folder(tmp_path, tiny):
    folder = tmp_path / "owl"
    tiny.model.save_pretrained(folder)
    tiny.processor.image_processor.save_pretrained(folder)
    tiny.processor.tokenizer.save_pretrained(folder)
    loaded = load_detector(DetectorConfig(kind=tiny.kind, model_path=str(folder)))
    assert not loaded.random_weights and loaded.kind == tiny.kind
    assert loaded.processor.tokenizer.model_max_length == OWL_MAX_TOKENS
    frames = _frames((2, 64, 64, 3), 5)
    request = DetectionRequest(frames, (0, 1), 2, (QUERIES,))
    expected, got = run_detector(tiny, [request])[0][0], run_detector(loaded, [request])[0][0]
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-6)
    np.testing.assert_allclose(got.boxes_xyxy_px, expected.boxes_xyxy_px, atol=1e-4)
    other_kind = "owlv2" if tiny.kind == "owlvit" else "owlvit"
    with pytest.raises(DetectorLoadError, match="--detector"):
        load_detector(DetectorConfig(kind=other_kind, model_path=str(folder)))


def test_missing_weights_fail_fast_with_a_clear_message(tmp_path, monkeypatch):
    from models.hub import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="not a folder"):
        load_detector(DetectorConfig(kind="owlvit", model_path=str(tmp_path / "nowhere")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match="google/owlvit-base-patch32"):
        load_detector(DetectorConfig(kind="owlvit"))


def test_detection_cache_round_trip_and_key_check(tmp_path):
    detections = make_detections(QUERIES, (0, 3), 80, 48, [[([1, 2, 30, 40], 0.7, 1)], []], num_frames=4)
    key = build_cache_key("abc", "tiny", "eval6", QUERIES)
    path = cache_file_path(tmp_path, tmp_path / "video_0.joblib", key)
    assert path.name.startswith("video_0__") and path.suffix == ".npz"
    save_cached_detections(path, key, detections)
    loaded = load_cached_detections(path, key)
    assert (loaded.queries, loaded.frame_indices, loaded.num_frames, loaded.height, loaded.width) == \
        (QUERIES, (0, 3), 4, 48, 80)
    assert np.array_equal(loaded.boxes_xyxy_px, detections.boxes_xyxy_px)
    assert np.array_equal(loaded.scores, detections.scores) and np.array_equal(loaded.labels, detections.labels)
    assert load_cached_detections(path, build_cache_key("other", "tiny", "eval6", QUERIES)) is None
    path.write_bytes(b"garbage")
    assert load_cached_detections(path, key) is None


def test_a_damaged_cache_file_is_named_as_unreadable_without_numpys_pickle_advice(tmp_path, caplog):
    # Issue 17, item 11: bytes that are not a zip made numpy talk about allow_pickle.
    import logging

    path = tmp_path / "video_0.abc.npz"
    path.write_bytes(b"\x00garbage, not a zip file")
    with caplog.at_level(logging.WARNING):
        assert load_cached_detections(path, {"k": 1}) is None
    (message,) = [r.getMessage() for r in caplog.records]
    assert str(path) in message and "unreadable" in message and "recomputing it" in message
    assert "pickle" not in message
