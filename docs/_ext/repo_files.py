"""Links from a docs page to a repository file outside ``docs/`` (``../experiments/results/x.md``).

Written as ordinary relative Markdown links, they work when the page is read on GitHub. In the
HTML build MyST would take a ``.md`` target for a documentation page and fail; this extension
turns every such link whose target file exists into a download link, so Sphinx copies the file
into the site (``_downloads/``) and the link works offline too. A link to a missing file is left
alone, and the build reports it as a broken cross-reference.
"""

from __future__ import annotations

import os
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx


def _to_downloads(app: Sphinx, doctree: nodes.document) -> None:
    srcdir = Path(app.srcdir).resolve()
    docdir = (srcdir / app.env.docname).parent
    for ref in list(doctree.findall(addnodes.pending_xref)):
        if ref.get("reftype") != "myst" or ref.get("refdomain") != "doc":
            continue
        # MyST turned `../x/y.md` into the would-be document name `/abs/x/y` (suffix dropped).
        stem = str(ref.get("reftarget", ""))
        paths = [Path(stem + suffix) for suffix in app.config.source_suffix]
        path = next((p.resolve() for p in paths if p.is_absolute() and p.is_file()), None)
        if path is None or path.is_relative_to(srcdir):
            continue
        link = addnodes.download_reference(
            "", "", *ref.children, reftarget=os.path.relpath(path, docdir),
            refdoc=app.env.docname, refexplicit=True)
        ref.replace_self(link)


def setup(app: Sphinx) -> dict:
    # Before Sphinx's DownloadFileCollector (default priority 500) registers the files.
    app.connect("doctree-read", _to_downloads, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
