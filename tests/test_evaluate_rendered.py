"""The rendered-pose protocol end to end (small grid)."""

from __future__ import annotations

import csv
import json

from click.testing import CliRunner

from facerecon.cli import main


def test_evaluate_rendered_reports_errors_by_yaw(ict_embedded_model_file, tmp_path):
    args = ["evaluate", "rendered", "--out", str(tmp_path), "--face-model", str(ict_embedded_model_file),
            "--samples", "1", "--yaws", "0,40", "--pitches", "-15", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert [row["yaw"] for row in data["by_yaw"]] == [0.0, 40.0] and data["by_yaw"][0]["reconstructed"] == 1
    for row in data["by_yaw"]:  # a face the detector misses is reported, not scored
        if row["reconstructed"]:
            assert 0.2 < row["rmse_mean_mm"] < 8.0 and 0.2 < row["baseline_rmse_mean_mm"] < 8.0
        else:
            assert row["rmse_mean_mm"] is None
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"ok", "not reconstructed"}
    assert (tmp_path / "error_by_yaw.png").stat().st_size > 1000
    # resumable: a second run re-renders identically and fits nothing again
    again = CliRunner().invoke(main, args)
    assert json.loads(again.output[again.output.index("{"):])["by_yaw"] == data["by_yaw"]
