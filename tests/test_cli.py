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


# -- issue 16, part 2: what a new user trying the CLI ran into -----------------------------------------------

import dataclasses  # noqa: E402
import shutil  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from precision_lab.cli import COMMANDS, _overrides  # noqa: E402
from precision_lab.config import SECTIONS, run_config  # noqa: E402
from precision_lab.errors import UserError  # noqa: E402


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# 3. booleans (and every typed field) are checked: exit 2, never a string stored and the default run.

@pytest.mark.parametrize("value", ["no", "False", "maybe", "2", "1", "yes", "TRUE"])
def test_set_boolean_accepts_only_true_or_false(tmp_path, capsys, value):
    out = tmp_path / "out"
    assert main(["train", "--out", str(out), "--no-progress", "--set", f"model.rmsnorm_scale={value}"]) == 2
    _one_line_error(capsys, "model.rmsnorm_scale", "true or false")
    assert not out.exists()  # checked before anything was written


def test_set_boolean_true_false_parse_to_booleans():
    for text, value in (("true", True), ("false", False)):
        assert run_config(_overrides([f"model.rmsnorm_scale={text}"])).model.rmsnorm_scale is value


def _wrong_value(tp):
    """A value of the wrong kind for a field type: a number where text is expected, else text."""
    accepts_text = tp is str or typing.get_origin(tp) is typing.Literal or str in typing.get_args(tp)
    return 12345 if accepts_text else "maybe"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_typed_field_rejects_a_wrong_type(section):
    """One generic check driven by the dataclass annotations: every field of every section, including
    ints given a bool, floats given text, enums (Literal) and lists."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        with pytest.raises(UserError, match=rf"^{section}\.{field.name} "):
            run_config({section: {field.name: _wrong_value(hints[field.name])}})
        if hints[field.name] is int:
            with pytest.raises(UserError, match=rf"^{section}\.{field.name} must be an integer, got True"):
                run_config({section: {field.name: True}})


def test_sweep_toml_boolean_is_checked_and_labelled_base(tmp_path):
    from precision_lab.config import validate
    from precision_lab.sweep import load_sweep

    path = tmp_path / "s.toml"
    path.write_text('[base]\nmodel = { rmsnorm_scale = "no" }\n[[axes]]\nfield = "optim.lr"\nvalues = [0.01, 0.02]\n')
    with pytest.raises(UserError, match=r"s\.toml: \[base\]: model\.rmsnorm_scale must be true or false"):
        load_sweep(path, validate=validate)


# 4. outputs are never overwritten silently (train). One finished micro run, trained once for the module.

MICRO_ARGS = ["train", "--seeds", "2", "--steps", "6", "--set=model.d_model=32", "--set=model.d_ff=64",
              "--set=model.num_encoder_layers=1", "--set=model.num_decoder_layers=1", "--set=model.moe_every=1",
              "--set=model.num_experts=4", "--set=train.chunk_steps=3", "--set=train.checkpoint_every=0",
              "--set=train.eval_every=0", "--set=train.batch_size=4", "--set=train.eval_batches=1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The --out folder of a finished `train` of MICRO_ARGS, written as train writes it (its numbers made
    up: these tests are about what the CLI does with the folder, not about training, so nothing compiles)."""
    import numpy as np

    from precision_lab.cli import build_parser, train_config
    from precision_lab.train import _write_outputs, hparams_of

    out = tmp_path_factory.mktemp("train") / "run"
    run = train_config(build_parser().parse_args([*MICRO_ARGS, "--out", str(out)]))
    summary = {"seeds": [0, 1], "hparams": [hparams_of(run)] * 2, "backend": "cpu", "policy": "fp32",
               "final_eval_loss": [3.0, 3.1], "diverged": [False, False], "divergence_step": [None, None],
               "divergence_rule": [None, None]}
    _write_outputs(out, run, summary, {"loss": np.zeros((6, 2), np.float32)})
    return out


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("extra,exit_code,needles", [
    ([], 2, ["already holds this finished run", "--resume", "--force"]),
    (["--resume"], 0, []),
    (["--set=optim.lr=0.02"], 2, ["another configuration (differs in optim.lr)", "--force"]),
    (["--set=optim.lr=0.02", "--resume"], 2, ["another configuration", "--force"]),
    (["--steps", "9", "--resume"], 2, ["finished run of 6 steps", "cannot be extended to 9", "--force"]),
])
def test_finished_train_output_is_not_overwritten(finished_run, tmp_path, capsys, extra, exit_code, needles):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*MICRO_ARGS, "--no-progress", "--out", str(out), *extra]) == exit_code
    if exit_code == 2:
        _one_line_error(capsys, *needles)
    else:
        assert "already finished" in capsys.readouterr().out  # --resume of a finished run: says so, does nothing
    assert _snapshot(out) == before


def _fake_checkpoint(out: Path, fingerprint: str) -> Path:
    meta = out / "checkpoint" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"step": 3, "fingerprint": fingerprint, "seeds": [0, 1], "hparams": []}))
    return meta


def test_a_checkpoint_is_not_discarded_without_resume(tmp_path, capsys):
    meta = _fake_checkpoint(tmp_path / "run", "not-this-run")
    text = meta.read_text()
    assert main([*MICRO_ARGS, "--no-progress", "--out", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, "unfinished run (step 3)", "--resume", "--force")
    assert main([*MICRO_ARGS, "--no-progress", "--out", str(tmp_path / "run"), "--resume"]) == 2
    err = _one_line_error(capsys, "another configuration", "--force")
    assert "drop --resume" not in err
    assert meta.read_text() == text


def test_force_discards_what_the_folder_holds(finished_run, tmp_path):
    from precision_lab.train import prepare_out_dir

    run = run_config({"optim": {"lr": 0.5}})
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    _fake_checkpoint(out, "not-this-run")
    with pytest.raises(UserError):
        prepare_out_dir(out, run)
    assert prepare_out_dir(out, run, force=True) == "new"
    assert not any(out.iterdir())


def test_sweep_into_another_sweeps_store_exits_2(tmp_path, capsys):
    """Checked before anything trains: the store keeps its manifest and records."""
    from precision_lab.store import ResultsStore

    store = tmp_path / "store"
    ResultsStore(store).write_manifest({"name": "quickstart_smoke"})
    ResultsStore(store).put("a-run", {"x": 1})
    before = _snapshot(store)
    quickstart = str(Path(__file__).parents[1] / "precision_lab" / "quickstart.toml")
    assert main(["sweep", quickstart, "--out", str(store), "--no-progress"]) == 2
    _one_line_error(capsys, "smoke version of this sweep", "--force")
    assert main(["run", "--out", str(store), "--figures", str(tmp_path / "f")]) == 2
    _one_line_error(capsys, "smoke version", "--force")
    assert _snapshot(store) == before and not (tmp_path / "f" / "roundoff.md").exists()


# 5. an unwritable --out is one line, exit 2, before any work.

@pytest.mark.parametrize("args", [
    MICRO_ARGS,
    ["roundoff"],
    ["sweep", str(Path(__file__).parents[1] / "precision_lab" / "quickstart.toml")],
    ["figures", "STORE"],
    ["report", "STORE", "--figures"],
    ["run", "--figures", "FIGS"],
])
@pytest.mark.parametrize("where", ["file", "/proc/precision_lab_x"])
def test_unwritable_out_exits_2_before_any_work(tmp_path, capsys, args, where):
    from precision_lab.store import ResultsStore

    store = tmp_path / "store"
    ResultsStore(store).write_manifest({"name": "s"})
    ResultsStore(store).put("a-run", {"x": 1})
    target = where
    if where == "file":
        target = str(tmp_path / "a_file")
        Path(target).write_text("keep me")
    args = [str(store) if a == "STORE" else str(tmp_path / "figs") if a == "FIGS" else a for a in args]
    if args[-1] != "--figures":
        args = [*args, "--out"]
    assert main([*args, target]) == 2
    _one_line_error(capsys, target)
    if where == "file":
        assert Path(target).read_text() == "keep me"


# 6. a TOML that is binary, a folder or unreadable: one line, exit 2.

@pytest.mark.parametrize("kind", ["binary", "folder", "unreadable"])
@pytest.mark.parametrize("command", ["sweep", "roundoff"])
def test_bad_toml_file_is_one_line(tmp_path, capsys, kind, command):
    path = tmp_path / "x.toml"
    if kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    elif kind == "folder":
        path.mkdir()
    else:
        path = Path("/proc/self/mem")  # exists, but reading it from offset 0 fails even for root
    assert main([command, str(path), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, str(path))


# 7. [report] names checked at load time; roundoff and sweep TOMLs name the right command.

def test_report_name_typo_fails_before_training(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text('[base]\ntrain = { steps = 5 }\n[report]\nfigures = ["loss_curve"]\n')
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    _one_line_error(capsys, "report.figures", "closest match: 'loss_curves'")
    path.write_text('[base]\ntrain = { steps = 5 }\n[report]\ntables = ["stabilty"]\n')
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    _one_line_error(capsys, "report.tables", "closest match: 'stability'")
    assert not (tmp_path / "out" / "runs").exists()


def test_roundoff_and_sweep_tomls_name_their_command(tmp_path, capsys):
    experiments = Path(__file__).parents[1] / "experiments"
    assert main(["sweep", str(experiments / "roundoff_exp.toml"), "--out", str(tmp_path / "a")]) == 2
    _one_line_error(capsys, "run it with: precision-lab roundoff")
    assert main(["roundoff", str(experiments / "router_fp16.toml"), "--out", str(tmp_path / "b")]) == 2
    _one_line_error(capsys, "run it with: precision-lab sweep")


# 9. help, version, bare command, --shard, compare --last, formats, suggestions, FLOP units, load_results.

@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_help_shows_defaults_and_an_example(capsys, name):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "example:\n  precision-lab " + name in out
    parser = __import__("precision_lab.cli", fromlist=["build_parser"]).build_parser()
    sub = parser._subparsers._group_actions[0].choices[name]
    for action in sub._actions:
        if action.option_strings and action.default not in (None, False, [], "==SUPPRESS=="):
            assert f"(default: {action.default})" in " ".join(out.split()), (name, action.dest)
    if name == "sweep":
        assert "counting from 0" in out


def test_version_and_bare_command(capsys):
    from precision_lab import __version__

    assert main(["--version"]) == 0 and __version__ in capsys.readouterr().out
    assert main([]) == 2
    assert "usage: precision-lab" in capsys.readouterr().err


@pytest.mark.parametrize("last", ["0", "-3"])
def test_compare_last_must_be_positive(capsys, last):
    assert main(["compare", "somewhere", "--last", last]) == 2
    _one_line_error(capsys, "--last", "positive")


def test_compare_is_in_the_readme_command_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "| `precision-lab compare" in readme


def test_formats_lists_aliases_and_specials(capsys):
    assert main(["formats"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "specials" in lines[0] and "aliases" in lines[0]
    row = {line.split()[0]: line for line in lines[2:] if line.split()}
    assert "e4m3," in row["fp8_e4m3fn"] and "448" in row["fp8_e4m3fn"] and "NaN only" in row["fp8_e4m3fn"]
    assert "e4m3," not in row["fp8_e4m3"] and "240" in row["fp8_e4m3"] and "inf, NaN" in row["fp8_e4m3"]


@pytest.mark.parametrize("typo", ["exmy", "eXmY", "custom", "e5m7 (custom"])
def test_close_match_is_always_a_valid_name(capsys, typo):
    from precision_lab.formats import get_format

    assert main(["roundoff-table", "--format", typo]) == 2
    err = _one_line_error(capsys)
    if "closest match: '" in err:
        get_format(err.split("closest match: '")[1].split("'")[0])  # what it offers must work


def test_flop_units_agree_with_the_readme(capsys):
    assert main(["model-info", "switch-base"]) == 0
    flops = next(line for line in capsys.readouterr().out.splitlines() if "FLOPs/seq" in line)
    assert "119G" in flops
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "| `switch-base` | 5.01B | 211M | 119G |" in readme


def test_load_results_on_a_folder_that_is_not_a_store(tmp_path):
    from precision_lab.store import load_results

    (tmp_path / "notes.txt").write_text("not a store")
    with pytest.raises(UserError, match="not a results store"):
        load_results(tmp_path)
