"""Roundoff analyses: measured binade maxima, exp against its analytic bound, router softmax error and routing
flips, ST-MoE's footnote, and the experiment TOMLs. Every assertion is a measured fact with its reason; the
parameters are smaller than the defaults so that the file runs in well under a minute on 2 cores."""

import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from precision_lab import roundoff as R
from precision_lab.errors import UserError

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
TOMLS = sorted(EXPERIMENTS.glob("roundoff_*.toml"))


# -- binades ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2", "fp4_e2m1fn"])
def test_measured_binade_maximum_is_half_an_ulp_for_nearest(fmt):
    """Round-to-nearest never errs by more than half an ulp and the midpoints attain it; truncation errs by up
    to one ulp, attained up to one float32 ulp (the largest float32 below the binade's end)."""
    rows = R.binade_table([fmt], lo=-2, hi=12, samples=1024)
    assert len(rows) >= 3
    for r in rows:
        assert r["measured_nearest"] == r["half_ulp"], r
        assert r["one_ulp"] * (1 - 2.0**-12) <= r["measured_toward_zero"] < r["one_ulp"], r


def _printed_digits(value: float) -> int:
    mantissa = f"{value:.15g}".split("e")[0].replace(".", "").lstrip("0").rstrip("0")
    return max(len(mantissa), 1)


def test_st_moe_printed_values_are_the_one_ulp_column():
    """ST-MoE prints one ulp per binade (not the round-to-nearest bound): each printed value is the one-ulp
    column rounded to the digits printed, and the half-ulp column is half of it."""
    rows = R.binade_table(["bf16", "fp32"], lo=1, hi=31, samples=256)
    paper = [r for r in rows if r["paper"] is not None]
    assert {(r["format"], r["k"]) for r in paper} == set(R.PAPER_BINADE)
    for r in paper:
        digits = _printed_digits(r["paper"])
        assert float(f"{r['one_ulp']:.{digits}g}") == r["paper"], r
        assert float(f"{r['half_ulp']:.{digits}g}") != r["paper"], r
        assert r["measured_nearest"] == r["half_ulp"]  # fp32: measured on float64 samples with numpy's cast


# -- exp -------------------------------------------------------------------------------------------------------


def test_exp_error_stays_under_the_analytic_bound():
    """Input rounding moves x by <= |x| u, exp turns that into a relative error <= exp(|x| u) - 1, and the
    output rounding adds u: every measured point is under (1+u) exp(|x| u) - 1. XLA's float32 exp is not
    correctly rounded, but on this grid even fp32 stays under the bound without an allowance for that."""
    rows = R.exp_error(R.EXP_FORMATS, num_points=8001)
    assert {r["format"] for r in rows} == set(R.EXP_FORMATS)
    for r in rows:
        assert r["max_ratio"] <= 1.0, r
        assert r["max_rel_err"] <= r["bound"], r
    # The bound is tight for bf16: the worst point in the large-|x| bins comes within 2x of it.
    big = [r for r in rows if r["format"] == "bf16" and r["bin_lo"] >= 8]
    assert big and max(r["max_ratio"] for r in big) > 0.5
    # bf16 error grows like |x| 2^-9: at |x| ~ 50 it is several times the error at |x| ~ 10.
    at = {p: next(r for r in rows if r["format"] == "bf16" and r["bin_lo"] <= p < r["bin_hi"]) for p in (10, 50)}
    assert at[50]["max_rel_err"] > 3 * at[10]["max_rel_err"]


def test_exp_error_only_counts_the_formats_normal_range():
    """fp8_e4m3fn's max is 448, so exp(x) is in range only for x < ln 448 = 6.1."""
    rows = R.exp_error(["fp8_e4m3fn"], num_points=2001)
    assert max(r["bin_lo"] for r in rows) < math.log(448)


# -- router softmax ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_softmax_rows():
    return R.softmax_error(["bf16"], scales=(0.5, 2, 5, 20, 50), num_experts_list=(64,), modes=("emulate", "native"),
                           shifts=(True, False), mean_shifts=(0.0,), tokens=256)


def _series(rows, metric, **match):
    sel = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return [r[metric] for r in sorted(sel, key=lambda r: r["scale"])]


def test_bf16_softmax_error_grows_with_logit_scale(bf16_softmax_rows):
    """Rounding the logits on entry errs by ~|logit| 2^-9, which grows with the scale, and the max-shift
    does not remove it (the logits are rounded before the max is subtracted): the all-expert error (median
    over tokens) grows from scale 0.5 to 20 with and without the shift."""
    for shift in (True, False):
        errs = _series(bf16_softmax_rows, "all_median", mode="emulate", shift=shift)[:4]
        assert all(a < b for a, b in zip(errs, errs[1:])), (shift, errs)


def test_bf16_softmax_top1_error_falls_once_the_softmax_saturates(bf16_softmax_rows):
    """At large scale the top-1 probability tends to 1 and its relative error is bounded by 1 - p."""
    top1 = _series(bf16_softmax_rows, "top1_median", mode="emulate", shift=True)
    assert top1[-1] < 1e-3 * top1[1]


def test_unshifted_softmax_overflows_at_large_scale(bf16_softmax_rows):
    """Without the max-shift exp(logit) overflows bf16 (and float32) beyond ~88.7: at scale 50 most tokens get
    non-finite probabilities; with the shift none do."""
    by = {(r["shift"], r["scale"]): r for r in bf16_softmax_rows if r["mode"] == "emulate"}
    assert by[(False, 50.0)]["nonfinite_frac"] > 0.5
    assert by[(True, 50.0)]["nonfinite_frac"] == 0.0
    assert by[(False, 5.0)]["nonfinite_frac"] == 0.0


def test_native_bf16_is_never_less_precise_than_emulation(bf16_softmax_rows):
    """Native mode can only skip roundings (XLA's excess precision), so its error is at most emulation's."""
    for shift in (True, False):
        emu = _series(bf16_softmax_rows, "all_median", mode="emulate", shift=shift)
        nat = _series(bf16_softmax_rows, "all_median", mode="native", shift=shift)
        assert all(n <= 1.05 * e for n, e in zip(nat, emu) if math.isfinite(e)), (shift, emu, nat)
    assert all(r["native_dtype"] for r in bf16_softmax_rows if r["mode"] == "native")


def test_native_mode_without_a_jax_dtype_falls_back_to_emulation():
    rows = R.softmax_error(["tf32"], scales=(4,), num_experts_list=(8,), shifts=(True,), mean_shifts=(0.0,),
                           tokens=64)
    emu, nat = (next(r for r in rows if r["mode"] == m) for m in ("emulate", "native"))
    assert not nat["native_dtype"]
    assert nat["all_median"] == emu["all_median"] and nat["top1_max"] == emu["top1_max"]


# -- routing flips ------------------------------------------------------------------------------------------------


def test_lax_top_k_breaks_ties_by_lowest_index():
    """The flip-rate definition relies on this documented behaviour of jax.lax.top_k."""
    _, idx = jax.lax.top_k(jnp.asarray([1.0, 3.0, 3.0, 0.0, 3.0], jnp.float32), 2)
    assert np.asarray(idx).tolist() == [1, 2]


def test_flip_rate_zero_for_fp32_and_positive_for_fp8():
    """float32 keeps ~7 digits, far finer than the gaps between the top router probabilities at scale >= 0.1
    for 1024 tokens: no flips. fp8_e4m3fn keeps 3 mantissa bits: many probabilities tie or swap at scale 30."""
    rows = R.flip_rate(["fp32", "fp8_e4m3fn"], scales=(0.1, 1, 30), tokens=1024)
    for r in rows:
        if r["format"] == "fp32":
            assert r["flip_rate"] == 0.0 and r["tie_frac"] == 0.0, r
    fp8 = {(r["k"], r["scale"]): r for r in rows if r["format"] == "fp8_e4m3fn"}
    assert fp8[(1, 30.0)]["flip_rate"] > 0.01 and fp8[(2, 30.0)]["flip_rate"] > 0.01
    assert all(0.0 <= r["flip_rate"] <= 1.0 and r["nonfinite_frac"] == 0.0 for r in rows)


def test_bf16_flips_come_from_ties_at_small_scale():
    """At tiny logit scales every probability is ~1/E and bf16 rounds neighbours to the same value: ties,
    broken by index, are most of the flips; the rate falls as the scale grows."""
    rows = R.flip_rate(["bf16"], scales=(0.01, 1), ks=(1,), tokens=1024)
    small, large = sorted(rows, key=lambda r: r["scale"])
    assert small["flip_rate"] > 5 * large["flip_rate"]
    assert small["tie_frac"] >= small["flip_rate"] * 0.5


# -- the footnote -------------------------------------------------------------------------------------------------


def test_footnote_matches_the_paper():
    rows = R.footnote_example(["fp32", "bf16"], modes=("emulate",))
    by = {(r["format"], r["shift"]): r for r in rows}
    assert abs(rows[0]["exact"] - 0.142) <= 5e-4
    assert abs(by[("bf16", True)]["p"] - 0.091) <= 5e-4
    assert by[("bf16", True)]["logit_rounded"] == 128.0  # 128.5 is a tie between 128 and 129: to even
    assert abs(by[("fp32", True)]["p"] - rows[0]["exact"]) < 1e-6
    # Without the max-shift exp(128) overflows even float32 (max ~3.4e38 = e^88.7).
    assert math.isnan(by[("fp32", False)]["p"]) and math.isnan(by[("bf16", False)]["p"])
    text = R.footnote_text(rows)
    assert "0.142" in text and "0.091" in text and "0.1415" in text and "0.0908" in text


# -- experiments ------------------------------------------------------------------------------------------------------

SMALL = {
    "binade_table": dict(formats=("bf16",), lo=0, hi=4, samples=256),
    "exp_error": dict(formats=("bf16",), num_points=2001),
    "softmax_error": dict(formats=("bf16",), scales=(1.0, 10.0), num_experts_list=(8,), modes=("emulate",),
                          mean_shifts=(0.0,), tokens=64),
    "flip_rate": dict(formats=("bf16",), scales=(1.0,), tokens=256),
    "footnote_example": dict(formats=("bf16",), modes=("emulate",)),
    "accumulator_error": dict(input_formats=("bf16",), significant_bits=(14,), ks=(64, 256), roundings=("toward_zero",),
                              distributions=("uniform",), dots=16),
    "allreduce_error": dict(replicas=(2, 8), size=256),
}


def test_every_analysis_has_an_experiment():
    names = {R.load_roundoff_experiment(p)[0] for p in TOMLS}
    assert names == set(R.ANALYSES)


@pytest.mark.parametrize("path", TOMLS, ids=[p.stem for p in TOMLS])
def test_experiment_toml_loads_documents_itself_and_runs(path, tmp_path):
    text = path.read_text()
    assert text.startswith("# command:")
    assert f"precision-lab roundoff experiments/{path.name} --out" in text
    assert re.search(r"# runtime: .*\d+(\.\d+)? s", text) and "# reproduces:" in text
    name, kwargs = R.load_roundoff_experiment(path)
    assert set(kwargs) <= set(R.ANALYSES[name].fields)
    small = {**kwargs, **SMALL[name]}
    rows, paths = R.run_analysis(name, small, tmp_path)
    assert rows
    assert any(p.suffix == ".png" for p in paths) and any(p.suffix == ".svg" for p in paths)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_run_roundoff_experiment_from_a_file(tmp_path):
    toml = tmp_path / "small.toml"
    toml.write_text('kind = "roundoff"\nanalysis = "binade_table"\nformats = ["fp8_e4m3fn"]\nhi = 3\n')
    paths = R.run_roundoff_experiment(toml, tmp_path / "out")
    assert {p.name for p in paths} == {"binade_table.json", "roundoff_table.png", "roundoff_table.svg"}


BAD = {
    "malformed": ('kind = "roundoff"\nanalysis = \n', ["malformed TOML"]),
    "kind": ('kind = "sweep"\nanalysis = "exp_error"\n', ["'kind'", "roundoff"]),
    "analysis": ('kind = "roundoff"\nanalysis = "exp_eror"\n', ["'analysis'", "exp_error", "flip_rate"]),
    "field": ('kind = "roundoff"\nanalysis = "exp_error"\nscales = [1.0]\n', ["'scales'", "x_max", "num_points"]),
    "format": ('kind = "roundoff"\nanalysis = "flip_rate"\nformats = ["bf17"]\n', ["'formats'", "bf16", "fp32"]),
    "mode": ('kind = "roundoff"\nanalysis = "softmax_error"\nmodes = ["fast"]\n', ["'modes'", "emulate", "native"]),
    "value": ('kind = "roundoff"\nanalysis = "softmax_error"\nscales = [1.0, -2.0]\n', ["'scales'", "positive"]),
    "type": ('kind = "roundoff"\nanalysis = "flip_rate"\ntokens = "many"\n', ["'tokens'", "integer"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_experiment_toml_is_a_one_line_user_error(case, tmp_path):
    text, needles = BAD[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        R.load_roundoff_experiment(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_missing_experiment_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        R.run_roundoff_experiment(tmp_path / "nope.toml", tmp_path)


# -- the report -------------------------------------------------------------------------------------------------------


def test_report_writes_figures_and_markdown_with_the_papers_numbers(tmp_path):
    small = {**SMALL, "binade_table": dict(formats=("bf16", "fp32"), lo=1, hi=31, samples=64),
             "footnote_example": dict(formats=("fp32", "bf16"), modes=("emulate",))}
    paths = R.roundoff_report(tmp_path, overrides=small)
    md = paths[-1]
    assert md.name == "roundoff.md"
    text = md.read_text()
    for needle in ("0.0156", "8388608", "2.4e-07", "0.00012", "0.142", "0.091", "0.1415", "0.0908"):
        assert needle in text, needle
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / image).exists(), image
    assert {p.suffix for p in paths} >= {".png", ".svg", ".json", ".md"}
