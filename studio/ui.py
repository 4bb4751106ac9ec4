"""The studio's Gradio page: plan a layout, edit its boxes, generate the guided video beside its baseline.

``build_app(settings)`` returns the ``gr.Blocks``; the handlers are methods of :class:`Studio`, which
holds the per-server state (settings, loaded models, a scratch folder) so that nothing is global.
The handlers return plain values, so tests can call them without a browser. Project code is
reached through ``studio.backend`` only.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

from studio import backend, commands, editor
from studio.backend import StudioError, StudioSettings

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
SOURCE_CACHE = "Cache file"
SOURCE_LLM = "LLM endpoint"
TINY_NOTE = ("**Tiny random-weight model:** its videos are **noise**. It runs the real code paths (layout, "
             "attention recording, energy guidance, DPM-Solver, VAE) in seconds on a CPU; for real videos use a "
             "real run-model on a GPU.")
GENERATION_CONCURRENCY_ID = "video-generation"  # one generation at a time on this server's device
# The energy plot's x categories in numeric order ("10" after "9"). Bounded: with a few thousand categories
# the page's plot stays blank; Vega-Lite puts values past the list after it, in the data's (numeric) order.
ITERATION_ORDER = [str(i) for i in range(1, 1001)]
# The layout control families as the page names them (generate.py's --control values; README, "Layout control
# families").
CONTROL_LABELS = {"gligen": "GLIGEN grounding", "energy": "energy guidance", "mask": "attention masking",
                  "modulate": "attention modulation"}


def _error(prefix: str, error: BaseException) -> str:
    return f"**{prefix}:** {error}"


class Studio:
    """The state behind one app: settings, the model pool and a scratch folder for page files (previews and
    layout downloads: under the output folder, the newest few kept)."""

    def __init__(self, settings: StudioSettings):
        self.settings = settings
        self.pool = backend.ModelPool(settings)
        self.scratch_dir = backend.preview_dir(settings)
        self.run_models = backend.list_run_models(settings)
        self.palette = backend.editor_palette()

    # ---- choices -------------------------------------------------------------------------

    def cache_choices(self) -> list[str]:
        return [path.name for path in backend.list_cache_files(self.settings.cache_dir)]

    def default_cache(self) -> str | None:
        """The shipped cache of the run-model the page opens on (the shapes benchmark's for the shapes models),
        else the shipped demo cache, else another demo cache, else the first."""
        choices = self.cache_choices()
        shipped = (backend.shipped_cache_name(self.default_run_model(), self.settings.template_version),
                   backend.shipped_demo_cache_name(self.settings.template_version))
        demo = [name for name in choices if name.startswith("cache_demo_")]
        return next((name for name in shipped if name in choices), None) or (demo or choices or [None])[0]

    def available_run_models(self) -> list[str]:
        return [status.name for status in self.run_models if status.available]

    def default_run_model(self) -> str:
        """The opening run-model: the one asked for, else real weights found here, else the shipped shapes model,
        else a tiny LVD model."""
        available = [s for s in self.run_models if s.available]
        if self.settings.opening_run_model is not None:
            if self.settings.opening_run_model not in {s.name for s in available}:
                raise StudioError(f"run-model {self.settings.opening_run_model!r} is not available here; available: "
                                  f"{', '.join(s.name for s in available)}")
            return self.settings.opening_run_model
        real = [s.name for s in available if not s.tiny]
        tiny_lvd = [s.name for s in available if s.tiny and s.method == "lvd"]
        return (real or tiny_lvd or [s.name for s in available])[0]

    def status_of(self, name: str) -> backend.RunModelStatus:
        for status in self.run_models:
            if status.name == name:
                return status
        raise StudioError(f"unknown run-model {name!r}; available: {', '.join(self.available_run_models())}")

    def unavailable_html(self) -> str:
        missing = [s for s in self.run_models if not s.available]
        if not missing:
            return ""
        rows = "".join(f"<li><code>{s.name}</code> ({s.width}x{s.height}, {s.num_frames} frames): "
                       f"{_escape(s.hint)}</li>" for s in missing)
        return (f"<div class='lvd-unavailable'><p>Not available here (no weights found locally; nothing is "
                f"downloaded):</p><ul>{rows}</ul></div>")

    # ---- plan ----------------------------------------------------------------------------

    def cached_prompts(self, cache_name: str | None) -> dict:
        if not cache_name:
            return gr.update(choices=[], value=None)
        try:
            prompts = backend.list_cached_prompts(Path(self.settings.cache_dir) / cache_name)
        except StudioError as error:
            logger.warning("%s", error)
            prompts = []
        return gr.update(choices=prompts, value=None)

    def plan(self, source: str, cache_name: str | None, prompt: str, reply_number: Any, llm_model: str,
             run_model: str):
        """-> (editor state, plan status, reply text, preview, edit status, download file)."""
        try:
            if source == SOURCE_LLM:
                planned = backend.plan_from_llm(self.settings.llm, prompt or "", llm_model,
                                                self.settings.template_version)
            else:
                if not cache_name:
                    raise StudioError(f"no cache file is selected; put one in {self.settings.cache_dir}/")
                occurrence = backend.whole_number(0 if reply_number is None else reply_number, "reply number", 0,
                                                  backend.MAX_REPLY_NUMBER)
                planned = backend.plan_from_cache(Path(self.settings.cache_dir) / cache_name, prompt or "", occurrence)
            status = self.status_of(run_model)
        except StudioError as error:
            return (gr.update(), _error("Plan failed", error), gr.update(), gr.update(), gr.update(), gr.update())
        state = editor.layout_to_state(planned.layout, width=status.width, height=status.height, palette=self.palette)
        objects = ", ".join(planned.layout.phrases) or "none"
        message = (f"Planned from {planned.source}: {len(planned.layout.tracks)} object(s) ({objects}), "
                   f"background {planned.layout.background!r}.")
        preview, edit_status, download = self.edited(state, run_model)
        return state, message, planned.reply_text, preview, edit_status, download

    # ---- edit ----------------------------------------------------------------------------

    def edited(self, state: Any, run_model: str):
        """-> (layout animation GIF, edit status, layout JSON to download) for the edited state."""
        if state is None:
            return None, "", None
        try:
            warnings = editor.validate_state(state)
            layout = editor.state_to_layout(state)
            spec = backend.get_spec(run_model)
        except (editor.EditorStateError, backend.LayoutError, StudioError) as error:
            return gr.update(), _error("Layout problem", error), gr.update()
        preview = backend.render_layout_preview(layout, spec, backend.scratch_path(self.scratch_dir, "layout.gif"))
        download = backend.write_layout_file(backend.scratch_path(self.scratch_dir, "layout.json"), layout)
        lines = [f"Layout OK: {len(layout.tracks)} object(s) in {layout.num_keyframes} keyframes, resampled to "
                 f"{spec.default_num_frames} frames for {spec.name}."]
        lines += [f"- note: {warning}" for warning in warnings]
        return str(preview), "\n".join(lines), str(download)

    def save_to_cache(self, state: Any):
        """-> (edit status, cache file choices): the studio's cache file joins the choices."""
        try:
            layout = editor.state_to_layout(state)
            path, occurrence = backend.save_layout_to_cache(layout, self.settings)
        except (editor.EditorStateError, backend.LayoutError, StudioError) as error:
            return _error("Not saved", error), gr.update()
        return (f"Saved as reply {occurrence} of {layout.prompt!r} in `{backend.display_path(path)}` "
                f"(the studio's own cache; published caches are never written).", self.cache_file_choices())

    def cache_file_choices(self) -> dict:
        return gr.update(choices=self.cache_choices())

    def run_model_changed(self, run_model: str, state: Any, preset: str, *values):
        """-> (editor state, tiny note, layout controls, steps, preview, edit status, download, *guidance field
        updates): the layout controls offered for the run-model, its own families selected, its default steps."""
        status = self.status_of(run_model)
        controls = gr.update(choices=control_choices(status), value=list(status.controls))
        if state:
            new_state = editor.with_canvas(state, width=status.width, height=status.height)
            preview, edit_status, download = self.edited(new_state, run_model)
        else:
            new_state = preview = edit_status = download = gr.update()
        guided = "energy" in status.controls
        if preset == backend.PRESET_CUSTOM:
            fields = [gr.update(interactive=guided) for _ in backend.GUIDANCE_FIELDS]
        else:
            preset_values = backend.guidance_preset_values(preset, run_model)
            fields = [gr.update(value=preset_values[name], interactive=guided) for name in backend.GUIDANCE_FIELDS]
        return (new_state, gr.update(visible=status.tiny), controls, gr.update(value=status.num_inference_steps),
                preview, edit_status, download, *fields)

    @staticmethod
    def controls_changed(controls: list[str] | None) -> list:
        """The guidance fields can be edited while energy guidance is selected (they are its settings)."""
        return [gr.update(interactive="energy" in (controls or ())) for _ in backend.GUIDANCE_FIELDS]

    def preset_values(self, preset: str, run_model: str, *current) -> list:
        if preset == backend.PRESET_CUSTOM:
            return [gr.update() for _ in backend.GUIDANCE_FIELDS]
        values = backend.guidance_preset_values(preset, run_model)
        return [gr.update(value=values[name]) for name in backend.GUIDANCE_FIELDS]

    # ---- generate ------------------------------------------------------------------------

    def generate(self, state: Any, run_model: str, seed: Any, steps: Any, with_baseline: bool, controls: Any,
                 *values, progress=gr.Progress()):
        """-> (status, LVD gif, baseline gif, annotated gif, energy plot, command, saved files).

        ``controls``: the selected layout control families; ``values``: the guidance fields (read when energy
        guidance is selected)."""
        empty = (None, None, None, None, "", "")
        try:
            layout = editor.state_to_layout(state)
            status = self.status_of(run_model)
            if not status.available:
                raise StudioError(f"{run_model}: {status.hint}")
            controls = backend.check_controls(controls, backend.get_spec(run_model))
            flags = backend.guidance_flags(dict(zip(backend.GUIDANCE_FIELDS, values))) if "energy" in controls else {}
            request = backend.GenerationRequest(layout=layout, run_model=run_model, controls=controls,
                                                seed=backend.whole_number(seed, "seed", 0, backend.MAX_SEED),
                                                num_inference_steps=backend.whole_number(
                                                    steps, "number of steps", 1, backend.MAX_STEPS),
                                                guidance_flags=flags, with_baseline=bool(with_baseline))

            def report(what: str, done: int, total: int) -> None:
                progress((done, total), desc=what, unit="steps")

            result = backend.run_generation(request, self.settings, self.pool, report)
        except (editor.EditorStateError, backend.LayoutError, StudioError) as error:
            return (_error("Cannot generate", error), *empty)
        except Exception as error:  # the page reports any failure and keeps serving (like generate.py's batch)
            logger.exception("generation failed")
            return (_error("Generation failed", f"{type(error).__name__}: {error}"), *empty)
        return self._result_outputs(result, status)

    def _result_outputs(self, result: backend.GenerationResult, status: backend.RunModelStatus):
        lvd, baseline = result.lvd, result.baseline
        energy = self.energy_frame(result.guidance_log)
        lines = [commands.format_command(lvd.command)]
        if baseline is not None:
            lines.append(commands.format_command(baseline.command))
        text = [f"Done: {status.name} in {lvd.elapsed_s:.1f} s"
                + (f", {baseline.run_model} in {baseline.elapsed_s:.1f} s" if baseline else "") + "."]
        if status.tiny:
            text.append("These videos are noise (tiny random-weight model).")
        ran = ", ".join(CONTROL_LABELS[name] for name in result.controls) or "none (the layout's prompt, no control)"
        text.append(f"- layout controls: {ran}")
        text += [f"- {note}" for note in result.notes]
        guided = "energy" in result.controls  # else the line above says that no guidance ran
        if guided and not result.guidance_log and not any(note.startswith("guidance off") for note in result.notes):
            text.append("- no guided iterations (the layout has no objects, or the energy stayed under loss_threshold)")
        elif len(result.guidance_log) == 1:  # a plot of one point says nothing: a sentence instead
            record = result.guidance_log[0]
            text.append(f"- one guided iteration, at denoising step {record['step']}: energy "
                        f"{float(record['energy']):.4g} before its latent update")
        saved = [f"- run folder: `{backend.display_path(result.run_root)}`",
                 f"- LVD: `{backend.display_path(lvd.video_joblib)}` and `config.json` in "
                 f"`{backend.display_path(lvd.run_dir)}`",
                 f"- layout: `{backend.display_path(result.layout_file)}`",
                 f"- commands: `{backend.display_path(result.commands_file)}`"]
        if baseline is not None:
            saved.insert(2, f"- baseline: `{backend.display_path(baseline.video_joblib)}`")
        return ("\n".join(text), str(lvd.video_gif), str(baseline.video_gif) if baseline else None,
                str(lvd.annotated_gif) if lvd.annotated_gif else None, energy, _shell_block(lines), "\n".join(saved))

    @staticmethod
    def energy_frame(guidance_log):
        """The guidance log as a table for the plot: guided iteration number, energy, denoising step (empty
        for a single iteration, which the status states in a sentence). Iterations are categories (whole-number
        ticks, in `ITERATION_ORDER`): a numeric axis over a few iterations ticks at 1.5, 2.5, ..."""
        import pandas as pd  # a Gradio dependency

        if len(guidance_log) < 2:
            guidance_log = []
        return pd.DataFrame({"iteration": [str(i) for i in range(1, len(guidance_log) + 1)],
                             "energy": [float(record["energy"]) for record in guidance_log],
                             "step": [f"step {record['step']}" for record in guidance_log]})


def control_choices(status: backend.RunModelStatus) -> list[tuple[str, str]]:
    """(label, family) of the layout controls the page offers for a run-model."""
    return [(CONTROL_LABELS[name], name) for name in status.control_choices]


def _shell_block(lines: list[str]) -> str:
    """Command lines as a Markdown code block, fenced by more backticks than any run in them."""
    import re

    text = "\n".join(lines)
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return f"{fence}shell\n{text}\n{fence}"


def _escape(text: str) -> str:
    import html

    return html.escape(text).replace("`", "")


PAGE_CSS = """
.lvd-stage { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 12px; }
.lvd-unavailable { opacity: 0.55; font-size: 13px; }
.lvd-unavailable code { text-decoration: line-through; }
.lvd-command pre, .lvd-command code { white-space: pre-wrap; word-break: break-all; }
.lvd-video img, #layout-preview img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
"""


def build_app(settings: StudioSettings, default_prompt: str | None = None) -> gr.Blocks:
    """The studio page for ``settings`` (call ``.queue()`` / ``.launch()`` on it); ``default_prompt`` defaults
    to a prompt of the opening run-model's shipped cache."""
    studio = Studio(settings)
    run_model_choices = studio.available_run_models()
    default_run_model = studio.default_run_model()
    default_status = studio.status_of(default_run_model)
    opening_preset = backend.default_preset(default_run_model)
    paper = backend.guidance_preset_values(opening_preset, default_run_model)
    default_cache = studio.default_cache()
    if default_prompt is None:
        default_prompt = backend.opening_prompt(default_run_model)

    with gr.Blocks(title="LVD Studio", analytics_enabled=False) as app:
        gr.Markdown("# LVD Studio\nPrompt → LLM layout → boxes edited by hand → layout-guided video beside its "
                    "unguided baseline.")
        with gr.Column(elem_id="stage-plan", elem_classes=["lvd-stage"]):
            gr.Markdown("## 1. Plan")
            with gr.Row():
                prompt = gr.Textbox(value=default_prompt, label="Prompt", scale=3, elem_id="prompt")
                source = gr.Radio([SOURCE_CACHE, SOURCE_LLM], value=SOURCE_CACHE, label="Layout from",
                                  elem_id="source")
            with gr.Row(visible=True) as cache_row:
                cache_file = gr.Dropdown(studio.cache_choices(), value=default_cache, label="Cache file",
                                         info=f"cache_*.json in {backend.display_path(settings.cache_dir)}/",
                                         elem_id="cache-file")
                cached = gr.Dropdown(choices=studio.cached_prompts(default_cache)["choices"], value=None,
                                     label="Cached prompts", elem_id="cached-prompts")
                # precision None: the handlers check whole numbers and ranges themselves, with a message (Gradio's
                # rounding fails without one on NaN).
                reply_number = gr.Number(value=0, minimum=0, maximum=backend.MAX_REPLY_NUMBER, label="Reply number",
                                         elem_id="reply-number")
            with gr.Row(visible=False) as llm_row:
                llm_model = gr.Textbox(value=settings.llm.config.model if settings.llm else "", label="LLM model",
                                       elem_id="llm-model")
                gr.Markdown(f"Endpoint: `{(settings.llm.config.base_url if settings.llm else None) or 'OpenAI API'}` "
                            f"(app flags `--llm-base-url`, `--llm-api-key-file`, as for prompt_batch.py).")
            plan_button = gr.Button("Plan layout", variant="primary", elem_id="plan-button")
            plan_status = gr.Markdown(elem_id="plan-status")
            with gr.Accordion("LLM reply", open=False):
                reply_text = gr.Textbox(lines=8, max_lines=20, show_label=False, interactive=False,
                                        elem_id="reply-text")

        with gr.Column(elem_id="stage-edit", elem_classes=["lvd-stage"]):
            gr.Markdown("## 2. Edit")
            layout_editor = gr.HTML(value=None, html_template="<div class='lvd-editor'></div>",
                                    css_template=(STATIC_DIR / "editor.css").read_text(),
                                    js_on_load=(STATIC_DIR / "editor.js").read_text(), elem_id="layout-editor")
            with gr.Row():
                preview = gr.Image(label="Layout animation (resampled to the video's frames)", type="filepath",
                                   interactive=False, elem_id="layout-preview", height=260)
                with gr.Column():
                    edit_status = gr.Markdown(elem_id="edit-status")
                    save_button = gr.Button("Save as a reply in the studio cache", elem_id="save-button")
                    download = gr.DownloadButton("Download layout JSON", value=None, elem_id="download-layout")

        with gr.Column(elem_id="stage-generate", elem_classes=["lvd-stage"]):
            gr.Markdown("## 3. Generate")
            with gr.Row():
                run_model = gr.Dropdown(run_model_choices, value=default_run_model, label="Run-model",
                                        elem_id="run-model")
                seed = gr.Number(value=0, minimum=0, maximum=backend.MAX_SEED, label="Seed", elem_id="seed")
                steps = gr.Number(value=default_status.num_inference_steps, minimum=1, maximum=backend.MAX_STEPS,
                                  label="Steps", elem_id="steps")
                with_baseline = gr.Checkbox(value=True, label="Baseline beside it (same prompt and seed)",
                                            elem_id="with-baseline")
            tiny_note = gr.Markdown(TINY_NOTE, visible=default_status.tiny, elem_id="tiny-note")
            gr.HTML(studio.unavailable_html(), elem_id="unavailable-models")
            with gr.Row():
                layout_controls = gr.CheckboxGroup(
                    control_choices(default_status), value=list(default_status.controls), label="Layout controls",
                    info="the run-model's by default (generate.py --control); the strengths are the defaults",
                    elem_id="layout-controls")
                preset = gr.Radio(list(backend.GUIDANCE_PRESETS), value=opening_preset, label="Guidance preset",
                                  info="energy guidance's settings", elem_id="preset")
            with gr.Row():
                fields = [gr.Number(value=paper[name], label=name, interactive="energy" in default_status.controls,
                                    elem_id=f"guidance-{name}", min_width=90)
                          for name in backend.GUIDANCE_FIELDS]
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
            generate_status = gr.Markdown(elem_id="generate-status")

        with gr.Column(elem_id="stage-result", elem_classes=["lvd-stage"]):
            gr.Markdown("## Result")
            with gr.Row():
                lvd_video = gr.Image(label="LVD", type="filepath", interactive=False, elem_id="video-lvd",
                                     elem_classes=["lvd-video"], height=256)
                base_video = gr.Image(label="Baseline", type="filepath", interactive=False, elem_id="video-baseline",
                                      elem_classes=["lvd-video"], height=256)
                annotated = gr.Image(label="LVD with the layout boxes", type="filepath", interactive=False,
                                     elem_id="video-annotated", elem_classes=["lvd-video"], height=256)
            energy = gr.LinePlot(x="iteration", y="energy", tooltip=["iteration", "step", "energy"], 
                                 sort=ITERATION_ORDER,
                                 label="Energy over guided iterations (box energy before each latent update)",
                                 x_title="guided iteration", y_title="energy", height=240, elem_id="energy-plot")
            gr.Markdown("**Reproduce from the command line** (in the repository root):")
            command = gr.Markdown(elem_id="repro-command", elem_classes=["lvd-command"])
            saved = gr.Markdown(elem_id="saved-files")

        # ---- events ----
        source.change(lambda s: (gr.update(visible=s == SOURCE_CACHE), gr.update(visible=s == SOURCE_LLM)),
                      inputs=source, outputs=[cache_row, llm_row])
        cache_file.change(studio.cached_prompts, inputs=cache_file, outputs=cached)
        cached.input(lambda p: p or gr.update(), inputs=cached, outputs=prompt)
        plan_button.click(studio.plan, inputs=[source, cache_file, prompt, reply_number, llm_model, run_model],
                          outputs=[layout_editor, plan_status, reply_text, preview, edit_status, download],
                          concurrency_limit=4)
        layout_editor.edit(studio.edited, inputs=[layout_editor, run_model], outputs=[preview, edit_status, download],
                           trigger_mode="always_last")
        save_button.click(studio.save_to_cache, inputs=layout_editor, outputs=[edit_status, cache_file])
        app.load(studio.cache_file_choices, outputs=cache_file)  # cache files added since the server started
        run_model.change(studio.run_model_changed, inputs=[run_model, layout_editor, preset, *fields],
                         outputs=[layout_editor, tiny_note, layout_controls, steps, preview, edit_status, download,
                                  *fields])
        layout_controls.change(studio.controls_changed, inputs=layout_controls, outputs=fields)
        preset.change(studio.preset_values, inputs=[preset, run_model, *fields], outputs=fields)
        for number in fields:
            number.input(lambda: backend.PRESET_CUSTOM, outputs=preset)
        generate_button.click(studio.generate,
                              inputs=[layout_editor, run_model, seed, steps, with_baseline, layout_controls, *fields],
                              outputs=[generate_status, lvd_video, base_video, annotated, energy, command, saved],
                              concurrency_limit=1, concurrency_id=GENERATION_CONCURRENCY_ID,
                              show_progress_on=[generate_status])  # one progress bar, not one per pane
    app.studio = studio  # for tests and app.py (allowed paths)
    return app


def launch_kwargs(settings: StudioSettings, studio: Studio) -> dict:
    """``launch()`` arguments that keep the page offline-safe and its files servable."""
    # show_error: a request the handlers never see (e.g. a wrong number of inputs) is answered with Gradio's
    # message instead of {"error": null}.
    return {"css": PAGE_CSS, "ssr_mode": False, "show_error": True,
            "allowed_paths": [str(Path(settings.output_dir).resolve()), str(studio.scratch_dir)]}
