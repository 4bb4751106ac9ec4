import subprocess
import sys
import textwrap

import imageio.v3 as iio
import joblib
import numpy as np
import pytest
import torch
from PIL import Image

from utils import video_io
from utils.video_io import (VideoReadError, load_latents, load_video, resolve_video_path, save_latents,
                            save_video, write_mp4)


def random_frames(num_frames=5, height=32, width=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def test_joblib_round_trip_is_exact(tmp_path):
    frames = random_frames()
    paths = save_video(frames, tmp_path / "video_0", formats=("joblib",))
    assert paths == {"joblib": tmp_path / "video_0.joblib"}
    loaded = load_video(paths["joblib"])
    assert loaded.dtype == np.uint8 and loaded.shape == frames.shape
    np.testing.assert_array_equal(loaded, frames)
    # Same file format as the reference: a plain joblib pickle of the array.
    np.testing.assert_array_equal(joblib.load(paths["joblib"]), frames)


def test_resolve_video_path_replaces_gif_suffix(tmp_path):
    assert resolve_video_path("run0/3/video_0.gif") == resolve_video_path("run0/3/video_0.joblib")
    assert str(resolve_video_path("run0/3/video_0.gif")).endswith("video_0.joblib")
    frames = random_frames(2)
    save_video(frames, tmp_path / "video_1")
    np.testing.assert_array_equal(load_video(resolve_video_path(tmp_path / "video_1.gif")), frames)


def test_gif_frame_count_duration_and_loop(tmp_path):
    frames = random_frames(6)
    path = save_video(frames, tmp_path / "video_0", formats=("gif",))["gif"]
    with Image.open(path) as image:
        assert image.n_frames == 6
        assert image.info["loop"] == 0
        durations = []
        for index in range(image.n_frames):
            image.seek(index)
            durations.append(image.info["duration"])
    # 125 ms (8 fps) stored in centiseconds: GIF rounds to 10 ms.
    assert all(abs(duration - 125) <= 5 for duration in durations), durations
    assert load_video(path).shape == frames.shape


@pytest.mark.parametrize("height,width", [(32, 48), (33, 47)])
def test_mp4_readable_with_frame_count_for_odd_sizes(tmp_path, height, width):
    frames = random_frames(7, height, width)
    path = write_mp4(frames, tmp_path / "video_0.mp4", fps=8.01)
    decoded = iio.imread(path, plugin="FFMPEG", index=None)
    # Odd sizes are padded by one edge row/column, never rescaled.
    assert decoded.shape == (7, height + height % 2, width + width % 2, 3)
    assert iio.immeta(path, plugin="FFMPEG")["fps"] == pytest.approx(8.01)
    # crf 17 keeps the picture close to the input (noise is the worst case for h264).
    smooth = np.repeat(np.linspace(0, 255, width, dtype=np.uint8)[None, None, :, None], height, axis=1)
    smooth = np.broadcast_to(smooth, (3, height, width, 3)).copy()
    decoded = load_video(write_mp4(smooth, tmp_path / "smooth.mp4"))
    assert np.abs(decoded[:, :height, :width].astype(int) - smooth).mean() < 3


def test_save_video_writes_joblib_last(tmp_path, monkeypatch):
    order = []

    def recording(name, writer):
        def record(*args, **kwargs):
            order.append(name)
            return writer(*args, **kwargs)
        return record

    monkeypatch.setitem(video_io._WRITERS, "gif", recording("gif", video_io.write_gif))
    monkeypatch.setitem(video_io._WRITERS, "mp4", recording("mp4", video_io.write_mp4))
    monkeypatch.setattr(video_io, "write_joblib", recording("joblib", video_io.write_joblib))
    paths = save_video(random_frames(3), tmp_path / "video_0", formats=("joblib", "gif", "mp4"))
    assert order == ["gif", "mp4", "joblib"]
    assert all(path.is_file() for path in paths.values())


def test_failed_gif_means_no_finished_marker(tmp_path, monkeypatch):
    def broken_gif(frames, path, fps):
        raise OSError("disk full")

    monkeypatch.setitem(video_io._WRITERS, "gif", broken_gif)
    with pytest.raises(OSError, match="disk full"):
        save_video(random_frames(2), tmp_path / "video_0")
    assert list(tmp_path.glob("video_*.joblib")) == []


def test_exception_mid_write_leaves_no_file(tmp_path, monkeypatch):
    def partial_dump(value, filename, compress):
        with open(filename, "wb") as handle:
            handle.write(b"BZh91AY")  # a started bz2 stream
        raise KeyboardInterrupt

    monkeypatch.setattr(joblib, "dump", partial_dump)
    with pytest.raises(KeyboardInterrupt):
        save_video(random_frames(2), tmp_path / "video_0")
    assert (tmp_path / "video_0.gif").is_file()  # written before the joblib
    assert list(tmp_path.glob("video_*.joblib")) == []
    assert [path.name for path in tmp_path.iterdir()] == ["video_0.gif"]  # temp file cleaned up


def test_killed_mid_write_leaves_no_finished_file(tmp_path):
    # os._exit skips every cleanup, like SIGKILL: the temp file stays, but under a hidden name.
    script = textwrap.dedent(f"""
        import os, joblib, numpy as np
        from utils.video_io import save_video
        def dying_dump(value, filename, compress):
            with open(filename, "wb") as handle:
                handle.write(b"BZh91AY")
                handle.flush()
            os._exit(9)
        joblib.dump = dying_dump
        save_video(np.zeros((2, 8, 8, 3), np.uint8), {str(tmp_path / "video_0")!r}, formats=("joblib",))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".video_0.")
    assert list(tmp_path.glob("video_*.joblib")) == []
    with pytest.raises(VideoReadError, match="not found"):
        load_video(tmp_path / "video_0.joblib")


@pytest.mark.parametrize("frames,match", [
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 3), np.uint8), r"\(F, H, W, 3\)"),
    (np.zeros((2, 8, 8, 4), np.uint8), r"\(F, H, W, 3\)"),
    (np.zeros((0, 8, 8, 3), np.uint8), "at least one frame"),
    ([[0]], "numpy uint8 array"),
])
def test_save_video_validates_input(tmp_path, frames, match):
    with pytest.raises(ValueError, match=match):
        save_video(frames, tmp_path / "video_0")
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_lists_supported(tmp_path):
    with pytest.raises(ValueError, match=r"avi.*supported.*gif.*mp4.*joblib"):
        save_video(random_frames(1), tmp_path / "video_0", formats=("gif", "avi"))
    assert list(tmp_path.iterdir()) == []


def test_load_video_errors(tmp_path):
    with pytest.raises(VideoReadError, match="not found"):
        load_video(tmp_path / "missing.joblib")
    corrupt = tmp_path / "corrupt.joblib"
    corrupt.write_bytes(b"not a joblib file")
    with pytest.raises(VideoReadError, match="could not read"):
        load_video(corrupt)
    wrong = tmp_path / "wrong.joblib"
    joblib.dump(np.zeros((4, 4), np.float64), wrong)
    with pytest.raises(VideoReadError, match="uint8"):
        load_video(wrong)
    other = tmp_path / "video.avi"
    other.write_bytes(b"x")
    with pytest.raises(VideoReadError, match="unsupported"):
        load_video(other)


def test_load_video_accepts_list_of_frames(tmp_path):
    # LVD-GLIGEN saved the pipeline's list of frames (spec 8.2).
    frames = random_frames(3)
    joblib.dump(list(frames), tmp_path / "list.joblib")
    np.testing.assert_array_equal(load_video(tmp_path / "list.joblib"), frames)


def test_latents_round_trip(tmp_path):
    latents = torch.randn(1, 4, 3, 8, 8, requires_grad=True)
    path = save_latents(latents * 2, tmp_path / "latents_0.pt")
    loaded = load_latents(path)
    assert loaded.device.type == "cpu" and not loaded.requires_grad
    torch.testing.assert_close(loaded, (latents * 2).detach())
    with pytest.raises(VideoReadError, match="not found"):
        load_latents(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(VideoReadError, match="could not read"):
        load_latents(tmp_path / "bad.pt")
