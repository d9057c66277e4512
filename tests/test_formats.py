"""Format figures against ml_dtypes.finfo and hand-worked values; names, aliases, errors."""

import math

import ml_dtypes
import numpy as np
import pytest

from precision_lab.errors import UserError
from precision_lab.formats import FORMATS, get_format, roundoff_per_binade

WITH_DTYPE = [f for f in FORMATS.values() if f.dtype is not None]


@pytest.mark.parametrize("fmt", WITH_DTYPE, ids=lambda f: f.name)
def test_figures_agree_with_finfo(fmt):
    fi = np.finfo(fmt.dtype) if fmt.dtype_name in ("float32", "float16") else ml_dtypes.finfo(fmt.dtype)
    assert fmt.max == float(fi.max)
    assert fmt.min_normal == float(fi.tiny)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    assert fmt.eps == float(fi.eps)
    assert fmt.bits == fi.bits
    assert fmt.mantissa_bits == fi.nmant
    # ml_dtypes' nexp counts exponent bits the same way
    assert fmt.exponent_bits == fi.nexp


def test_paper_section_11_table():
    e4m3 = get_format("fp8_e4m3fn")
    assert (e4m3.exponent_bits, e4m3.mantissa_bits, e4m3.bias, e4m3.max) == (4, 3, 7, 448)
    assert (e4m3.min_normal, e4m3.min_subnormal, e4m3.has_inf, e4m3.has_nan) == (2**-6, 2**-9, False, True)
    e5m2 = get_format("fp8_e5m2")
    assert (e5m2.bias, e5m2.max, e5m2.min_normal, e5m2.min_subnormal, e5m2.has_inf) == (15, 57344, 2**-14, 2**-16, True)
    assert [get_format(n).max for n in ("fp6_e2m3fn", "fp6_e3m2fn", "fp4_e2m1fn")] == [7.5, 28, 6]
    assert get_format("e8m0").max == 2.0**127
    assert get_format("fp8_e4m3").max == 240 and get_format("fp8_e4m3").has_inf


def test_tf32_and_custom():
    tf32 = get_format("tf32")
    assert (tf32.exponent_bits, tf32.mantissa_bits, tf32.eps, tf32.min_normal) == (8, 10, 2**-10, 2**-126)
    assert tf32.max == (2 - 2**-10) * 2**127
    e3m4 = get_format("e3m4")  # IEEE-style custom: ml_dtypes' float8_e3m4 is the same format
    fi = ml_dtypes.finfo(ml_dtypes.float8_e3m4)
    assert (e3m4.max, e3m4.min_normal, e3m4.min_subnormal) == (float(fi.max), float(fi.tiny), float(fi.smallest_subnormal))
    assert e3m4.has_inf and e3m4.has_nan


@pytest.mark.parametrize("alias,name", [("bfloat16", "bf16"), ("e4m3", "fp8_e4m3fn"), ("e5m2", "fp8_e5m2"),
                                        ("fp8", "fp8_e4m3fn"), ("float32", "fp32"), ("half", "fp16"),
                                        ("fp4", "fp4_e2m1fn"), ("BF16", "bf16")])
def test_aliases(alias, name):
    assert get_format(alias).name == name


def test_unknown_name_is_one_line_with_closest_match():
    with pytest.raises(UserError) as err:
        get_format("bf61")
    msg = str(err.value)
    assert "\n" not in msg and "bf16" in msg and "closest match" in msg and "fp8_e4m3fn" in msg
    with pytest.raises(UserError):
        get_format("e9m2")


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=lambda f: f.name)
def test_ulp(fmt):
    assert fmt.ulp(1.0) == fmt.eps
    assert fmt.ulp(1.5) == fmt.eps
    assert fmt.ulp(fmt.max) == math.ldexp(1.0, fmt.emax - fmt.mantissa_bits)
    assert fmt.ulp(0.0) == math.ldexp(1.0, fmt.emin - fmt.mantissa_bits)
    assert fmt.ulp(-2.0) == 2 * fmt.eps or fmt.max < 2.0
    np.testing.assert_array_equal(fmt.ulp(np.array([1.0, 2.0, 4.0])), fmt.eps * np.array([1.0, 2.0, 4.0]))


def test_roundoff_table_matches_the_paper():
    """ST-MoE's printed table is one ulp per binade: bf16 [2,4) 0.0156, [1024,2048) 8, fp32 [2,4) 2.4e-7."""
    rows = {(r["format"], r["binade_lo"]): r for r in roundoff_per_binade(get_format("bf16"))}
    rows.update({(r["format"], r["binade_lo"]): r for r in roundoff_per_binade(get_format("fp32"))})
    assert rows[("bf16", 2.0)]["one_ulp"] == 0.015625
    assert rows[("bf16", 32.0)]["one_ulp"] == 0.25
    assert rows[("bf16", 1024.0)]["one_ulp"] == 8.0
    assert rows[("bf16", 2.0**20)]["one_ulp"] == 8192
    assert rows[("bf16", 2.0**30)]["one_ulp"] == 8388608
    assert rows[("bf16", 2.0)]["half_ulp"] == 0.0078125
    assert rows[("fp32", 2.0)]["one_ulp"] == pytest.approx(2.4e-7, rel=0.01)
    assert rows[("fp32", 1024.0)]["one_ulp"] == pytest.approx(1.2e-4, rel=0.02)


def test_public_api_at_the_top_level():
    import precision_lab

    assert precision_lab.get_format("bf16").name == "bf16"
    assert float(precision_lab.quantize(np.float32(1.1), "bf16")) == 1.1015625
    import precision_lab.router

    assert callable(precision_lab.router.z_loss) and callable(precision_lab.router.load_balancing_loss)
