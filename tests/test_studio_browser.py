"""The studio in a real browser: `python app.py` in a subprocess, headless Chromium through Playwright.

Loads the page, checks the layout controls (the run-model's families ticked, energy guidance's fields
editable only while it is), plans from the demo cache, drags a box, generates with lvd_tiny at a few steps, and
checks that the videos, the energy plot and the reproduction command appear, that the files exist,
that the saved layout has the moved box, and that the video equals the library's bit for bit. The
page must make no request outside 127.0.0.1 (it works offline).

Screenshots of the three stages go to ``$LVD_TEST_ARTIFACTS/studio`` (default: the test's tmp folder).
``LVD_STUDIO_DOCS=1`` runs one more test: the studio as a user opens it (on lvd_shapes), whose screenshots
become ``docs/studio-{plan,edit,result}.png`` (the README's).

Skipped only when no Chromium binary exists (``apt-get install chromium``; .ci/run installs it). Under
CI (``CI=true``) a missing app extra (Gradio, Playwright) is a failure, not a skip.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import joblib
import numpy as np
import pytest

from studio_fixtures import DEMO_CACHE, DEMO_PROMPT, FAST_STEPS, REPO, copy_demo_cache, direct_library_video

pytestmark = pytest.mark.slow

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium")
# Debian's Chromium in a sandbox-less container without network: no GPU, no QUIC, no background
# traffic (update checks, sync, component downloads stall or fail on a closed network).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
APP_START_TIMEOUT_S = 120
GENERATE_TIMEOUT_MS = 180_000
SEED = 5
# Custom guidance: a threshold never reached and one iteration per step, so every step is guided
# (a curve of FAST_STEPS points) at the cost of FAST_STEPS backward passes.
LOSS_THRESHOLD = 0
MAX_ITER = 1
DRAG_PX = (45, -35)
DOCS_NAMES = {"plan": "studio-plan.png", "edit": "studio-edit.png", "result": "studio-result.png"}


def _chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        message = f"{module} is not installed: install the app extra with `bash scripts/setup.sh --dev --app`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def _torch_threads() -> str:
    """This process's torch thread count, for the app: CPU results are bit-identical across processes
    only with the same count (other tests change it), and the test compares the app's video with one
    computed here."""
    import torch

    return str(torch.get_num_threads())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + APP_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"app.py did not answer on {url} within {APP_START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


@contextlib.contextmanager
def _launch_app(tmp_path: Path, cache_dir: Path, output_dir: Path, extra_args: list[str]):
    """``python app.py`` on a free port (the README command, with ``extra_args``), stopped on exit."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium binary (apt-get install chromium; .ci/run installs it)")
    _require("gradio")
    _require("playwright")
    port = _free_port()
    log_path = tmp_path / "app.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               HF_HUB_CACHE=str(tmp_path / "empty-hub"), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=_torch_threads())
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--cache-dir", str(cache_dir),
                                    "--output-dir", str(output_dir), *extra_args],
                                   cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for(url, process, log_path)
        yield {"url": url, "chromium": chromium, "output_dir": output_dir, "cache_dir": cache_dir, "log": log_path}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture()
def running_app(tmp_path):
    """The app on lvd_tiny, with private cache and output folders."""
    cache_dir, output_dir = tmp_path / "cache", tmp_path / "img_generations"
    copy_demo_cache(cache_dir)
    with _launch_app(tmp_path, cache_dir, output_dir, ["--run-model", "lvd_tiny"]) as app:
        yield app


def _open_page(playwright, app, tmp_path: Path):
    """A fresh headless Chromium profile (Playwright passes it as --user-data-dir; it adds --headless itself)."""
    return playwright.chromium.launch_persistent_context(
        tmp_path / "chromium-profile", executable_path=app["chromium"], headless=True,
        args=[arg for arg in CHROMIUM_ARGS if arg != "--headless"], viewport={"width": 1360, "height": 1000})


def _docs_mode() -> bool:
    return os.environ.get("LVD_STUDIO_DOCS") == "1"


def _artifacts_dir(tmp_path: Path) -> Path:
    root = os.environ.get("LVD_TEST_ARTIFACTS")
    folder = (Path(root) if root else tmp_path) / "studio"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _stage(page, name: str):
    # Gradio puts a column's elem_id on two nested elements; the outer one frames the stage.
    return page.locator(f"#stage-{name}").first


def _drag_by(page, rect, offset_px: tuple[int, int]) -> dict:
    """Drags ``rect`` from its centre by ``offset_px``; returns its bounding box before the drag."""
    rect.scroll_into_view_if_needed()
    page.wait_for_timeout(500)  # the accordion above has finished opening: the box stays put
    box = rect.bounding_box()
    start = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(start[0] + offset_px[0], start[1] + offset_px[1], steps=10)
    page.mouse.up()
    return box


def test_plan_edit_generate_in_chromium(running_app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    artifacts = _artifacts_dir(tmp_path)
    shots = {}
    outside_requests = []
    console_errors = []
    with sync_playwright() as playwright:
        browser = _open_page(playwright, running_app, tmp_path)
        try:
            page = browser.new_page()
            page.on("request", lambda r: outside_requests.append(r.url)
                    if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.goto(running_app["url"], wait_until="networkidle")
            assert "Tiny random-weight model" in page.inner_text("#tiny-note")
            assert page.input_value("#prompt textarea") == DEMO_PROMPT

            # 0. Layout controls (issue 16, item 4): lvd_tiny's own family ticked; energy guidance's fields
            # are editable only while it is.
            group = page.locator("#layout-controls").first
            assert "Layout controls" in group.inner_text()
            ticked = {label: group.get_by_label(label, exact=True).is_checked()
                      for label in ("energy guidance", "attention masking", "attention modulation")}
            assert ticked == {"energy guidance": True, "attention masking": False, "attention modulation": False}
            assert group.get_by_label("GLIGEN grounding").count() == 0  # lvd_tiny's UNet is not grounded
            threshold = page.locator("#guidance-loss_threshold input")
            group.get_by_label("energy guidance", exact=True).uncheck()
            expect(threshold).to_be_disabled()
            group.get_by_label("energy guidance", exact=True).check()
            expect(threshold).to_be_enabled()

            # 1. Plan from the demo cache.
            page.click("#plan-button")
            page.wait_for_selector("#layout-editor .lvd-box", timeout=60_000)
            page.wait_for_function("document.querySelector('#edit-status').innerText.includes('Layout OK')")
            assert "Planned from cache_demo_v0.1_handwritten.json" in page.inner_text("#plan-status")
            assert page.locator("#layout-editor .lvd-box").count() == 6  # one bear in each keyframe
            page.get_by_text("LLM reply").click()  # show the reply the layout was parsed from
            page.wait_for_function("() => { const reply = document.querySelector('#reply-text textarea');"
                                   " return reply !== null && reply.value.includes('Frame 1:'); }")
            shots["plan"] = artifacts / "plan.png"
            _stage(page, "plan").screenshot(path=shots["plan"])

            # 2. Drag the bear of keyframe 4 up and to the right.
            preview_before = page.get_attribute("#layout-preview img", "src")
            box = _drag_by(page, page.locator("#layout-editor .lvd-box[data-frame='3'] .lvd-rect"), DRAG_PX)
            page.wait_for_function("(before) => { const img = document.querySelector('#layout-preview img');"
                                   " return img && img.getAttribute('src') !== before; }", arg=preview_before,
                                   timeout=30_000)
            moved = page.locator("#layout-editor .lvd-box[data-frame='3'] .lvd-rect").bounding_box()
            assert moved["x"] > box["x"] + 20 and moved["y"] < box["y"] - 15
            # Issue 17.16: every phrase label lies within its box's part on the canvas (it was overflowing and clipped):
            # an object with a long phrase is added (a quarter of the canvas wide), checked, and removed again.
            page.fill("#layout-editor .lvd-new-phrase", "a very large brown bear wearing a bright red woollen hat")
            page.click("#layout-editor .lvd-add")
            page.wait_for_function("document.querySelectorAll('#layout-editor .lvd-box').length === 12")
            overflowing = page.eval_on_selector_all("#layout-editor .lvd-box", """groups => groups.flatMap(g => {
                const label = g.querySelector('.lvd-label'), rect = g.querySelector('.lvd-rect');
                const svg = g.ownerSVGElement.getBoundingClientRect();
                const l = label.getBoundingClientRect(), r = rect.getBoundingClientRect();
                const left = Math.max(r.left, svg.left), right = Math.min(r.right, svg.right);
                return label.textContent && (l.left < left - 1 || l.right > right + 1) ? [label.textContent] : [];
            })""")
            assert overflowing == [], overflowing
            page.click("#layout-editor button[title='remove object 1']")
            page.wait_for_function("document.querySelectorAll('#layout-editor .lvd-box').length === 6")
            page.wait_for_function("document.querySelector('#edit-status').innerText.includes('Layout OK')")
            shots["edit"] = artifacts / "edit.png"
            _stage(page, "edit").screenshot(path=shots["edit"])

            # 3. Generate with lvd_tiny at a few steps, custom guidance.
            page.fill("#seed input", str(SEED))
            page.fill("#steps input", str(FAST_STEPS))
            page.fill("#guidance-loss_threshold input", str(LOSS_THRESHOLD))
            page.keyboard.press("Tab")
            page.fill("#guidance-max_iter input", str(MAX_ITER))
            page.keyboard.press("Tab")
            page.wait_for_function("document.querySelector('#preset input[value=\"custom\"]').checked")
            page.click("#generate-button")
            page.wait_for_function("document.querySelector('#generate-status').innerText.includes('Done')",
                                   timeout=GENERATE_TIMEOUT_MS)
            for element in ("#video-lvd img", "#video-baseline img", "#video-annotated img",
                            "#energy-plot svg.marks .mark-line path"):
                page.wait_for_selector(element, timeout=30_000)
            # Issue 17.16: the guided iterations are whole numbers on the plot's x axis, in order.
            x_ticks = page.eval_on_selector_all(
                '#energy-plot g.role-axis[aria-label^="X-axis"] g.role-axis-label text', "els => els.map(e => e.textContent)")
            command_text = page.inner_text("#repro-command")
            page.wait_for_timeout(500)  # let the plot finish its transition before the screenshot
            shots["result"] = artifacts / "result.png"
            _stage(page, "result").screenshot(path=shots["result"])
            page.screenshot(path=artifacts / "page.png", full_page=True)
        finally:
            browser.close()

    assert len(x_ticks) >= 2 and x_ticks == [str(i) for i in range(1, len(x_ticks) + 1)], x_ticks
    assert outside_requests == [], f"the page asked for assets outside 127.0.0.1: {outside_requests}"
    assert not console_errors, console_errors
    lines = [line for line in command_text.splitlines() if line.startswith("python generate.py")]
    assert len(lines) == 2, command_text
    lvd_line, baseline_line = lines
    assert f"--run-model lvd_tiny --seed_offset {SEED} --num_inference_steps {FAST_STEPS} " \
           f"--loss_threshold {float(LOSS_THRESHOLD)!r} --max_iter {MAX_ITER} --layout-file " in lvd_line
    assert "--run-model baseline_tiny" in baseline_line and f"--prompts '{DEMO_PROMPT}'" in baseline_line

    # The files the page names are on disk, as generate.py writes them.
    from studio import commands

    argv = commands.parse_command(lvd_line)
    layout_file = REPO / argv[argv.index("--layout-file") + 1]
    run_root = layout_file.parents[2]
    assert run_root.parent == running_app["output_dir"] / "studio"
    for path in ("lvd/config.json", "lvd/0/video_0.gif", "lvd/0/video_0.joblib", "lvd/0/video_0_annotated.gif",
                 "lvd/0/video_0.json", "baseline/config.json", "baseline/0/video_0.joblib", "commands.sh"):
        assert (run_root / path).is_file(), path
    assert json.loads((run_root / "lvd" / "config.json").read_text())["invocations"][-1]["command"] == argv

    # The saved layout has the moved box (and only that change); the video is the library's.
    saved = json.loads(layout_file.read_text())["layout"]["objects"][0]["keyframes_xyxy"]
    original = json.loads(_demo_layout_json())["objects"][0]["keyframes_xyxy"]
    changed = [k for k in range(6) if saved[k] != original[k]]
    assert changed == [3], (saved, original)
    assert saved[3][0] > original[3][0] and saved[3][1] < original[3][1]
    frames = joblib.load(run_root / "lvd" / "0" / "video_0.joblib")
    flags = {"loss_threshold": float(LOSS_THRESHOLD), "max_iter": MAX_ITER}
    assert np.array_equal(frames, direct_library_video(layout_file, "lvd_tiny", SEED, FAST_STEPS, flags))


def _demo_layout_json() -> str:
    from studio import backend

    return json.dumps(backend.layout_to_dict(backend.plan_from_cache(DEMO_CACHE, DEMO_PROMPT).layout))


@pytest.mark.skipif(not _docs_mode(), reason="refreshes the README's screenshots: LVD_STUDIO_DOCS=1")
def test_the_readme_screenshots_on_the_default_shapes_model(tmp_path):
    """The studio as a user opens it (`python app.py`: lvd_shapes, the shapes cache): plan the first prompt,
    drag the box of keyframe 4, generate with the page's defaults, and copy the three stages' screenshots to
    docs/ (the repository's cache/ is read, outputs go to the git-ignored img_generations/)."""
    from playwright.sync_api import sync_playwright

    with _launch_app(tmp_path, REPO / "cache", REPO / "img_generations", []) as app, \
            sync_playwright() as playwright:
        browser = _open_page(playwright, app, tmp_path)
        try:
            page = browser.new_page()
            page.goto(app["url"], wait_until="networkidle")
            page.click("#plan-button")
            page.wait_for_selector("#layout-editor .lvd-box", timeout=60_000)
            page.wait_for_function("document.querySelector('#edit-status').innerText.includes('Layout OK')")
            _stage(page, "plan").screenshot(path=tmp_path / "plan.png")
            _drag_by(page, page.locator("#layout-editor .lvd-box[data-frame='3'] .lvd-rect").first, DRAG_PX)
            page.wait_for_timeout(2000)
            _stage(page, "edit").screenshot(path=tmp_path / "edit.png")
            page.click("#generate-button")
            page.wait_for_function("document.querySelector('#generate-status').innerText.includes('Done')",
                                   timeout=900_000)
            page.wait_for_selector("#video-lvd img", timeout=30_000)
            page.wait_for_timeout(1000)
            _stage(page, "result").screenshot(path=tmp_path / "result.png")
        finally:
            browser.close()
    for stage, name in DOCS_NAMES.items():
        shutil.copyfile(tmp_path / f"{stage}.png", REPO / "docs" / name)
