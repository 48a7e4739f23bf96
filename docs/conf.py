"""Sphinx configuration of the dpn-jax documentation (MyST Markdown pages, myst-nb notebooks).

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (warnings are errors, so a
broken cross-reference or link fails the build). The notebooks are rendered, never executed
here: the test suite runs them (``tests/test_notebooks.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout's dpn_jax, not another installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

project = "dpn-jax"
author = "the dpn-jax authors"
copyright = "the dpn-jax authors"  # noqa: A001 - Sphinx's name

extensions = [
    "myst_nb",  # MyST Markdown pages + notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "repo_files",  # docs/_ext: links to repository files outside docs/ become downloads
]

# Sources: Markdown pages, and the notebooks as jupytext percent scripts (notebooks/ is a link to
# the repository's notebooks/ folder, so there is one copy of each notebook).
nb_custom_formats = {".py": ["jupytext.reads", {"fmt": "py:percent"}]}
nb_execution_mode = "off"
exclude_patterns = [
    "_build",
    "_ext",
    "_templates",
    "conf.py",
    "notebooks/README.md",  # the folder's own guide; its content is docs/notebooks.md
    "notebooks/*.ipynb",  # local jupytext conversions, never committed
    "**/.ipynb_checkpoints",
]

myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3  # `page.md#section-title` links to headings down to ###

autosummary_generate = True
autosummary_imported_members = False
# A package's re-exports (its __all__) are documented once, in the module that defines them.
autodoc_default_options = {"members": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings state shapes and types; signatures stay readable
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = "dpn-jax"
html_theme_options = {"show_toc_level": 2}
