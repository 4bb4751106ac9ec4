"""The studio page's handlers, called without a browser: messages instead of tracebacks, a failed
generation that leaves the app serving, the preset and run-model wiring. Needs the app extra."""
from __future__ import annotations

import json

import pytest

gr = pytest.importorskip("gradio", reason="the app extra is not installed (bash scripts/setup.sh --app)")

from studio import backend, editor, ui  # noqa: E402
from studio_fixtures import DEMO_CACHE, DEMO_PROMPT, studio_settings  # noqa: E402

ENERGY = ["energy"]  # the layout controls of lvd_tiny (its method's), as the page sends them


@pytest.fixture()
def studio(tmp_path):
    return ui.Studio(studio_settings(tmp_path))


def test_the_page_builds_offline_and_opens_on_the_shipped_shapes_model(tmp_path, monkeypatch):
    # Issue 15: the studio opens on the shipped trained model (LVD-Shapes); the tiny models stay available.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    app = ui.build_app(studio_settings(tmp_path))
    assert app.analytics_enabled is False
    assert app.studio.default_run_model() == "lvd_shapes"
    assert app.studio.available_run_models() == ["lvd_tiny", "lvd-gligen_tiny", "lvd-plus_tiny", "lvd_shapes",
                                                 "lvd_wan_shapes", "lvd_wan_tiny"]
    assert "<code>lvd_zeroscope</code>" in app.studio.unavailable_html()
    assert app.studio.default_cache() == DEMO_CACHE.name


def test_plan_then_edit(studio):
    state, status, reply, preview, edit_status, download = studio.plan(
        ui.SOURCE_CACHE, DEMO_CACHE.name, DEMO_PROMPT, 0, "", "lvd_tiny")
    assert status.startswith("Planned from cache_demo_v0.1_handwritten.json, reply 0: 1 object(s) (bear)")
    assert "Frame 1:" in reply and preview.endswith(".gif") and edit_status.startswith("Layout OK")
    assert json.loads(open(download).read())["layout"]["objects"][0]["phrase"] == "bear"
    assert (state["width"], state["height"]) == (128, 128) and state["palette"][0] == backend.editor_palette()[0]
    moved = editor.move_box(state, 0, 0, 0.25, 0)
    _, _, download = studio.edited(moved, "lvd_tiny")
    saved = backend.read_layout_file(download)
    assert saved == editor.state_to_layout(moved)


def test_plan_and_edit_problems_are_messages(studio):
    outputs = studio.plan(ui.SOURCE_CACHE, DEMO_CACHE.name, "A cat that is not cached", 0, "", "lvd_tiny")
    assert outputs[1].startswith("**Plan failed:** no reply for 'A cat that is not cached'")
    outputs = studio.plan(ui.SOURCE_LLM, None, DEMO_PROMPT, 0, "gpt-4", "lvd_tiny")
    assert outputs[1] == ("**Plan failed:** no LLM endpoint is configured; start the app with --llm-base-url / "
                          "OPENAI_API_KEY")
    state = studio.plan(ui.SOURCE_CACHE, DEMO_CACHE.name, DEMO_PROMPT, 0, "", "lvd_tiny")[0]
    state["objects"][0]["boxes"] = [None] * 6
    _, message, _ = studio.edited(state, "lvd_tiny")
    assert message == ("**Layout problem:** object 0 ('bear'): the object is in no keyframe; tick at least one "
                       "or remove it")
    assert studio.save_to_cache(state)[0].startswith("**Not saved:** object 0 ('bear')")


def test_save_to_cache_reports_the_file(studio):
    state = studio.plan(ui.SOURCE_CACHE, DEMO_CACHE.name, DEMO_PROMPT, 0, "", "lvd_tiny")[0]
    message, choices = studio.save_to_cache(state)
    assert message.startswith(f"Saved as reply 0 of {DEMO_PROMPT!r} in `")
    assert "cache_studio_v0.1_edited.json" in message
    assert choices["choices"] == [DEMO_CACHE.name, "cache_studio_v0.1_edited.json"]


def test_presets_and_run_model_change(studio):
    weak = studio.preset_values(backend.PRESET_WEAK, "lvd_tiny")
    assert [u["value"] for u in weak] == [2.5, 250.0, 1, 10, 0.25, 0.25, 1.0, 2.0, 0.0]
    assert all(u == gr.update() for u in studio.preset_values(backend.PRESET_CUSTOM, "lvd_tiny"))
    state = studio.plan(ui.SOURCE_CACHE, DEMO_CACHE.name, DEMO_PROMPT, 0, "", "lvd_tiny")[0]
    new_state, note, controls, steps, preview, status, download, *fields = studio.run_model_changed(
        "lvd-gligen_tiny", state, backend.PRESET_PAPER)
    assert steps["value"] == 40  # the paper's
    assert note["visible"] is True and all(f["interactive"] is False for f in fields)  # no attention guidance
    assert new_state["objects"] == state["objects"]
    assert controls["value"] == ["gligen"]
    assert controls["choices"] == [("GLIGEN grounding", "gligen"), ("attention masking", "mask"),
                                   ("attention modulation", "modulate")]
    _, _, controls, _, _, _, _, *fields = studio.run_model_changed("lvd_tiny", None, backend.PRESET_CUSTOM)
    assert controls["value"] == ["energy"] and all(f["interactive"] is True for f in fields)
    steps = studio.run_model_changed("lvd_shapes", None, backend.PRESET_CUSTOM)[3]
    assert steps["value"] == 20  # the shapes models' default, not the paper's 40


def test_a_failed_generation_is_a_message_and_the_next_one_works(studio, monkeypatch):
    state = studio.plan(ui.SOURCE_CACHE, DEMO_CACHE.name, DEMO_PROMPT, 0, "", "lvd_tiny")[0]
    values = list(backend.guidance_preset_values(backend.PRESET_PAPER, "lvd_tiny").values())
    real_run = backend.run_generation

    def failing(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(backend, "run_generation", failing)
    outputs = studio.generate(state, "lvd_tiny", 0, 2, True, ENERGY, *values, progress=lambda *a, **k: None)
    assert outputs[0] == "**Generation failed:** RuntimeError: CUDA error: device-side assert triggered"
    assert outputs[1:] == (None, None, None, None, "", "")
    monkeypatch.setattr(backend, "run_generation", real_run)
    bad = dict(state, prompt=" ".join(["very"] * 80) + " long bear")
    outputs = studio.generate(bad, "lvd_tiny", 0, 2, True, ENERGY, *values, progress=lambda *a, **k: None)
    assert outputs[0].startswith("**Cannot generate:**") and "77-token limit" in outputs[0]
    outputs = studio.generate(state, "lvd_tiny", 0.5, 2, True, ENERGY, *values, progress=lambda *a, **k: None)
    assert outputs[0] == "**Cannot generate:** the seed must be a whole number, found 0.5"
    status, lvd, baseline, annotated, energy, command, saved = studio.generate(
        state, "lvd_tiny", 3, 2, True, ENERGY, *values, progress=lambda *a, **k: None)
    assert status.startswith("Done: lvd_tiny in") and "These videos are noise" in status
    assert lvd.endswith("lvd/0/video_0.gif") and baseline.endswith("baseline/0/video_0.gif")
    assert annotated.endswith("video_0_annotated.gif") and list(energy.columns) == ["iteration", "energy", "step"]
    assert command.startswith("```shell\npython generate.py --run-model lvd_tiny --seed_offset 3 "
                              "--num_inference_steps 2 --layout-file ") and command.endswith("\n```")
    assert "--run-model baseline_tiny" in command.splitlines()[2] and "commands.sh" in saved


# --------------------------------------------------------------------------------------------
# Issue 17: errors with text, bounded files, the shipped cache first, one progress bar, a one-point plot


def test_nan_and_huge_numbers_are_messages_and_make_nothing(studio):
    state = studio.plan(ui.SOURCE_CACHE, DEMO_CACHE.name, DEMO_PROMPT, 0, "", "lvd_tiny")[0]
    values = list(backend.guidance_preset_values(backend.PRESET_PAPER, "lvd_tiny").values())
    plan = studio.plan(ui.SOURCE_CACHE, DEMO_CACHE.name, DEMO_PROMPT, float("nan"), "", "lvd_tiny")
    assert plan[1] == "**Plan failed:** the reply number must be a whole number, found nan"
    no_progress = {"progress": lambda *a, **k: None}
    for seed, steps, message in ((float("nan"), 2, "the seed must be a whole number, found nan"),
                                 (0, float("nan"), "the number of steps must be a whole number, found nan"),
                                 (1e308, 2, "the seed must be from 0 to 4294967295, found 1e+308")):
        outputs = studio.generate(state, "lvd_tiny", seed, steps, True, ENERGY, *values, **no_progress)
        assert outputs[0] == f"**Cannot generate:** {message}"
    nan_iter = [float("nan") if name == "max_iter" else v for name, v in zip(backend.GUIDANCE_FIELDS, values)]
    outputs = studio.generate(state, "lvd_tiny", 0, 2, True, ENERGY, *nan_iter, **no_progress)
    assert outputs[0] == "**Cannot generate:** the guidance value max_iter must be a whole number, found nan"
    assert not (studio.settings.output_dir / "studio" / "run0").exists()


def test_requests_the_handlers_never_see_are_answered_with_gradios_message(studio):
    assert ui.launch_kwargs(studio.settings, studio)["show_error"] is True


def test_page_files_stay_in_the_output_folder_and_bounded(studio):
    assert studio.scratch_dir.resolve().is_relative_to(studio.settings.output_dir.resolve())
    state = studio.plan(ui.SOURCE_CACHE, DEMO_CACHE.name, DEMO_PROMPT, 0, "", "lvd_tiny")[0]
    for step in range(backend.MAX_PREVIEW_FOLDERS // 2 + 4):   # two files per edit: enough to pass the bound
        studio.edited(editor.move_box(state, 0, 0, step / 512, 0), "lvd_tiny")
    files = [p for p in studio.scratch_dir.rglob("*") if p.is_file()]
    assert len(files) <= backend.MAX_PREVIEW_FOLDERS
    again = ui.Studio(studio.settings)   # a new server starts with an empty folder
    assert list(again.scratch_dir.iterdir()) == []


def test_the_default_cache_is_the_shipped_one(tmp_path):
    settings = studio_settings(tmp_path)
    (settings.cache_dir / "cache_demo_v0.1_aaa-model.json").write_text("{}")
    assert ui.Studio(settings).default_cache() == DEMO_CACHE.name


def test_one_progress_bar_for_a_generation(tmp_path):
    app = ui.build_app(studio_settings(tmp_path))
    generate = next(d for d in app.get_config_file()["dependencies"] if d["api_name"] == "generate")
    assert generate["show_progress_on"] == generate["outputs"][:1]   # the status pane only


def test_a_single_guided_iteration_is_a_sentence_not_a_plot(studio):
    state = studio.plan(ui.SOURCE_CACHE, DEMO_CACHE.name, DEMO_PROMPT, 0, "", "lvd_tiny")[0]
    values = dict(backend.guidance_preset_values(backend.PRESET_PAPER, "lvd_tiny"), max_iter=1, loss_threshold=0.0)
    status, *_, energy, command, saved = studio.generate(state, "lvd_tiny", 0, 1, False, ENERGY, *values.values(),
                                                         progress=lambda *a, **k: None)
    assert "- one guided iteration, at denoising step 0: energy " in status
    assert energy.empty and list(energy.columns) == ["iteration", "energy", "step"]


# --------------------------------------------------------------------------------------------
# Issue 16, item 4: any set of layout control families from the page


def test_the_layout_controls_open_on_the_run_models_families(tmp_path):
    app = ui.build_app(studio_settings(tmp_path, opening_run_model="lvd_tiny"))
    group = next(c for c in app.get_config_file()["components"] if c["props"].get("elem_id") == "layout-controls")
    assert group["props"]["label"] == "Layout controls" and group["props"]["value"] == ["energy"]
    assert [value for _, value in group["props"]["choices"]] == ["energy", "mask", "modulate"]


def test_the_guidance_fields_follow_energy_guidance(studio):
    assert all(u["interactive"] is False for u in studio.controls_changed(["mask"]))
    assert all(u["interactive"] is False for u in studio.controls_changed([]))
    assert all(u["interactive"] is True for u in studio.controls_changed(["energy", "mask"]))


def test_a_generation_with_masking_says_so_and_shows_its_command(studio):
    state = studio.plan(ui.SOURCE_CACHE, DEMO_CACHE.name, DEMO_PROMPT, 0, "", "lvd_tiny")[0]
    values = dict(backend.guidance_preset_values(backend.PRESET_PAPER, "lvd_tiny"), max_iter=1, loss_threshold=0.0)
    no_progress = {"progress": lambda *a, **k: None}
    status, lvd, *_, energy, command, saved = studio.generate(state, "lvd_tiny", 0, 1, False, ["mask"],
                                                              *values.values(), **no_progress)
    assert status.startswith("Done: lvd_tiny in") and "- layout controls: attention masking" in status
    assert "guided iteration" not in status and energy.empty
    assert "--control mask --layout-file " in command and "--max_iter" not in command  # energy's flags: not used
    outputs = studio.generate(state, "lvd_tiny", 0, 1, False, ["gligen"], *values.values(), **no_progress)
    assert outputs[0] == ("**Cannot generate:** --control gligen needs a grounded UNet (lvd-gligen_*, lvd-plus_*), "
                          "not 'lvd_tiny'")


def test_the_energy_plot_counts_iterations_in_whole_numbers():
    """Issue 17.16: iterations are categories "1", "2", ... in numeric order (a numeric axis ticks at 1.5)."""
    from studio.ui import ITERATION_ORDER, Studio

    log = [{"energy": 10.0 - i, "step": i // 3} for i in range(12)]
    frame = Studio.energy_frame(log)
    assert list(frame["iteration"]) == [str(i) for i in range(1, 13)]
    assert [ITERATION_ORDER.index(label) for label in frame["iteration"]] == list(range(12))  # "10" after "9"
    assert Studio.energy_frame(log[:1]).empty  # one iteration: a sentence in the status instead
