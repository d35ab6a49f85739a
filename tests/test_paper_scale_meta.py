"""Every paper-scale configuration (stage 1, stage 2, each ablation, transfer) is built on the ``meta`` device, the
real modules through the real config parser, and the README's parameter table is what they hold."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_every_paper_config_builds_on_meta_and_the_readme_table_is_what_it_holds(monkeypatch):
    from experiments.parameters.paper import PAPER_CONFIGS, paper_table

    monkeypatch.chdir(REPO)
    table = paper_table()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert len(rows) == len(PAPER_CONFIGS)
    readme = (REPO / "README.md").read_text()
    assert table in readme, f"the README's parameter table is out of date; it is now:\n{table}"
    # what the ground truth of each configuration guarantees, independently of the table
    trained = {label: int(line.split(" | ")[2].replace(",", "")) for label, line in rows.items()}
    assert trained["stage 2 transfer: routers only"] == 2 * (249_600 + 340_992)  # both branches' routers only
    assert trained["stage 2 ablation `text_image_ts`"] == trained["stage 2, Text+Image (TS)"]
    assert trained["stage 1 transfer: new adapter + routers"] < trained["stage 1, image target (subj01)"] / 10
