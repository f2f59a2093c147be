"""Export an executed notebook to one HTML file that a browser opens with no network.

nbconvert's default `lab` template loads require.js and MathJax from cdnjs, mermaid from cdnjs when a diagram is
present, and, when the notebook saved widget state (papermill's and nbclient's runs do), `@jupyter-widgets/
html-manager@*` (any version) from unpkg to rebuild the live widgets. Our widgets do not need that: each one also
displays a static `text/html` copy of its state (`LiveStaticWidget` in widgets/_common.py).

How, with nbconvert's own means rather than rewriting its output:
- the preprocessor `DropWidgetViews` deletes the saved widget state, so nbconvert's widget filter does not choose
  the widget view, and removes our widgets' live-view outputs (their static copies are separate outputs and stay).
  Another library's widget keeps its `text/plain` line;
- the template `OFFLINE_TEMPLATE` extends the `lab` template and empties its require.js, widget-manager, MathJax
  and mermaid blocks. Its CSS is already inlined. Markdown math shows as its TeX source, a mermaid block as text;
- `embed_images=True` inlines the local images of markdown cells as data: URLs.
A URL written by the notebook's author (a link, or a markdown image on the web) is content, not template, and
stays as written.
"""
from __future__ import annotations

import os
from pathlib import Path

OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block data_widget_view -%}{%- endblock data_widget_view -%}
"""
OFFLINE_TEMPLATE_NAME = "sae_widgets_offline.html.j2"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# our widgets' class names, for notebooks saved without widget state (their text/plain is e.g. "FeatureDashboard(...)")
OUR_WIDGETS = ("TokenHighlighter", "FeatureDashboard", "FeatureBrowser", "PromptExplorer", "SteeringPanel",
               "TrainingMonitor")


def _has_static_copy(output, saved_state: dict) -> bool:
    """True for the live view of one of our widgets: its model syncs `_static_id` (or, with no saved state, its
    text/plain is our repr)."""
    model = saved_state.get(output["data"][WIDGET_VIEW].get("model_id"), {})
    if "_static_id" in model.get("state", {}):
        return True
    text = output["data"].get("text/plain", "")
    return not model and isinstance(text, str) and text.startswith(tuple(f"{n}(" for n in OUR_WIDGETS))


def _drop_widget_views_preprocessor():
    from nbconvert.preprocessors import Preprocessor

    class DropWidgetViews(Preprocessor):
        """No widget state, no live widget views: what needs the widget manager from a CDN goes."""

        def preprocess(self, nb, resources):
            widgets = nb.metadata.pop("widgets", {}) or {}
            saved = (widgets.get(WIDGET_STATE) or {}).get("state", {})
            for cell in nb.cells:
                if cell.cell_type != "code":
                    continue
                kept = []
                for out in cell.outputs:
                    if WIDGET_VIEW in out.get("data", {}):
                        if _has_static_copy(out, saved):
                            continue
                        del out["data"][WIDGET_VIEW]
                        if not out["data"]:
                            continue
                    kept.append(out)
                cell.outputs = kept
            return nb, resources

    return DropWidgetViews()


def offline_exporter():
    """An `HTMLExporter` whose output loads nothing from the network (see the module docstring)."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", template_file=OFFLINE_TEMPLATE_NAME, embed_images=True,
                            extra_loaders=[DictLoader({OFFLINE_TEMPLATE_NAME: OFFLINE_TEMPLATE})])
    exporter.register_preprocessor(_drop_widget_views_preprocessor(), enabled=True)
    return exporter


def read_notebook(path: Path):
    """The notebook at `path`, or a one-line error naming it."""
    import nbformat

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such notebook file (give the path of an .ipynb file)")
    try:
        return nbformat.read(path, as_version=4)
    except Exception as e:  # nbformat raises NotJSONError, ValidationError, KeyError, UnicodeDecodeError, ...
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a Jupyter notebook ({reason}); give an .ipynb file saved by Jupyter") from None


def export_html(notebook: str | os.PathLike, html: str | os.PathLike | None = None) -> Path:
    """Write `notebook` as one self-contained HTML file (default: beside it, .html) and return its path.

    The widgets show as their static copies; the page fetches no script, stylesheet, font or image from the web.
    """
    from .atomic import write_bytes_atomic

    notebook = Path(notebook).expanduser()
    nb = read_notebook(notebook)
    target = Path(html).expanduser() if html is not None else notebook.with_suffix(".html")
    resources = {"metadata": {"name": notebook.stem, "path": str(notebook.resolve().parent)}}
    body, _ = offline_exporter().from_notebook_node(nb, resources=resources)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, body.encode("utf-8"))
    return target
