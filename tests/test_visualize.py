import numpy as np
import pytest
from PIL import Image

from utils.layout import build_layout_from_frames, resample_boxes
from utils.video_io import load_video
from utils.visualize import (LAYOUT_MARGIN_PX, _font, _wrap_text, annotate_video, compute_track_labels,
                             render_layout_frames, save_layout_gif, track_color)


def moving_layout():
    # A dog moving right across the lower half, a ball (absent in the last two keyframes) at the top right.
    frames = [[{"id": 0, "name": "a dog", "box": [20 + 40 * k, 300, 120, 100]}]
              + ([{"id": 1, "name": "a ball", "box": [380, 150, 60, 60]}] if k < 4 else [])
              for k in range(6)]
    return build_layout_from_frames(frames, prompt="A dog chasing a ball", background="a park")


def test_track_colors_stable_distinct_and_as_specified():
    colors = [track_color(index) for index in range(5)]
    assert colors == [track_color(index) for index in range(5)]
    assert len(set(colors)) == 5
    for index, color in enumerate(colors):
        expected = 0.4 + 0.6 * np.random.default_rng(index).random((1, 3))[0]
        np.testing.assert_allclose(np.asarray(color) / 255, expected, atol=0.5 / 255)
        assert all(102 <= channel <= 255 for channel in color)


def test_layout_frames_draw_outlines_in_track_colors():
    layout = moving_layout()
    boxes_xyxy = resample_boxes(layout, 24)
    frames = render_layout_frames(boxes_xyxy, layout.phrases, layout.prompt, layout.background)
    assert frames.shape == (24, 516, 516, 3) and frames.dtype == np.uint8
    for frame_index in (0, 12, 23):
        x_min, y_min, x_max, y_max = boxes_xyxy[0, frame_index] * 512 + LAYOUT_MARGIN_PX
        bottom, right = round(y_max) - 2, round(x_max) - 2  # inside the 3 px outline
        assert tuple(frames[frame_index, bottom, round((x_min + x_max) / 2)]) == track_color(0)
        assert tuple(frames[frame_index, round((y_min + y_max) / 2), right]) == track_color(0)
        assert tuple(frames[frame_index, round((y_min + y_max) / 2), round((x_min + x_max) / 2)]) == (255, 255, 255)
    # The ball is absent at the end (zeros): its colour must not appear there.
    assert (frames[0] == track_color(1)).all(axis=-1).any()
    assert not (frames[23] == track_color(1)).all(axis=-1).any()
    # Black frame around the 512 canvas, white margin outside it.
    assert tuple(frames[0, 258, LAYOUT_MARGIN_PX - 1]) == (0, 0, 0)
    assert tuple(frames[0, 258, 0]) == (255, 255, 255)


def test_layout_prompt_is_drawn_at_the_top():
    boxes_xyxy = np.zeros((0, 2, 4))
    frames = render_layout_frames(boxes_xyxy, [], "A prompt", background="")
    top, rest = frames[0, LAYOUT_MARGIN_PX:60, LAYOUT_MARGIN_PX:-LAYOUT_MARGIN_PX], frames[0, 100:-10, 10:-10]
    assert (top.min(axis=-1) < 128).sum() > 50  # dark text pixels
    assert (rest == 255).all()


def test_long_prompts_wrap_to_the_width():
    font = _font(14)
    text = "A very long prompt " * 20
    lines = _wrap_text(text, font, 300)
    assert len(lines) > 3
    assert all(font.getlength(line) <= 300 for line in lines)
    assert " ".join(lines).split() == text.split()


def test_save_layout_gif(tmp_path):
    layout = moving_layout()
    path = tmp_path / "boxes.gif"
    save_layout_gif(layout, path)
    with Image.open(path) as image:
        assert image.n_frames == 24 and image.info["loop"] == 0
        assert abs(image.info["duration"] - 125) <= 5
    frames = load_video(path)
    x_min, y_min, x_max, y_max = resample_boxes(layout, 24)[0, 5] * 512 + LAYOUT_MARGIN_PX
    pixel = frames[5, round(y_max) - 2, round((x_min + x_max) / 2)].astype(int)
    assert np.abs(pixel - track_color(0)).max() <= 8  # GIF palette
    assert [p.name for p in tmp_path.iterdir()] == ["boxes.gif"]


def test_annotate_video_draws_at_the_right_pixels():
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    boxes_xyxy = np.array([[[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.0, 0.0]]])  # (1 track, 2 frames, 4)
    annotated = annotate_video(frames, boxes_xyxy, ["a dog"], line_px=2)
    color = np.array(track_color(0))
    drawn = (annotated[0] == color).all(axis=-1)  # (64, 64)
    expected = np.zeros((64, 64), bool)
    expected[16:48, 16:48] = True
    expected[18:46, 18:46] = False  # a 2 px outline over pixels 16..47
    outline_rows = slice(16, 48)
    # The phrase label sits above the top-left corner; everything else is exactly the outline.
    np.testing.assert_array_equal(drawn[outline_rows], expected[outline_rows])
    assert not drawn[48:].any()
    assert drawn[:16].any()  # the label background, in the track colour
    assert not annotated[1].any()  # absent box: nothing drawn
    assert not frames.any()  # input untouched


def test_annotate_video_scales_boxes_to_non_square_frames():
    frames = np.zeros((1, 32, 96, 3), np.uint8)
    boxes_xyxy = np.array([[[0.5, 0.5, 1.0, 1.0]]])
    annotated = annotate_video(frames, boxes_xyxy, [""], line_px=1)
    drawn = (annotated[0] == np.array(track_color(0))).all(axis=-1)
    rows, cols = np.nonzero(drawn)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 31, 48, 95)


def test_annotate_video_draws_detections_dashed():
    frames = np.full((1, 64, 64, 3), 128, np.uint8)
    boxes_xyxy = np.zeros((0, 1, 4))
    detections = [[((0.25, 0.25, 0.75, 0.75), "dog", 0.9)]]
    annotated = annotate_video(frames, boxes_xyxy, [], detections=detections, line_px=2)
    top_edge = annotated[0, 16, 16:48]
    assert (top_edge == 255).all(axis=-1).any() and (top_edge == 0).all(axis=-1).any()  # dashes
    assert ((top_edge == 255).all(axis=-1) | (top_edge == 0).all(axis=-1)).all()
    assert (annotated[0, 20:30, 20:30] == 128).all()  # the inside stays clear above the label


@pytest.mark.parametrize("kwargs,match", [
    ({"phrases": ["a", "b"]}, "one phrase per track"),
    ({"boxes_xyxy": np.zeros((1, 3, 4))}, "3 frames, the video has 2"),
    ({"boxes_xyxy": np.zeros((1, 2))}, r"\(tracks, frames, 4\)"),
    ({"detections": [[]]}, "one list per frame"),
    ({"frames": np.zeros((2, 8, 8, 3), np.float32)}, "uint8"),
])
def test_annotate_video_validates_input(kwargs, match):
    arguments = {"frames": np.zeros((2, 8, 8, 3), np.uint8), "boxes_xyxy": np.zeros((1, 2, 4)),
                 "phrases": ["a"], **kwargs}
    with pytest.raises(ValueError, match=match):
        annotate_video(**arguments)


@pytest.mark.parametrize("value", [0, 255])
def test_outlines_have_a_black_rim_that_reads_on_dark_and_light_frames(value):
    frames = np.full((1, 64, 64, 3), value, np.uint8)
    boxes_xyxy = np.array([[[0.25, 0.25, 0.75, 0.75]]])
    annotated = annotate_video(frames, boxes_xyxy, [""], line_px=2)[0]
    color = np.array(track_color(0))
    row = annotated[32]  # across the left and right edges, away from the label
    assert (row[15] == 0).all() and (row[16] == color).all() and (row[17] == color).all() and (row[18] == 0).all()
    assert (row[47] == color).all() and (row[48] == 0).all()
    assert (row[30] == value).all()  # the inside is untouched
    # On a white frame the pastel band alone would have little contrast; the rim is dark.
    assert np.abs(row[15].astype(int) - value).max() == value


def test_labels_of_objects_that_share_a_phrase_carry_their_id():
    assert compute_track_labels(["car", "car", "dog"]) == ["car #0", "car #1", "dog"]
    assert compute_track_labels(["car", "dog", "car"], ids=[4, 7, 9]) == ["car #4", "dog", "car #9"]
    assert compute_track_labels(["", ""]) == ["", ""]
    with pytest.raises(ValueError, match="one id per phrase"):
        compute_track_labels(["a"], ids=[1, 2])
    frames = np.zeros((1, 128, 128, 3), np.uint8)
    boxes_xyxy = np.array([[[0.1, 0.3, 0.4, 0.6]], [[0.6, 0.3, 0.9, 0.6]]])
    same = annotate_video(frames, boxes_xyxy, ["car", "car"])
    different = annotate_video(frames, boxes_xyxy, ["car", "dog"])
    label_area = (slice(0, 40), slice(0, 60))  # above the first box: "car #0" is wider than "car"
    assert (same[0][label_area] == track_color(0)).all(axis=-1).sum() > \
        (different[0][label_area] == track_color(0)).all(axis=-1).sum()


@pytest.mark.parametrize("box", [[1e305, 0.0, 2e305, 0.5], [0.0, 0.0, 1e300, 1e300], [-1e300, -1e300, 0.5, 0.5],
                                 [float("nan"), 0.0, 1.0, 1.0], [0.0, float("-inf"), 1.0, float("inf")],
                                 [-3.0, -3.0, -2.0, -2.0], [0.999, 0.999, 5.0, 5.0]])
def test_no_finite_or_odd_box_crashes_the_drawing(box):
    boxes_xyxy = np.array([[box]])
    frames = render_layout_frames(boxes_xyxy, ["thing"], "A prompt")
    assert frames.shape == (1, 516, 516, 3)
    annotated = annotate_video(np.zeros((1, 32, 48, 3), np.uint8), boxes_xyxy, ["thing"])
    assert annotated.shape == (1, 32, 48, 3)


def test_a_box_past_the_edge_is_drawn_like_before_clipping():
    frames = np.zeros((1, 64, 64, 3), np.uint8)
    near = annotate_video(frames, np.array([[[0.5, 0.25, 1.5, 0.75]]]), [""], line_px=2)
    far = annotate_video(frames, np.array([[[0.5, 0.25, 1e9, 0.75]]]), [""], line_px=2)
    np.testing.assert_array_equal(near, far)
