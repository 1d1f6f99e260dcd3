"""`graphopt report` on the command line."""
from __future__ import annotations

import json

from graphopt.cli import main


def test_report_of_a_model_name_writes_html_and_json(tmp_path, capsys):
    html, data = tmp_path / "r.html", tmp_path / "r.json"
    assert main(["report", "resnet", "-o", str(html), "--json", str(data), "--runs", "2", "--threads", "1",
                 "--simulate", "prune:0.5"]) == 0
    out = capsys.readouterr()
    assert f"report: {html}" in out.out and "prune:0.5: predicted" in out.err
    rows = json.loads(data.read_text())
    assert rows["totals"]["kernels"] == len(rows["kernels"]) > 0
    assert rows["simulations"][0]["measured_ms"] is None         # no --apply: predicted only
    assert html.stat().st_size > 1e6


def test_report_of_an_artifact_and_a_comparison(resnet_compiled, tmp_path, capsys):
    artifact = resnet_compiled.save(str(tmp_path / "artifact"))
    html, data = tmp_path / "a.html", tmp_path / "a.json"
    assert main(["report", artifact, "-o", str(html), "--json", str(data), "--runs", "2",
                 "--compare", artifact]) == 0
    compared = json.loads(data.read_text())["compare"]
    assert compared and [r["layer"] for r in compared["layers"]][:2] == ["stem.1", "blocks.0"]


def test_report_errors_are_one_line(resnet_compiled, tmp_path, capsys):
    artifact = resnet_compiled.save(str(tmp_path / "artifact"))
    assert main(["report", "resnet", "--apply"]) == 1
    assert "--apply measures simulated changes" in capsys.readouterr().err
    assert main(["report", artifact, "--simulate", "prune:0.3"]) == 1
    assert "--simulate needs the model, not an artifact" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "not a graphopt artifact" in capsys.readouterr().err
    assert main(["report", "resnet", "--simulate", "shrink:2"]) == 1
    err = capsys.readouterr().err
    assert "expected KIND:VALUE" in err and err.count("\n") == 1          # before any compiling
