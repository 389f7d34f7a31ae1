"""The report's renderers: one list of blocks in, Markdown or a self-contained HTML file out.

A leaf of the report rooms: report.py builds the blocks from the run's summary and every renderer takes the
same ("heading" | "text" | "table" | "image", ...) blocks: render_markdown (report.md), build_notebook +
export_html (report.html), issue_report (report-issue.md), attach (the zip, gh). Nothing here reads a record
or imports another report module, so a summary decided once reads the same in every output.
Every text written passes through `scrub`: secrets redacted, and no absolute local path (the repo's own
folder becomes relative, the home folder `~`), since reports are pasted into public issues.
"""

from __future__ import annotations

import base64
import re
import warnings
from pathlib import Path

import nbformat
import pandas as pd

from vllm_lab.paths import REPO_ROOT
from vllm_lab.redact import redact_text

PLOTS_DIR = "plots"
MISSING = "—"


def _path_pattern(folder: str) -> re.Pattern:
    """folder as a whole path component: /home/ann matches /home/ann/x and /home/ann, never /home/anna."""
    return re.compile(r"(?<![\w.-])" + re.escape(folder.rstrip("/")) + r"(?=/|$|[^\w.-])")


def local_paths(text: str) -> str:
    """The repo's folder as a relative path, the home folder as ~ (a public issue shows neither)."""
    root = str(REPO_ROOT)
    text = re.sub(_path_pattern(root).pattern + "/", "", text)
    text = _path_pattern(root).sub(".", text)
    home = str(Path.home())
    if home not in ("/", ""):
        text = _path_pattern(home).sub("~", text)
    return text


def scrub(text: str) -> str:
    """What every report text passes through: secrets redacted, local paths relative or under ~."""
    return local_paths(redact_text(text))


# ---- value formatting ----------------------------------------------------------------------------------


def fmt_value(v) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.3g}"
    return str(v)


def display(df: pd.DataFrame) -> pd.DataFrame:
    """Every cell as a short string (— for unknown) so Markdown and HTML show the same thing."""
    return df.astype(object).map(fmt_value) if not df.empty else df


def _md_cell(text: str) -> str:
    return (
        text.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("<", "&lt;")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no tabulate needed)."""
    if df.empty:
        return "_(none)_"
    shown = display(df)
    header = "| " + " | ".join(_md_cell(str(c)) for c in shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *body])


# ---- Markdown ------------------------------------------------------------------------------------------


BLOCK_KINDS = ("heading", "text", "table", "image")


def known_blocks(blocks: list[tuple]) -> list[tuple]:
    """Blocks every renderer knows: ("heading", level, text), ("text", md), ("table", df), ("image", name,
    path, note). A block of another kind shows its text and tables (never a path); an image block with more
    than (name, path, note) keeps those three."""
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "image":
            out.append(tuple(block[:4]) + (None,) * (4 - len(block)))
        elif kind in BLOCK_KINDS:
            out.append(block)
        else:
            for item in block[1:]:
                if isinstance(item, pd.DataFrame):
                    out.append(("table", item))
                elif isinstance(item, str) and item.strip():
                    out.append(("text", item))
    return out


def render_markdown(blocks: list[tuple]) -> str:
    parts = []
    for block in known_blocks(blocks):
        kind = block[0]
        if kind == "heading":
            parts.append("#" * block[1] + " " + block[2])
        elif kind == "text":
            parts.append(block[1])
        elif kind == "table":
            parts.append(markdown_table(block[1]))
        elif kind == "image":
            _, name, path, note = block
            parts.append(f"![{name}]({PLOTS_DIR}/{Path(path).name})" if path else f"_{note or name}_")
    return "\n\n".join(parts) + "\n"


# ---- HTML (nbconvert, no kernel) ------------------------------------------------------------------------


def _output_cell(data: dict) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(source="", outputs=[nbformat.v4.new_output("display_data", data=data)])


def _block_cell(block: tuple) -> nbformat.NotebookNode | None:
    kind = block[0]
    if kind == "heading":
        return nbformat.v4.new_markdown_cell("#" * block[1] + " " + block[2])
    if kind == "text":
        return nbformat.v4.new_markdown_cell(block[1])
    if kind == "table":
        shown = display(block[1])
        html = (
            shown.to_html(index=False, escape=True, border=0) if not shown.empty else "<p><em>(none)</em></p>"
        )
        return _output_cell({"text/html": html, "text/plain": markdown_table(block[1])})
    _, name, path, note = block
    if not path:
        return nbformat.v4.new_markdown_cell(f"_{note or name}_")
    png = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return _output_cell({"image/png": png, "text/plain": name})


def build_notebook(blocks: list[tuple]) -> nbformat.NotebookNode:
    """Markdown cells and output-only cells (no code), ready for HTMLExporter without a kernel."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [cell for cell in map(_block_cell, known_blocks(blocks)) if cell is not None]
    nb.metadata["language_info"] = {"name": "python"}
    return nb


_TEXT_MIMES = ("text/plain", "text/html", "text/markdown", "application/json")


def redact_notebook(nb: nbformat.NotebookNode, *, runnable: bool = False) -> nbformat.NotebookNode:
    """Redact every cell source and text output in place (images are left as they are), local paths made
    relative or ~; runnable: the sources keep their paths (an executed notebook in the run folder is rerun
    from there: its parameters must still point where they pointed), only secrets leave them."""
    for cell in nb.cells:
        cell.source = redact_text(cell.source) if runnable else scrub(cell.source)
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = scrub(out["text"] if isinstance(out["text"], str) else "".join(out["text"]))
            for mime in _TEXT_MIMES:
                if mime in out.get("data", {}) and isinstance(out["data"][mime], str):
                    out["data"][mime] = scrub(out["data"][mime])
    return nb


# nbconvert's lab template with its CDN scripts left out (require.js, MathJax, Mermaid): the report is one
# file that opens offline with no console error; its images are data URIs already.
_SELF_CONTAINED = "vllm_lab_report.html.j2"
_SELF_CONTAINED_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def export_html(
    notebook: str | Path | nbformat.NotebookNode, html_path: str | Path, *, title: str = "vLLM report"
) -> Path:
    """An executed notebook (path or node) -> one self-contained HTML file, input cells hidden, text redacted."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4) if isinstance(notebook, str | Path) else notebook
    exporter = HTMLExporter(
        extra_loaders=[DictLoader({_SELF_CONTAINED: _SELF_CONTAINED_TEMPLATE})],
        template_file=_SELF_CONTAINED,
        embed_images=True,  # a Markdown cell's ![](file.png) becomes a data URI too
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    with warnings.catch_warnings():  # scrapbook's glue outputs have no HTML form, by design
        warnings.filterwarnings("ignore", message=".*scrapbook.scrap.*", category=UserWarning)
        body, _ = exporter.from_notebook_node(redact_notebook(nb), resources={"metadata": {"name": title}})
    html_path = Path(html_path)
    html_path.write_text(body, encoding="utf-8")
    return html_path
