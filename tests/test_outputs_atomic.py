"""Nothing lost: every output appears complete or not at all, and ``train --out`` never replaces
what is not its own earlier bundle without ``--overwrite``."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from csv_fixtures import write_tiny_csv_spec
from test_serving_data import trained_bundle

from dpn_jax import atomic
from dpn_jax.cli import main
from dpn_jax.errors import DpnError
from dpn_jax.serving.bundle import read_bundle

# ----------------------------------------------------------------------------- the helpers


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_atomic_write_replaces_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_write(target) as fh:
            fh.write("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and _leftovers(tmp_path) == []
    os.chmod(target, 0o640)
    atomic.write_text(target, "new")
    assert target.read_text() == "new" and _leftovers(tmp_path) == []
    assert target.stat().st_mode & 0o777 == 0o640  # who may read it is kept
    atomic.write_bytes(tmp_path / "deep" / "er" / "x.bin", b"\x00\x01")  # parents are created
    assert (tmp_path / "deep" / "er" / "x.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(DpnError, match="nothing was written"):
        with atomic.atomic_path(tmp_path / "never.csv"):
            pass
    assert not (tmp_path / "never.csv").exists()


@pytest.mark.parametrize("exchange,links", [(True, True), (False, True), (True, False)],
                         ids=["renameat2", "two-renames", "no-hard-links"])
def test_atomic_dir_swaps_whole_folders_and_carries_kept_entries(tmp_path: Path, monkeypatch,
                                                                 exchange: bool, links: bool) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", lambda: None)
    if not links:  # a file system without hard links: kept entries are moved instead
        def no_link(*args, **kw):
            raise OSError(1, "Operation not permitted")

        monkeypatch.setattr(atomic.os, "link", no_link)
    d = tmp_path / "bundle"
    d.mkdir(mode=0o750)
    (d / "a.json").write_text("old a")
    (d / "stale.json").write_text("old only")
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "6").write_text("ckpt")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(d, keep=lambda n: n == "checkpoints") as tmp:
            (tmp / "a.json").write_text("new a")
            raise RuntimeError("killed")
    assert sorted(p.name for p in d.iterdir()) == ["a.json", "checkpoints", "stale.json"]
    assert (d / "a.json").read_text() == "old a" and _leftovers(tmp_path) == []
    with atomic.atomic_dir(d, keep=lambda n: n == "checkpoints") as tmp:
        assert tmp.parent == d.parent and tmp.name.startswith("bundle.tmp-")
        (tmp / "a.json").write_text("new a")
    assert sorted(p.name for p in d.iterdir()) == ["a.json", "checkpoints"]  # stale.json: not kept
    assert (d / "a.json").read_text() == "new a" and (d / "checkpoints" / "6").read_text() == "ckpt"
    assert d.stat().st_mode & 0o777 == 0o750 and _leftovers(tmp_path) == []
    with atomic.atomic_dir(tmp_path / "fresh") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "fresh" / "x").read_text() == "x"
    (tmp_path / "file").write_text("")
    with pytest.raises(DpnError, match="is a file"):
        with atomic.atomic_dir(tmp_path / "file"):
            pass


def test_atomic_dir_keeps_carried_entries_in_the_old_folder_until_the_swap(tmp_path: Path,
                                                                           monkeypatch) -> None:
    """A process killed after the kept entries are carried and before the swap (tests/
    test_faults.py kills one there) must leave them in the old folder: moving them left the
    old folder without its checkpoints, and ``train --resume`` with nothing to resume."""
    d = tmp_path / "bundle"
    (d / "checkpoints" / "6").mkdir(parents=True)
    (d / "checkpoints" / "6" / "state").write_text("ckpt")
    (d / "a.json").write_text("old a")
    seen = []

    def swap_seeing(new: Path, target: Path) -> Path:
        seen.append({where: (d / "checkpoints" / "6" / "state").is_file() and
                     (d / "checkpoints" / "6" / "state").read_text() for where, d in (("target", target), ("new", new))})
        return real_swap(new, target)

    real_swap = atomic._swap
    monkeypatch.setattr(atomic, "_swap", swap_seeing)
    with atomic.atomic_dir(d, keep=lambda n: n == "checkpoints") as tmp:
        (tmp / "a.json").write_text("new a")
    assert seen == [{"target": "ckpt", "new": "ckpt"}]  # both whole at the moment of the swap
    assert (d / "a.json").read_text() == "new a" and (d / "checkpoints" / "6" / "state").read_text() == "ckpt"
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- predict, export


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return trained_bundle(tmp_path_factory, "dnn")


def _with_bad_price(src: Path, dst: Path, data_row: int) -> None:
    with open(src, newline="") as fh:
        rows = list(csv.reader(fh))
    rows[data_row][rows[0].index("price")] = "old"  # rows[0] is the header: data rows count from 1
    with open(dst, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_failed_predict_keeps_the_previous_output_and_names_file_and_row(
        bundle: Path, tmp_path: Path, capsys, suffix: str) -> None:
    bad = tmp_path / "requests.csv"
    _with_bad_price(bundle.parent / "test.csv", bad, data_row=40)
    out = tmp_path / f"scores{suffix}"
    out.write_bytes(b"yesterday's scores\n")
    code = main(["predict", "--model", str(bundle), "--input", str(bad), "--output", str(out),
                 "--batch-size", "7"])  # row 40 sits in the 6th chunk, as its 5th row
    err = capsys.readouterr().err.strip().splitlines()
    assert out.read_bytes() == b"yesterday's scores\n" and _leftovers(tmp_path) == []
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"dpn-jax: error: {bad}: numeric column 'price' row 40: cannot parse 'old' as "
                      "a number (leave the cell empty for a missing value)")  # data row, as training's
    good = tmp_path / "good.csv"
    _with_bad_price(bundle.parent / "test.csv", good, data_row=40)
    good.write_text(good.read_text().replace(",old,", ",12.5,"))
    assert main(["predict", "--model", str(bundle), "--input", str(good), "--output", str(out),
                 "--batch-size", "7"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 150 and _leftovers(tmp_path) == []
    assert out.read_bytes() != b"yesterday's scores\n"


def test_failed_export_keeps_the_previous_export(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    from dpn_jax.serving import export

    out = tmp_path / "exported"
    assert main(["export", "--model", str(bundle), "--out", str(out), "--platforms", "cpu"]) == 0
    (out / "README.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class FailingJson:
        @staticmethod
        def dumps(*args, **kw):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "json", FailingJson)
    with pytest.raises(OSError, match="No space left"):
        export.export_bundle(bundle, out, ["cpu"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _leftovers(tmp_path) == []
    monkeypatch.undo()
    export.export_bundle(bundle, out, ["cpu"])  # a complete export replaces it; README.txt stays
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


# ----------------------------------------------------------------------------- train --out


def _train(spec: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "lr", "--data", str(spec), "--out", str(out), "--no-progress",
            "--set", "batch_size=128", "--set", "max_epochs=2", *extra]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpn-jax: error: ") and "Traceback" not in err[0], err
    return err[0]


def test_train_refuses_a_folder_that_is_not_a_bundle(tmp_path: Path, capsys) -> None:
    spec = write_tiny_csv_spec(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"my": "results"}')
    (mine / "model.json").write_text('{"my": "model"}')
    (mine / "notes.txt").write_text("notes")
    assert main(_train(spec, mine)) == 2
    line = _one_error(capsys)
    assert f"--out {mine} exists and is not a dpn-jax model bundle" in line and "--overwrite" in line
    assert "results.json" in line and "model.json" in line
    assert (mine / "results.json").read_text() == '{"my": "results"}'
    assert (mine / "model.json").read_text() == '{"my": "model"}'
    (tmp_path / "afile").write_text("x")
    assert main(_train(spec, tmp_path / "afile")) == 2
    assert "is a file" in _one_error(capsys)
    assert main(_train(spec, mine, "--overwrite")) == 0
    assert "--overwrite" in capsys.readouterr().err
    read_bundle(mine)  # a complete bundle; the user's other file is still there
    assert (mine / "notes.txt").read_text() == "notes" and _leftovers(tmp_path) == []


def test_train_replaces_only_its_own_bundle_atomically_keeping_checkpoints(tmp_path: Path, capsys,
                                                                           monkeypatch) -> None:
    from dpn_jax.serving import bundle as bundle_module

    spec = write_tiny_csv_spec(tmp_path)
    out = tmp_path / "run"
    assert main(_train(spec, out)) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())

    # another run's bundle: refused before any training, nothing touched
    assert main(_train(spec, out, "--set", "lr=0.01")) == 2
    line = _one_error(capsys)
    assert f"--out {out} holds the bundle of another run (train.lr: 0.001 in the bundle, 0.01 now)" in line
    assert main(_train(spec, out, "--seed", "7")) == 2
    assert "seed: 2021 in the bundle, 7 now" in _one_error(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    # the same command may replace it; a write that fails half-way leaves the old bundle whole
    def failing(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle_module, "dataset_info", failing)  # after model.json and params
    with pytest.raises(OSError, match="No space left"):
        main(_train(spec, out))
    monkeypatch.undo()
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    read_bundle(out)
    assert _leftovers(tmp_path) == []

    assert main(_train(spec, out)) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note")]
    assert len(notes) == 1 and "replacing the checkpoints of an earlier run" in notes[0]
    assert "its bundle (same model, data and settings)" in notes[0]
    read_bundle(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == steps  # carried into the new bundle

    # resuming (max_epochs may change on resume) replaces it too, and its checkpoints stay
    assert main(_train(spec, out, "--resume", "--set", "max_epochs=3")) == 0
    err = capsys.readouterr().err
    assert "resume from" in err and "holds this run's earlier bundle" in err
    assert json.loads((out / "model.json").read_text())["train"]["max_epochs"] == 3
    assert (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    assert _leftovers(tmp_path) == []
