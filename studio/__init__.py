"""LVD Studio: the browser app of ``app.py`` (plan a layout, edit its boxes, generate beside the baseline).

``studio.backend`` is the only module that calls project code; ``studio.editor`` and
``studio.commands`` are pure; ``studio.ui`` is the Gradio page (needs the app extra).
"""
