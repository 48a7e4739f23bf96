"""Where every built-in dataset comes from: public location, licence, expected files.

``dpn-jax data list`` prints this table, ``dpn-jax data download NAME --to DIR`` fetches a
dataset's files into ``DIR/<folder>/`` (resuming, verifying checksums, unpacking archives; see
:mod:`dpn_jax.data.download`), and ``dpn-jax data prepare NAME --data-dir DIR`` encodes them into
the dataset cache with a progress bar. Published checksums are verified where the source
publishes them (``md5`` of the BARS csv files, the sha256 of an archive); elsewhere the first
download's sha256 is recorded in ``DIR/<folder>/CHECKSUMS.sha256`` and checked from then on.

Licences: the datasets are NOT redistributed by dpn-jax; each carries its provider's terms
(research use; cite the source). Read them before use.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dpn_jax.data.download import RemoteFile

_HF = "https://huggingface.co/datasets/reczoo/{0}/resolve/main/{0}.zip"
_NFM = "https://raw.githubusercontent.com/hexiangnan/neural_factorization_machine/master/data/{0}"
_SNAP = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/{0}"
_BARS_TERMS = ("BARS/reczoo re-release of the original data: the original provider's terms apply "
               "(research use, cite the source)")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    name: str
    folder: str  # under the data dir
    source: str  # homepage / provider, for the help text
    licence: str
    files: tuple[RemoteFile, ...] = ()
    extracted_md5: tuple[tuple[str, str], ...] = ()  # (path inside the folder, md5) after unpacking
    manual: str = ""  # when the files cannot be fetched anonymously: what to do instead
    size: str = ""  # approximate download size, for the help text


CATALOG: dict[str, CatalogEntry] = {e.name: e for e in (
    CatalogEntry(
        "criteo", "criteo", "Criteo display-advertising challenge (Kaggle 2014), criteo.com",
        "Criteo's terms: non-commercial research use (see readme.txt in the archive)",
        (RemoteFile("https://go.criteo.net/criteo-research-kaggle-display-advertising-challenge-"
                    "dataset.tar.gz", "criteo-dac.tar.gz", extract=True),),
        size="4.3 GB (11 GB unpacked)"),
    CatalogEntry(
        "criteo_x1", "Criteo_x1", "BARS Criteo_x1 (reczoo on Hugging Face), AFN's 7:2:1 split",
        _BARS_TERMS, (RemoteFile(_HF.format("Criteo_x1"), "Criteo_x1.zip", extract=True),),
        (("train.csv", "30b89c1c7213013b92df52ec44f52dc5"), ("valid.csv", "f73c71fb3c4f66b6ebdfa032646bea72"),
         ("test.csv", "2c48b26e84c04a69b948082edae46f8c")),
        size="~2.5 GB"),
    CatalogEntry(
        "avazu", "avazu", "Avazu click-through prediction (Kaggle 2014)",
        "Kaggle competition rules: non-commercial research use, accept them on kaggle.com", (),
        manual=("Kaggle needs an account: accept the rules of avazu-ctr-prediction, then run "
                "`kaggle competitions download -c avazu-ctr-prediction -f train.gz -p DIR/avazu`"),
        size="1.1 GB"),
    CatalogEntry(
        "avazu_x1", "Avazu_x1", "BARS Avazu_x1 (reczoo on Hugging Face), AFN's 7:1:2 split",
        _BARS_TERMS,
        (RemoteFile(_HF.format("Avazu_x1"), "Avazu_x1.zip", extract=True, size=624515270,
                    sha256="d87b332da23c5b8c6f472ff73ad8b27a5a698e89afab64b3a56e67b42470b330"),),
        (("train.csv", "f1114a07aea9e996842c71648e0f6395"), ("valid.csv", "d9568f246357d156c4b8030fadb8b623"),
         ("test.csv", "9e2fe9c48705c9315ae7a0953eb57acf")),
        size="625 MB"),
    CatalogEntry(
        "movielens_tag", "movielens_tag", "MovieLens-tag as released with NFM (He & Chua, SIGIR 2017)",
        "GroupLens MovieLens terms: research use, no redistribution without permission",
        tuple(RemoteFile(_NFM.format(f"ml-tag/ml-tag.{s}.libfm"), f"ml-tag.{s}.libfm")
              for s in ("train", "validation", "test")),
        size="~60 MB"),
    CatalogEntry(
        "movielens_latest_x1", "MovielensLatest_x1", "BARS MovielensLatest_x1 (reczoo on Hugging Face)",
        _BARS_TERMS, (RemoteFile(_HF.format("MovielensLatest_x1"), "MovielensLatest_x1.zip", extract=True),),
        size="~20 MB"),
    CatalogEntry(
        "frappe_x1", "Frappe_x1", "BARS Frappe_x1 (reczoo on Hugging Face)",
        _BARS_TERMS + "; Frappe: Baltrunas et al. 2015, non-commercial",
        (RemoteFile(_HF.format("Frappe_x1"), "Frappe_x1.zip", extract=True),), size="~3 MB"),
    CatalogEntry(
        "frappe", "frappe", "Frappe as released with NFM (libfm files)",
        "Frappe: Baltrunas et al. 2015; research use, non-commercial, cite the source",
        tuple(RemoteFile(_NFM.format(f"frappe/frappe.{s}.libfm"), f"frappe.{s}.libfm")
              for s in ("train", "validation", "test")),
        size="~14 MB"),
    *(CatalogEntry(
        f"amazon_{cat.lower()}", f"amazon_{cat.lower()}",
        f"Amazon reviews 2014, {cat} 5-core + metadata (McAuley, snap.stanford.edu)",
        "research use; cite McAuley et al. SIGIR 2015 and He & McAuley WWW 2016",
        (RemoteFile(_SNAP.format(f"reviews_{cat}_5.json.gz"), f"reviews_{cat}_5.json.gz"),
         RemoteFile(_SNAP.format(f"meta_{cat}.json.gz"), f"meta_{cat}.json.gz")),
        size=size) for cat, size in (("Electronics", "~680 MB"), ("Books", "~4 GB"))),
)}  # fmt: skip


def describe() -> str:
    """The catalog as a markdown table (``dpn-jax data list``)."""
    rows = ["| name | folder | source | size | licence |", "|---|---|---|---|---|"]
    for e in CATALOG.values():
        how = e.size + (" (manual download)" if e.manual else "")
        rows.append(f"| {e.name} | {e.folder}/ | {e.source} | {how} | {e.licence} |")
    return "\n".join(rows)


def download(name: str, to: str | Path, *, timeout: float = 30.0, progress: bool | None = None,
             log=print) -> Path:  # fmt: skip
    """Fetch ``name``'s files into ``to/<folder>/`` and verify them; returns that folder."""
    from dpn_jax.data.download import fetch
    from dpn_jax.errors import DataError

    if name not in CATALOG:
        raise DataError(f"unknown dataset {name!r}; downloadable datasets are {sorted(CATALOG)}")
    e = CATALOG[name]
    folder = Path(to).expanduser() / e.folder
    if e.manual:
        raise DataError(f"{name} cannot be downloaded anonymously. {e.manual.replace('DIR', str(to))}"
                        f"; then run `dpn-jax data prepare {name} --data-dir {to}`")  # fmt: skip
    log(f"{name}: {e.source}; licence: {e.licence}")
    fetch(e.files, folder, timeout=timeout, progress=progress, log=log)
    verify_extracted(e, folder, log=log)
    return folder


def verify_extracted(e: CatalogEntry, folder: Path, log=print) -> None:
    """Check the published md5 of unpacked files (found in the folder or one level below)."""
    import hashlib

    from dpn_jax.errors import DataError

    for rel, md5 in e.extracted_md5:
        hits = [p for p in (folder / rel, *folder.glob(f"*/{rel}")) if p.is_file()]
        if not hits:
            raise DataError(f"{e.name}: {rel} not found under {folder} after unpacking")
        with open(hits[0], "rb") as fh:
            got = hashlib.file_digest(fh, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()
        if got != md5:
            raise DataError(f"{hits[0]}: md5 {got} differs from the published {md5}; "
                            "delete the folder and download again")  # fmt: skip
        log(f"{hits[0].name}: md5 ok")
