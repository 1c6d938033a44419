"""`kdexp bench`: the five epoch variants run on real data and the table states their ratios."""

from __future__ import annotations

import json

import pytest

from kdexp.bench import format_epochs, main

SMALL = ["experiment=digits_smoke", "teacher.max_epochs=3"]
pytestmark = pytest.mark.slow  # ~20 s of fits; the suite's default run stays under its time budget


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "bench.json"
    assert main([*SMALL, f"paths.cache_dir={folder / 'cache'}", "--widths", "8", "32", "--repeats", "1",
                 "--epochs", "2", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_every_variant_is_timed_per_width(measured):
    rows = measured["epochs"]
    assert [row["width"] for row in rows] == [8, 32]
    for row in rows:
        medians = row["median_epoch_s"]
        assert set(medians) == {"ce", "kd_online", "kd_cached", "bare_kd_cached", "bare_ce"}
        assert all(0 < seconds < 60 for seconds in medians.values())
        assert row["ratios"]["(iii)/(i) cached KD / CE"] == pytest.approx(medians["kd_cached"] / medians["ce"])
        assert row["ratios"]["(i)/(v) CE / bare CE"] == pytest.approx(medians["ce"] / medians["bare_ce"])


def test_the_printed_table_has_one_row_per_width(measured):
    table = format_epochs(measured["epochs"]).splitlines()
    assert len(table) == 2 + 2 and table[2].startswith("| 8 |") and table[3].startswith("| 32 |")
