"""The experiment scripts: seeds.py trains each run's seeds as one sweep, writes the table with
its command, and resumes from the per-seed files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


@pytest.fixture
def seeds_script(monkeypatch, tiny_synthetic):
    import seeds

    monkeypatch.setattr(seeds, "load_dataset", lambda *a, **k: tiny_synthetic)
    return seeds


def test_seeds_script_sweeps_writes_and_resumes(seeds_script, tmp_path, monkeypatch):
    out = tmp_path / "t"
    argv = ["--data", "synthetic", "--seeds", "1,2", "--out", str(out), "--protocol", "max_epochs=2",
            "--protocol", "batch_size=1024", "--run", "lr", "--run", "fm embedding_dim=4"]
    assert seeds_script.main(argv, command="python experiments/seeds.py ...") == 0
    table = (out.parent / "t.md").read_text()
    assert "Protocol for every run: `max_epochs=2 batch_size=1024`" in table
    assert "| `fm embedding_dim=4` |" in table and "| `lr` |" in table
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["fm_max_epochs=2_batch_size=1024_embedding_dim=4-1.json",
                    "fm_max_epochs=2_batch_size=1024_embedding_dim=4-2.json",
                    "lr_max_epochs=2_batch_size=1024-1.json", "lr_max_epochs=2_batch_size=1024-2.json"]
    first = json.loads((out / "runs" / runs[0]).read_text())
    assert first["sweep_replicas"] == 2 and first["config"]["model"]["embedding_dim"] == 4
    assert first["config"]["train"]["max_epochs"] == 2

    # A rerun trains nothing: every (run, seed) is on disk.
    monkeypatch.setattr(seeds_script, "train_seeds", lambda *a, **k: pytest.fail("retrained"))
    assert seeds_script.main(argv) == 0
    assert (out.parent / "t.json").exists()


def test_data_options_reach_the_loader_and_the_table(monkeypatch, tmp_path, tiny_synthetic):
    """table45 --max-users forwards a load_dataset option to seeds.py and writes a separate table;
    seeds.py passes it to the loader and states it in the header."""
    import seeds
    import table45

    seeds_main = seeds.main  # table45.seeds is this module
    forwarded, commands = [], []
    monkeypatch.setattr(table45.seeds, "main", lambda argv, command: commands.append(command)
                        or forwarded.append(argv) or 0)
    assert table45.main(["--data", "amazon_videogames", "--table", "5", "--models", "din",
                         "--max-users", "15000", "--seeds", "1"]) == 0
    assert commands == ["python experiments/table45.py --data amazon_videogames --max-users "
                        "15000 --seeds 1 --table 5"] * 2  # the header reproduces the whole table
    argv, report = forwarded  # train the asked model, then table every finished run
    assert argv[argv.index("--data-option") + 1] == "max_users=15000"
    assert argv[argv.index("--out") + 1].endswith("table5_amazon_videogames_users15000")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--run"] == ["din"]
    assert "--report-only" in report and report.count("--run") == len(table45.TABLES["5"])

    seen = {}
    monkeypatch.setattr(seeds, "load_dataset", lambda *a, **k: seen.update(k) or tiny_synthetic)
    out = tmp_path / "t"
    assert seeds_main(["--data", "synthetic", "--seeds", "1", "--out", str(out), "--protocol",
                       "max_epochs=1", "--run", "lr", "--data-option", "max_users=7"], command="c") == 0
    assert seen["max_users"] == 7
    assert "Data options: `max_users=7`" in (out.parent / "t.md").read_text()
    with pytest.raises(SystemExit):
        seeds_main(["--data", "x", "--out", str(out), "--run", "lr", "--data-option", "max_users=a"])
