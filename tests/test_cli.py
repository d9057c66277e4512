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


def test_bad_routing_or_data_kind_exits_2_with_one_line(tmp_path, capsys):
    """Issue 13: a misspelt routing control or data kind is one line naming the valid choices; nothing is
    written."""
    for args, needles in ((["--set", "model.routing=randm"], ("routing", "random", "hash", "top2")),
                          (["--set", "data.kind=mixtur"], ("data.kind", "mixture", "synthetic", "text"))):
        assert main(["train", "--steps", "1", "--no-progress", "--out", str(tmp_path / "out"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
        assert not (tmp_path / "out").exists()


def test_model_info_checks_the_flop_matched_dense_model(capsys):
    assert main(["model-info", "tiny", "--json"]) == 0
    moe = json.loads(capsys.readouterr().out)
    assert main(["model-info", "tiny", "--json", "--set", "model.num_experts=0",
                 "--set", "model.flop_matched_dense=true"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert dense["flops_per_sequence"] == moe["flops_per_sequence"] - moe["flops_by_part"]["router"]
    assert main(["model-info", "tiny", "--set", "train.steps=3"]) == 2
    assert "model fields only" in capsys.readouterr().err


def test_main_job_writes_figures_and_a_report(tmp_path, capsys):
    """The main job (smoke version of its sweep): roundoff figures and report, then the quick-start sweep's
    figures and report."""
    figs, store = tmp_path / "figures", tmp_path / "store"
    assert main(["run", "--out", str(store), "--figures", str(figs), "--smoke"]) == 0
    assert (figs / "roundoff_per_binade.png").stat().st_size > 1000
    assert (figs / "roundoff_per_binade.svg").exists() and (figs / "roundoff.md").exists()
    assert (figs / "quickstart_smoke_loss_curves.png").exists()
    assert "Selective precision" in (store / "report.md").read_text()
    assert "0.142" in capsys.readouterr().out  # the footnote example, printed
