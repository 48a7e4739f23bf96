"""The docs extension ``docs/_ext/repo_files.py``: a page's relative link to a repository file
outside ``docs/`` (``../experiments/results/x.md``) becomes a download that the site includes,
and a link to a missing file still fails a ``-W`` build."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

pytest.importorskip("myst_parser")
sphinx_application = pytest.importorskip("sphinx.application")

EXT = Path(__file__).resolve().parents[1] / "docs" / "_ext"


def _build(repo: Path, page: str) -> tuple[Path, str]:
    docs = repo / "docs"
    (docs / "results").mkdir(parents=True)
    (docs / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {str(EXT)!r})\n"
        "extensions = ['myst_parser', 'repo_files']\n")
    (docs / "index.md").write_text("# Home\n\n```{toctree}\nresults/page\n```\n")
    (docs / "results" / "page.md").write_text(page)
    out, warnings = docs / "_build", io.StringIO()
    app = sphinx_application.Sphinx(str(docs), str(docs), str(out), str(out / ".doctrees"),
                                    "html", status=None, warning=warnings, freshenv=True)
    app.build()
    return out, warnings.getvalue()


def test_link_to_a_repository_file_becomes_a_download(tmp_path: Path) -> None:
    results = tmp_path / "experiments" / "results"
    results.mkdir(parents=True)
    (results / "table1_frappe.md").write_text("# Table 1\n\n| model | AUC |\n")
    out, warnings = _build(tmp_path, "# Page\n\nSee [the table](../../experiments/results/"
                                     "table1_frappe.md).\n")
    assert "table1_frappe" not in warnings, warnings
    copies = list((out / "_downloads").rglob("table1_frappe.md"))
    assert len(copies) == 1 and copies[0].read_text().startswith("# Table 1")
    html = (out / "results" / "page.html").read_text()
    assert f'href="../_downloads/{copies[0].parent.name}/table1_frappe.md"' in html


def test_link_to_a_missing_file_is_still_reported(tmp_path: Path) -> None:
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    _, warnings = _build(tmp_path, "See [gone](../../experiments/results/gone.md).\n")
    assert "gone" in warnings
