from __future__ import annotations

import pytest

from trainer.metrics import cl_metrics, format_table, heatmap

R = [[0.9, 0.3, 0.2],
     [0.7, 0.8, 0.4],
     [0.6, 0.7, 0.9]]
B = [0.1, 0.2, 0.3]


def test_metrics_on_a_hand_made_matrix():
    m = cl_metrics(R, B)
    assert m["ACC"] == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert m["BWT"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)
    assert m["FWT"] == pytest.approx(((0.3 - 0.2) + (0.4 - 0.3)) / 2)


def test_partial_runs_use_the_stages_done():
    m = cl_metrics(R[:2], B)
    assert m["ACC"] == pytest.approx((0.7 + 0.8) / 2)
    assert m["BWT"] == pytest.approx(0.7 - 0.9)
    assert m["FWT"] == pytest.approx(0.3 - 0.2)
    one = cl_metrics(R[:1], B)
    assert one["ACC"] == pytest.approx(0.9) and one["BWT"] is None and one["FWT"] is None


def test_table_and_heatmap(tmp_path):
    text = format_table(["a", "b", "c"], R, B, cl_metrics(R, B))
    assert "untrained" in text and "after 3 c" in text and "ACC 0.733" in text and "BWT -0.200" in text
    heatmap(["a", "b", "c"], R, B, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
