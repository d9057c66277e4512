"""The command line: tables, the main job, and one-line errors with exit status 2."""

import json

from precision_lab.cli import main


def test_formats_table_and_json(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "fp8_e4m3fn" in out and "448" in out
    assert main(["formats", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"fp32", "bf16", "fp8_e5m2", "e8m0", "fp4_e2m1fn"}


def test_roundoff_table_says_which_column_is_which(capsys):
    assert main(["roundoff-table", "--format", "bf16", "--format", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "one ulp (paper)" in out and "half ulp (nearest)" in out
    assert any(l.startswith("bf16") and "[1024, 2048)" in l and " 8 " in l for l in out.splitlines())


def test_wrong_format_name_exits_2_with_one_line(capsys):
    assert main(["roundoff-table", "--format", "bf61"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "closest match: 'bf16'" in err and "fp8_e4m3fn" in err


def test_main_job_writes_the_roundoff_figure(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "roundoff_per_binade.png").stat().st_size > 1000
    assert (tmp_path / "roundoff_per_binade.svg").exists()
