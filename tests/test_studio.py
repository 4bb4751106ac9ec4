"""The studio's pure functions and backend: editor state, validation, commands, presets, plan, save,
and one tiny generation that must equal the library (and generate.py's reproduction command) bit for bit."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import joblib
import numpy as np
import pytest
import torch

from studio import backend, commands, editor
from studio_fixtures import (DEMO_CACHE, DEMO_PROMPT, FAST_STEPS, REPO, demo_layout, direct_library_video,
                             studio_settings)
from utils.cache import LayoutCache
from utils.layout import Box, ObjectTrack, SceneLayout, build_condition, parse_layout


def _odd_layout() -> SceneLayout:
    """Float boxes off the 1/512 grid, an absent keyframe, a box leaving the canvas, two objects."""
    cat = ObjectTrack(3, "grey cat", (Box(0.1, 0.2, 0.30000000000000004, 0.5), None, Box(1 / 3, 0.2, 0.7, 0.9),
                                      Box(0.5, 0.5, 0.9, 0.95), None, Box(0.6, 0.1, 1.05, 0.4)))
    ball = ObjectTrack(7, "red ball", tuple(Box(0.0, 0.7, 0.1, 0.8) for _ in range(6)))
    return SceneLayout(prompt="A grey cat chases a red ball", background="garden", tracks=(cat, ball),
                       reasoning="composed for a test")


# --------------------------------------------------------------------------------------------
# Editor state


@pytest.mark.parametrize("layout", [demo_layout(), _odd_layout()], ids=["demo", "odd"])
def test_layout_state_round_trip_is_exact(layout):
    state = editor.layout_to_state(layout, width=576, height=320, palette=backend.editor_palette())
    # The state is what the browser holds: it must survive JSON unchanged.
    state = json.loads(json.dumps(state))
    assert state["width"] == 576 and state["height"] == 320 and len(state["palette"]) >= 2
    assert editor.state_to_layout(state) == layout


def test_moved_box_snaps_to_the_grid_and_survives_the_reply_grammar(tmp_path):
    layout = demo_layout()
    state = editor.layout_to_state(layout, width=128, height=128)
    moved = editor.state_to_layout(editor.move_box(state, 0, 2, 0.1, -0.05))
    before, after = layout.tracks[0].keyframes[2], moved.tracks[0].keyframes[2]
    assert after != before
    assert math.isclose(after.x_min - before.x_min, 51 / 512) and math.isclose(after.y_min - before.y_min, -26 / 512)
    assert all(v * 512 == round(v * 512) for v in after.as_tuple())  # on the 512 grid
    assert moved.tracks[0].keyframes[:2] == layout.tracks[0].keyframes[:2]
    # Saved as a reply, it parses back to exactly this layout (the cache keeps pixel xywh).
    settings = studio_settings(tmp_path)
    path, occurrence = backend.save_layout_to_cache(moved, settings)
    assert parse_layout(LayoutCache.load(path).get(DEMO_PROMPT, occurrence), DEMO_PROMPT) == moved


def test_add_and_remove_objects():
    state = editor.layout_to_state(demo_layout(), width=128, height=128)
    added = editor.add_object(state, "  small bird ")
    layout = editor.state_to_layout(added)
    assert [(t.id, t.phrase) for t in layout.tracks] == [(0, "bear"), (1, "small bird")]
    assert all(box == Box(*editor.DEFAULT_NEW_BOX) for box in layout.tracks[1].keyframes)
    assert editor.state_to_layout(editor.remove_object(added, 0)).phrases == ("small bird",)
    with pytest.raises(editor.EditorStateError, match="no object with id 5; the ids are \\[0, 1\\]"):
        editor.remove_object(added, 5)
    with pytest.raises(editor.EditorStateError, match="needs a phrase"):
        editor.add_object(state, " ")


def _demo_state():
    return editor.layout_to_state(demo_layout(), width=128, height=128)


def _broken(change):
    state = json.loads(json.dumps(_demo_state()))
    change(state)
    return state


@pytest.mark.parametrize("state, message", [
    (None, "expected the editor state as a JSON object, found NoneType; plan a layout first"),
    (_broken(lambda s: s.update(prompt=" ")), "the layout needs a prompt"),
    (_broken(lambda s: s["objects"][0].update(phrase="")), "object 0: the phrase is empty"),
    (_broken(lambda s: s["objects"].append(dict(s["objects"][0]))), "object 0 \\('bear'\\): the id 0 is used"),
    (_broken(lambda s: s["objects"][0]["boxes"].pop()), "object 0 \\('bear'\\): expected 6 keyframe entries, found 5"),
    (_broken(lambda s: s["objects"][0].update(boxes=[None] * 6)),
     "object 0 \\('bear'\\): the object is in no keyframe"),
    (_broken(lambda s: s["objects"][0]["boxes"].__setitem__(3, [0.5, 0.5, 0.4, 0.9])),
     "object 0 \\('bear'\\), keyframe 4: the box is inverted .* xyxy \\[0.5, 0.5, 0.4, 0.9\\]"),
    (_broken(lambda s: s["objects"][0]["boxes"].__setitem__(1, [0.1, float("nan"), 0.4, 0.9])),
     "object 0 \\('bear'\\), keyframe 2: a box coordinate must be a finite number, found nan"),
    (_broken(lambda s: s["objects"][0]["boxes"].__setitem__(0, [0.1, 0.2, 0.3])),
     "keyframe 1: expected a box \\[x_min, y_min, x_max, y_max\\], found \\[0.1, 0.2, 0.3\\]"),
    (_broken(lambda s: s["objects"][0].update(id="0")), "object #0: the id must be an integer, found '0'"),
])
def test_invalid_edits_are_rejected_saying_where(state, message):
    with pytest.raises(editor.EditorStateError, match=message):
        editor.state_to_layout(state)


def test_boxes_leaving_the_canvas_are_allowed_with_a_note():
    state = _broken(lambda s: s["objects"][0]["boxes"].__setitem__(5, [0.8, 0.5, 1.1, 0.7]))
    assert editor.validate_state(state) == [
        "object 0 ('bear'), keyframe 6: the box leaves the canvas (it is clipped when the masks are made)"]
    assert editor.state_to_layout(state).tracks[0].keyframes[5] == Box(0.8, 0.5, 1.1, 0.7)


def test_run_model_change_keeps_the_boxes():
    state = _demo_state()
    wide = editor.with_canvas(state, width=576, height=320)
    assert (wide["width"], wide["height"]) == (576, 320) and editor.state_to_layout(wide) == demo_layout()


# --------------------------------------------------------------------------------------------
# Command lines and presets


def test_lvd_command_round_trips_through_the_shell_and_generate_parser():
    settings = commands.CommandSettings(seed=123, num_inference_steps=7, device="cpu")
    flags = {"loss_scale": 2.5, "loss_threshold": 0.1 + 0.2, "max_iter": 1}
    command = commands.build_lvd_command("lvd_tiny", "out dir/it's layout.json", settings, flags, "img gens/x")
    line = commands.format_command(command.argv)
    assert line.startswith("python generate.py --run-model lvd_tiny --seed_offset 123 --num_inference_steps 7 "
                           "--device cpu --loss_scale 2.5 --loss_threshold 0.30000000000000004 --max_iter 1 ")
    assert commands.parse_command(line) == list(command.argv)
    args = backend._parse_generate_args(command.config_argv)
    configs = backend._build_configs(args)
    sampling, guidance, gligen = configs.sampling, configs.guidance, configs.gligen
    assert (args.seed_offset, sampling.num_inference_steps, args.device) == (123, 7, "cpu")
    assert (guidance.loss_scale, guidance.loss_threshold, guidance.max_iter) == (2.5, 0.1 + 0.2, 1)
    assert gligen is None


def test_lvd_command_names_the_controls_only_when_they_are_not_the_run_models():
    # Issue 16, item 4: any set of families from the studio, shown as generate.py's --control.
    settings = commands.CommandSettings(seed=1, num_inference_steps=2)
    default = commands.build_lvd_command("lvd_tiny", "l.json", settings, {}, "o")
    assert "--control" not in default.argv
    both = commands.build_lvd_command("lvd_tiny", "l.json", settings, {"max_iter": 1}, "o", ("energy", "mask"))
    assert both.config_argv[-5:] == ("--control", "energy", "mask", "--max_iter", "1")
    configs = backend._build_configs(backend._parse_generate_args(both.config_argv))
    assert configs.controls == ("energy", "mask") and configs.guidance.max_iter == 1
    assert [type(config).__name__ for config in configs.attention] == ["MaskingConfig"]
    none = commands.build_lvd_command("lvd_tiny", "l.json", settings, {}, "o", ())
    assert none.config_argv[-2:] == ("--control", "none")
    configs = backend._build_configs(backend._parse_generate_args(none.config_argv))
    assert configs.controls == () and configs.layout_only and configs.guidance is None


def test_control_choices_follow_the_run_model(tmp_path):
    statuses = {s.name: s for s in backend.list_run_models(studio_settings(tmp_path))}
    assert statuses["lvd_tiny"].controls == ("energy",)
    assert statuses["lvd_tiny"].control_choices == ("energy", "mask", "modulate")
    assert statuses["lvd-gligen_tiny"].control_choices == ("gligen", "mask", "modulate")  # names no guided layers
    assert statuses["lvd-plus_tiny"].controls == ("gligen", "energy")
    assert statuses["lvd-plus_tiny"].control_choices == ("gligen", "energy", "mask", "modulate")


def test_baseline_command_takes_the_prompt_as_it_is():
    settings = commands.CommandSettings(seed=5, num_inference_steps=40)
    command = commands.build_baseline_command("baseline_tiny", "A 'quoted' bear", settings, "out")
    assert command.argv == ("python", "generate.py", "--run-model", "baseline_tiny", "--seed_offset", "5",
                            "--num_inference_steps", "40", "--prompts", "A 'quoted' bear", "--output-dir", "out")
    assert commands.parse_command(commands.format_command(command.argv)) == list(command.argv)


def test_guidance_presets():
    assert backend.guidance_flags(backend.guidance_preset_values(backend.PRESET_PAPER, "lvd_tiny")) == {}
    weak = backend.guidance_flags(backend.guidance_preset_values(backend.PRESET_WEAK, "lvd_tiny"))
    assert weak == {"loss_scale": 2.5, "loss_threshold": 250.0, "max_iter": 1, "fg_top_p": 0.25, "bg_top_p": 0.25,
                    "bg_weight": 2.0}
    assert backend.guidance_preset_values(backend.PRESET_WEAK, "lvd_zeroscope")["loss_threshold"] == 350.0
    custom = dict(backend.guidance_preset_values(backend.PRESET_CUSTOM, "lvd_tiny"), max_iter=2.0)
    assert backend.guidance_flags(custom) == {"max_iter": 2}
    with pytest.raises(backend.StudioError, match="max_iter must be a whole number, found 2.5"):
        backend.guidance_flags(dict(custom, max_iter=2.5))
    with pytest.raises(backend.StudioError, match="fg_top_p must be a number, found None"):
        backend.guidance_flags(dict(custom, fg_top_p=None))


def test_each_layout_run_model_is_paired_with_its_baseline():
    pairs = {spec: backend.baseline_for(backend.get_spec(spec)).name
             for spec in ("lvd_tiny", "lvd_zeroscope", "lvd_modelscope256", "lvd_modelscope512",
                          "lvd-gligen_modelscope256", "lvd-plus_tiny")}
    assert pairs == {"lvd_tiny": "baseline_tiny", "lvd_zeroscope": "zeroscope", "lvd_modelscope256": "modelscope_256",
                     "lvd_modelscope512": "modelscope", "lvd-gligen_modelscope256": "modelscope_256",
                     "lvd-plus_tiny": "baseline_tiny"}


def test_only_run_models_with_local_weights_are_available(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    statuses = {s.name: s for s in backend.list_run_models(studio_settings(tmp_path))}
    assert statuses["lvd_tiny"].available and statuses["lvd_tiny"].baseline == "baseline_tiny"
    assert "baseline_tiny" not in statuses  # baselines are generated beside, not chosen
    zeroscope = statuses["lvd_zeroscope"]
    assert not zeroscope.available and "`hf download cerspense/zeroscope_v2_576w`" in zeroscope.hint
    assert "--revision weights_only" in statuses["lvd-plus_modelscope256"].hint


# --------------------------------------------------------------------------------------------
# Plan and save


def test_plan_from_the_demo_cache():
    plan = backend.plan_from_cache(DEMO_CACHE, DEMO_PROMPT + ".")
    assert plan.layout.phrases == ("bear",) and plan.layout.background == "forest"
    assert plan.source == "cache_demo_v0.1_handwritten.json, reply 0"


def test_plan_errors_are_the_project_messages(tmp_path):
    path = tmp_path / "cache_demo_v0.1_broken.json"
    path.write_text(json.dumps({"A dog runs": ["Frame 1: [{'id': 0, 'name': 'dog', 'box': [1, 2, 3, 4]}]\n"
                                              "Frame 2: [{'id': 0, 'name': 'dog', 'box': [1, 2, 3, 4]}]"]}))
    with pytest.raises(backend.StudioError) as error:
        backend.plan_from_cache(path, "A dog runs")
    assert str(error.value).startswith("prompt 'A dog runs', Frame 2: reply is incomplete: no 'Frame 3:' label")
    with pytest.raises(backend.StudioError, match="no reply for 'A cat' in .* \\(1 prompts\\)"):
        backend.plan_from_cache(path, "A cat")
    with pytest.raises(backend.StudioError, match="has 1 reply\\(s\\) for 'A dog runs'; reply number 3"):
        backend.plan_from_cache(path, "A dog runs", 3)
    with pytest.raises(backend.StudioError, match="no cache file at"):
        backend.plan_from_cache(tmp_path / "missing.json", "A dog runs")
    (tmp_path / "cache_bad.json").write_text("[1, 2]")
    with pytest.raises(backend.StudioError, match="expected a JSON object of prompt -> list of replies"):
        backend.plan_from_cache(tmp_path / "cache_bad.json", "A dog runs")


def test_plan_from_an_openai_compatible_endpoint():
    from openai_server import FakeOpenAIServer, layout_reply

    from utils.llm import LLMConfig

    with FakeOpenAIServer(default=lambda caption: layout_reply(caption, name="fox")) as server:
        server.script("A broken one", "Frame 1: [{'id': 0, 'name': 'fox', 'box': [0, 0, 9, 9]}] and nothing else")
        llm = backend.LLMSettings(config=LLMConfig(model="local-model", base_url=server.base_url, max_retries=0),
                                  max_parse_attempts=1, parse_retry_delay_s=0)
        plan = backend.plan_from_llm(llm, "A fox runs", model="other-model")
        assert plan.layout.phrases == ("fox",) and plan.source.startswith("other-model at http://127.0.0.1:")
        with pytest.raises(backend.StudioError, match="no parsable reply in 1 attempt\\(s\\); last problem: Frame 1: "
                                                      "reply is incomplete: no 'Frame 2:' label"):
            backend.plan_from_llm(llm, "A broken one")
    with pytest.raises(backend.StudioError, match="no LLM endpoint is configured"):
        backend.plan_from_llm(None, "A fox runs")


def test_saving_writes_only_the_studio_cache(tmp_path):
    settings = studio_settings(tmp_path)
    source = settings.cache_dir / DEMO_CACHE.name
    before = source.read_bytes()
    layout = demo_layout()
    path, first = backend.save_layout_to_cache(layout, settings)
    _, second = backend.save_layout_to_cache(layout, settings)
    assert path.name == "cache_studio_v0.1_edited.json" and (first, second) == (0, 1)
    assert source.read_bytes() == before
    assert backend.plan_from_cache(path, DEMO_PROMPT, 1).layout == layout


# --------------------------------------------------------------------------------------------
# Generation: the studio's result is the library's, and the command reproduces it


SEED = 11
FLAGS = {"loss_threshold": 0.0, "max_iter": 1}  # one guided iteration in every step of the short run


@pytest.fixture(scope="module")
def studio_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("studio-run")
    layout = demo_layout()
    state = editor.move_box(editor.layout_to_state(layout, width=128, height=128), 0, 3, -0.2, -0.3)
    edited = editor.state_to_layout(state)
    settings = studio_settings(tmp_path)
    request = backend.GenerationRequest(layout=edited, run_model="lvd_tiny", seed=SEED,
                                        num_inference_steps=FAST_STEPS, guidance_flags=FLAGS)
    progress = []
    result = backend.run_generation(request, settings, backend.ModelPool(settings), lambda *a: progress.append(a))
    return {"result": result, "layout": layout, "edited": edited, "progress": progress}


def test_generation_writes_what_generate_py_writes(studio_run):
    result = studio_run["result"]
    assert result.run_root.name == "run0" and result.run_root.parent.name == "studio"
    for path in (result.lvd.video_gif, result.lvd.video_joblib, result.lvd.annotated_gif, result.layout_file,
                 result.lvd.run_dir / "config.json", result.lvd.run_dir / "0" / "video_0.json",
                 result.baseline.video_joblib, result.baseline.run_dir / "config.json", result.commands_file):
        assert path.is_file(), path
    config = json.loads((result.lvd.run_dir / "config.json").read_text())
    assert config["invocations"][-1]["command"] == list(result.lvd.command)
    assert config["sampling"]["num_inference_steps"] == FAST_STEPS and config["guidance"]["loss_threshold"] == 0.0
    assert json.loads((result.baseline.run_dir / "config.json").read_text())["guidance"] is None
    meta = json.loads((result.lvd.run_dir / "0" / "video_0.json").read_text())
    assert meta["seed"] == SEED and len(result.guidance_log) == meta["guided_iterations"] == FAST_STEPS
    assert studio_run["progress"][0] == (f"lvd_tiny: denoising step 1/{FAST_STEPS}", 1, 2 * FAST_STEPS)
    assert studio_run["progress"][-1] == (f"baseline_tiny: denoising step {FAST_STEPS}/{FAST_STEPS}",
                                          2 * FAST_STEPS, 2 * FAST_STEPS)
    text = result.commands_file.read_text()
    assert commands.format_command(result.lvd.command) in text
    assert commands.format_command(result.baseline.command) in text


def test_edited_box_changes_the_saved_layout_and_the_guidance_targets(studio_run):
    result, layout, edited = studio_run["result"], studio_run["layout"], studio_run["edited"]
    saved = backend.read_layout_file(result.layout_file)
    assert saved == edited != layout
    assert saved.tracks[0].keyframes[3] != layout.tracks[0].keyframes[3]
    from models.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    before, after = (build_condition(x, 8, tokenizer).boxes_xyxy for x in (layout, saved))
    assert not np.array_equal(before, after)
    assert json.loads(result.layout_file.read_text())["boxes_xyxy"] == after.tolist()


def test_studio_video_equals_the_library_bit_for_bit(studio_run):
    result = studio_run["result"]
    frames = joblib.load(result.lvd.video_joblib)
    expected = direct_library_video(result.layout_file, "lvd_tiny", SEED, FAST_STEPS, FLAGS)
    assert frames.dtype == np.uint8 and frames.shape == (8, 128, 128, 3)
    assert np.array_equal(frames, expected)


def _generate_py_knows(flag: str) -> bool:
    import generate

    return flag in generate.build_parser().format_help()


@pytest.mark.slow
@pytest.mark.parametrize("which, flag", [("lvd", "--layout-file"), ("baseline", "--prompts")])
def test_reproduction_command_gives_the_same_video(studio_run, which, flag):
    if not _generate_py_knows(flag):
        pytest.xfail(f"needs generate.py {flag} (lead)")
    video = getattr(studio_run["result"], which)
    argv = [sys.executable, *video.command[1:]]
    # CPU results are bit-identical across processes only with the same torch thread count (other tests
    # change this process's), so the command runs with this process's.
    import torch

    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    completed = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    output_dir = REPO / argv[argv.index("--output-dir") + 1]
    reproduced = sorted(output_dir.rglob("video_0.joblib"))
    assert len(reproduced) == 1, reproduced
    assert np.array_equal(joblib.load(reproduced[0]), joblib.load(video.video_joblib))


def test_generation_rejects_what_the_library_rejects(tmp_path):
    settings = studio_settings(tmp_path)
    long_prompt = " ".join(["very"] * 80) + " long bear"
    layout = dataclasses.replace(demo_layout(), prompt=long_prompt)
    request = backend.GenerationRequest(layout=layout, run_model="lvd_tiny", seed=0, num_inference_steps=1)
    with pytest.raises(backend.StudioError, match="past the text encoder's 77-token limit"):
        backend.run_generation(request, settings, backend.ModelPool(settings))
    with pytest.raises(backend.StudioError, match="takes no layout"):
        backend.run_generation(dataclasses.replace(request, run_model="baseline_tiny"), settings,
                               backend.ModelPool(settings))


# --------------------------------------------------------------------------------------------
# Both arms of both backbone families equal their own commands (issue 17.1)


@pytest.fixture(scope="module", params=[("lvd_tiny", None), ("lvd_wan_tiny", None), ("lvd_tiny", ("mask",))],
                ids=["lvd_tiny", "lvd_wan_tiny", "lvd_tiny-mask"])
def family_run(request, tmp_path_factory):
    """A studio run of each backbone family, guided on 2 of its 3 steps: the Wan sampler then differs from
    both the pool model's default (corrector off on 10 steps) and the stock one. And one with attention
    masking instead of the run-model's energy guidance (issue 16, item 4): its guidance flags are not used."""
    run_model, controls = request.param
    tmp_path = tmp_path_factory.mktemp(f"studio-{run_model}")
    settings = studio_settings(tmp_path)
    flags = {"loss_threshold": 0.0, "max_iter": 1, "max_index_step": 2}
    generation = backend.GenerationRequest(layout=demo_layout(), run_model=run_model, seed=3,
                                           num_inference_steps=FAST_STEPS, guidance_flags=flags, controls=controls)
    return backend.run_generation(generation, settings, backend.ModelPool(settings)), tmp_path


@pytest.mark.parametrize("which", ["lvd", "baseline"])
def test_each_arm_equals_its_command_bit_for_bit(family_run, which):
    import generate

    result, tmp_path = family_run
    video = getattr(result, which)
    argv = list(video.command[2:])
    out = tmp_path / f"rerun-{which}"
    argv[argv.index("--output-dir") + 1] = str(out)
    assert generate.main(argv) == 0
    reproduced = sorted(out.rglob("video_0.joblib"))
    assert len(reproduced) == 1, reproduced
    assert np.array_equal(joblib.load(reproduced[0]), joblib.load(video.video_joblib))
    ours = json.loads((video.run_dir / "config.json").read_text())
    theirs = json.loads(next(out.rglob("config.json")).read_text())
    for key in ("sampling", "guidance", "solver", "controls"):
        assert ours[key] == theirs[key], key


def test_a_studio_run_with_masking_records_it_as_generate_py_does(family_run):
    result, _ = family_run
    config = json.loads((result.lvd.run_dir / "config.json").read_text())
    command = list(result.lvd.command)
    if result.controls == ("mask",):
        assert command[command.index("--control"):][:2] == ["--control", "mask"]
        assert "--loss_threshold" not in command and config["guidance"] is None and not result.guidance_log
        assert config["controls"]["families"] == ["mask"] and "mask" in config["controls"]
    else:  # the run-model's own families: no --control, as a user would write the command
        assert result.controls == ("energy",) and "--control" not in command
        assert config["controls"] == {"families": ["energy"]}
    assert json.loads((result.baseline.run_dir / "config.json").read_text())["controls"] == {"families": []}


def test_the_wan_baseline_runs_the_lvd_arms_sampler_and_says_so(family_run):
    result, _ = family_run
    lvd, baseline = (json.loads((v.run_dir / "config.json").read_text()) for v in (result.lvd, result.baseline))
    assert lvd["sampling"]["corrector_off_steps"] == baseline["sampling"]["corrector_off_steps"]
    if lvd["run_model"]["family"] == "wan":
        assert lvd["solver"]["corrector_off_steps"] == baseline["solver"]["corrector_off_steps"] == 2
        assert lvd["sampling"]["corrector_off_steps"] == 2
        command = list(result.baseline.command)
        assert command[command.index("--corrector-off-steps") + 1] == "2"
    else:
        assert lvd["solver"] is baseline["solver"] is None and "--corrector-off-steps" not in result.baseline.command


# --------------------------------------------------------------------------------------------
# Bounded input, errors with text, nothing made before the checks (issue 17.21, 17.22)


def _request(**overrides):
    values = dict(layout=demo_layout(), run_model="lvd_tiny", seed=0, num_inference_steps=1)
    values.update(overrides)
    return backend.GenerationRequest(**values)


@pytest.mark.parametrize("overrides, message", [
    ({"seed": 1e308}, "the seed must be from 0 to 4294967295, found 1e+308"),
    ({"seed": float("nan")}, "the seed must be a whole number, found nan"),
    ({"num_inference_steps": float("nan")}, "the number of steps must be a whole number, found nan"),
    ({"num_inference_steps": 10**6}, "the number of steps must be from 1 to 200, found 1000000"),
    ({"guidance_flags": {"max_iter": 10**6}}, "the guidance value max_iter must be from 0 to 20, found 1000000"),
    ({"guidance_flags": {"loss_scale": float("inf")}}, "guidance value loss_scale must be a number, found inf"),
    ({"guidance_flags": {"fg_top_p": 0.0}}, "guidance value fg_top_p must be above 0.0 and at most 1.0, found 0.0"),
])
def test_generation_checks_every_number_before_making_anything(tmp_path, overrides, message):
    settings = studio_settings(tmp_path)
    with pytest.raises(backend.StudioError) as error:
        backend.run_generation(_request(**overrides), settings, backend.ModelPool(settings))
    assert str(error.value).startswith(message)
    assert not (tmp_path / "img_generations").exists()   # no run folder, no layout.json


@pytest.mark.parametrize("run_model, controls, message", [
    ("lvd_tiny", ("gligen",), "--control gligen needs a grounded UNet (lvd-gligen_*, lvd-plus_*), not 'lvd_tiny'"),
    ("lvd-gligen_tiny", ("energy",), "--control energy needs guided layers and run-model 'lvd-gligen_tiny' names none"),
    ("lvd_tiny", ("mask", "boxes"), "unknown layout control 'boxes'; expected any set of gligen, energy, mask, "
                                    "modulate (an empty one for none); lvd_tiny offers energy, mask, modulate"),
    ("lvd_tiny", "mask", "the layout controls must be a list of family names, found 'mask'"),
])
def test_controls_a_run_model_cannot_run_are_refused_before_anything_is_made(tmp_path, run_model, controls, message):
    settings = studio_settings(tmp_path)
    with pytest.raises(backend.StudioError) as error:
        backend.run_generation(_request(run_model=run_model, controls=controls), settings, backend.ModelPool(settings))
    assert str(error.value).startswith(message)
    assert not (tmp_path / "img_generations").exists()


def test_layouts_prompts_and_reply_numbers_are_bounded(tmp_path):
    settings = studio_settings(tmp_path)
    huge = dataclasses.replace(demo_layout(), prompt="a bear " * 10**6)
    with pytest.raises(backend.StudioError, match="the prompt has 7000000 characters; at most 2000 are accepted"):
        backend.save_layout_to_cache(huge, settings)
    assert not settings.studio_cache_path.exists()
    bear = demo_layout().tracks[0]
    crowded = dataclasses.replace(demo_layout(), tracks=tuple(dataclasses.replace(bear, id=i) for i in range(20000)))
    with pytest.raises(backend.StudioError, match="the layout has 20000 objects; at most 32 are accepted"):
        backend.run_generation(_request(layout=crowded), settings, backend.ModelPool(settings))
    with pytest.raises(backend.StudioError, match="the reply number must be a whole number, found nan"):
        backend.plan_from_cache(DEMO_CACHE, DEMO_PROMPT, float("nan"))
    with pytest.raises(backend.StudioError, match="at most 2000 are accepted"):
        backend.plan_from_cache(DEMO_CACHE, "x" * 5_000_000)


def test_an_editor_state_with_20000_objects_is_refused_at_once():
    import time

    state = editor.layout_to_state(demo_layout(), width=128, height=128)
    state["objects"] = [dict(state["objects"][0], id=i) for i in range(20000)]
    started = time.perf_counter()
    with pytest.raises(editor.EditorStateError, match="the layout has 20000 objects; at most 32 are accepted"):
        editor.state_to_layout(state)
    assert time.perf_counter() - started < 1
    state["objects"] = state["objects"][:1]
    state["prompt"] = "A bear " * 1000
    with pytest.raises(editor.EditorStateError, match="the prompt has 7000 characters"):
        editor.validate_state(state)


def test_app_flags_are_checked_at_parse_time(tmp_path, capsys):
    import time

    import app

    started = time.perf_counter()
    assert app.main(["--port", "99999"]) == 2
    assert "argument --port: must be an integer in [1, 65535], found 99999" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert app.main(["--output-dir", str(blocker / "out")]) == 2
    assert "--output-dir" in capsys.readouterr().err
    assert time.perf_counter() - started < 5
    assert app.main(["--device", "gpu0"]) == 2
    assert "error: unknown device 'gpu0'" in capsys.readouterr().err
    if not torch.cuda.is_available():  # the README's `--device cuda:1` on a machine without CUDA
        assert app.main(["--device", "cuda:1"]) == 2
        assert "error: device 'cuda:1' requested but CUDA is not available" in capsys.readouterr().err


def test_generation_rejects_objects_whose_phrases_do_not_fit_naming_the_first(tmp_path):
    # Issue 17, item 19: the studio is a path into stage 2 too.
    names = [f"a very big {animal} toy" for animal in "cat dog horse cow sheep goat pig duck goose hen fox wolf".split()]
    tracks = tuple(ObjectTrack(i, name, tuple(Box(0.0, 0.0, 0.1, 0.1) for _ in range(6))) for i, name in enumerate(names))
    layout = SceneLayout(prompt="A zoo scene with many animals", background="grassy field", tracks=tracks)
    settings = studio_settings(tmp_path)
    request = backend.GenerationRequest(layout=layout, run_model="lvd_tiny", seed=0, num_inference_steps=1)
    with pytest.raises(backend.StudioError, match=r"object 11 \('a very big wolf toy'\).*77 tokens"):
        backend.run_generation(request, settings, backend.ModelPool(settings))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("video_0.joblib"))


def test_guidance_made_impossible_by_the_settings_is_named(tmp_path):
    # Issue 17, item 25: loss_scale 1e6 (the studio's bound; 1e308 is refused) makes the carried start value 0.01,
    # below the threshold.
    settings = studio_settings(tmp_path)
    request = backend.GenerationRequest(layout=demo_layout(), run_model="lvd_tiny", seed=0, num_inference_steps=1,
                                        guidance_flags={"loss_scale": 1e6}, with_baseline=False)
    result = backend.run_generation(request, settings, backend.ModelPool(settings))
    assert not result.guidance_log
    assert any("guidance off" in note and "loss_scale" in note and "loss_threshold 200" in note
               for note in result.notes)
