"""End-to-end: the demo's claims on the zoo (slow: synthesis + 18 evaluations on the full test set)."""

import json

import pytest

from zq_plugin import cli


@pytest.mark.slow
def test_demo_zero_shot_matches_real_data_at_8_bits_and_beats_noise_at_4(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "demo.md").read_text().count("| W4A4 |") == len(results["models"]) == 2
    for name, entry in results["models"].items():
        rows = entry["rows"]
        # zero-shot calibration loses at most 0.3 points to real data at 8 bits (measured: it is
        # 0.12 below on resnet_s and 0.38 above on mobilenetv2_s, see docs/results.md)
        assert rows["W8A8"]["zeroq"] >= rows["W8A8"]["real"] - 0.3, name
        assert rows["W4A4"]["zeroq"] >= rows["W4A4"]["noise"], name
    assert results["total_seconds"] < 300
    # a rerun uses the cache
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "demo.json").read_text())["models"]
    assert {n: e["rows"] for n, e in again.items()} == {n: e["rows"] for n, e in results["models"].items()}
    assert all(again[n]["seconds"] < results["models"][n]["seconds"] for n in again)
