"""Sphinx configuration for the emdsl documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.

* The tutorials are the notebooks in ``../notebooks``, the one copy kept in git.
  Each build mirrors them into ``docs/tutorials/`` (git-ignored; a symlink would not
  do, because Sphinx resolves symlinks when it follows a link between notebooks, and
  the links then point outside the docs). myst-nb renders them from their committed
  outputs (``nb_execution_mode = "off"``): nbval already runs them in ``make test``,
  and the saved widget state renders without a kernel.
* The JavaScript those pages need (require.js and the ipywidgets html-manager's
  ``embed-amd.js`` for widgets, MathJax for mathematics) is served from ``_static``:
  ``tools/fetch-docs-js.sh`` packs it from npm into ``.cache/docs-js`` (once; it
  returns at once when the files are there), and that directory is a static path.
  No page asks a CDN, at build time or when read.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import emdsl

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JS_DIR = ROOT / ".cache" / "docs-js"


def _fetch_js() -> None:
    """Run tools/fetch-docs-js.sh (idempotent) so that the static JavaScript is in place."""
    script = ROOT / "tools" / "fetch-docs-js.sh"
    try:
        subprocess.run(["bash", str(script)], check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        sys.exit(f"docs/conf.py: {script.relative_to(ROOT)} failed ({error}); it needs npm and the npm "
                 "registry once, to fetch the widget and MathJax JavaScript into .cache/docs-js")


def _mirror_notebooks() -> None:
    """Copy ../notebooks/*.ipynb into docs/tutorials/; unchanged copies are left alone (and not rebuilt)."""
    source, target = ROOT / "notebooks", HERE / "tutorials"
    if target.is_symlink():
        target.unlink()
    target.mkdir(exist_ok=True)
    wanted = {path.name for path in source.glob("*.ipynb")}
    for stale in target.iterdir():
        if stale.name not in wanted:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    for name in sorted(wanted):
        src, dst = source / name, target / name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copy2(src, dst)


_fetch_js()
_mirror_notebooks()

# -- project ---------------------------------------------------------------------------
project = "emdsl"
author = "the emdsl developers"
copyright = "the emdsl developers"
release = version = emdsl.__version__

# -- general ---------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
templates_path = ["_templates"]
default_role = "py:obj"

# -- API reference -------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "none"  # numpydoc sections carry the types
autodoc_member_order = "bysource"
numpydoc_show_class_members = False  # the class template documents members in place
numpydoc_xref_param_type = False

# -- MyST and notebooks -----------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
nb_execution_mode = "off"  # render the committed outputs; nbval executes the notebooks in `make test`
nb_ipywidgets_js = {
    "widgets/require.js": {},
    "widgets/embed-amd.js": {},  # bundles the standard widgets: nothing is fetched from a CDN
}
mathjax_path = "mathjax/tex-chtml.js"

# -- HTML --------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = "emdsl"
html_static_path = ["_static", str(JS_DIR)]
html_css_files = ["emdsl.css"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version", "theme-version"],
}
html_sidebars = {"index": [], "maths": [], "tutorials/*": []}  # room for code and maths
html_context = {"default_mode": "auto"}  # light or dark, as the reader's system prefers
html_show_sourcelink = False


def _check_executed(app):
    """Warn (an error under -W) about a tutorial committed without its outputs."""
    import nbformat
    from sphinx.util import logging

    logger = logging.getLogger("emdsl.docs")
    for path in sorted((HERE / "tutorials").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        missing = [i for i, cell in enumerate(notebook.cells)
                   if cell.cell_type == "code" and cell.source.strip() and cell.execution_count is None]
        if missing:
            logger.warning(f"notebooks/{path.name} is not executed (code cells {missing} have no output); "
                           f"run `jupyter nbconvert --to notebook --execute --inplace notebooks/{path.name}` "
                           "and commit it: the docs show the committed outputs")


#: classes built empty and then by their methods: the reference shows ``Model()``, not the
#: dataclass fields the methods fill in (``Model(latents=(), observed=())``)
_NO_CONSTRUCTOR_ARGUMENTS = {"emdsl.Model"}


def _signature(app, what, name, obj, options, signature, return_annotation):
    """``autodoc-process-signature``: the signature a reader should call, for the page and the summary table."""
    if what == "class" and name in _NO_CONSTRUCTOR_ARGUMENTS:
        return "()", return_annotation
    return None


def setup(app):
    app.connect("builder-inited", _check_executed)
    app.connect("autodoc-process-signature", _signature)
