"""Number formats: what a binary floating-point format is, and a registry of the ones the lab knows.

A `Format` is a description only (bit widths, bias, which special values exist). Rounding into a format
lives in `precision_lab.rounding` (public as `precision_lab.quantize`). Every format here is a subset of
float32 (at most 8 exponent bits and 23 mantissa bits), so a value of any format is stored exactly in a
float32: the lab simulates narrow formats with float32 storage.

Special-value conventions (they decide `max` and what overflow gives):
  "ieee"  all-ones exponent means inf/NaN (fp32, tf32, bf16, fp16, fp8_e5m2, fp8_e4m3, custom eXmY).
  "fn"    finite only; the single pattern S.1111.111 is NaN (fp8_e4m3fn): max mantissa is all-ones minus one.
  "fnuz"  finite, no negative zero; the pattern 1.0000.000 is the only NaN (fp8_e4m3fnuz, fp8_e5m2fnuz).
  "none"  finite, no NaN, no inf (fp6_e2m3fn, fp6_e3m2fn, fp4_e2m1fn, per the OCP MX spec).
  "e8m0"  the MX scale format: unsigned powers of two 2^-127..2^127, 0xFF is NaN, no zero.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

import ml_dtypes
import numpy as np

from precision_lab.errors import UserError, unknown_choice

Specials = Literal["ieee", "fn", "fnuz", "none", "e8m0"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Format:
    """A binary floating-point format that float32 can hold exactly.

    Attributes:
      name: canonical name (e.g. "bf16", "fp8_e4m3fn", "e5m7").
      exponent_bits, mantissa_bits: field widths (mantissa excludes the implicit bit).
      bias: exponent bias; the smallest normal is 2^(1 - bias).
      specials: which special values exist (see module docstring).
      dtype_name: the ml_dtypes / numpy dtype with exactly this format, or None.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    specials: Specials
    dtype_name: str | None = None
    description: str = ""

    # -- derived figures -------------------------------------------------------------------------------
    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.specials in ("ieee", "fn", "fnuz", "e8m0")

    @property
    def has_negative_zero(self) -> bool:
        return self.specials in ("ieee", "fn", "none")

    @property
    def is_signed(self) -> bool:
        return self.specials != "e8m0"

    @property
    def has_subnormals(self) -> bool:
        return self.specials != "e8m0" and self.mantissa_bits > 0

    @property
    def bits(self) -> int:
        return int(self.is_signed) + self.exponent_bits + self.mantissa_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias if self.specials != "e8m0" else -self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite number."""
        top = 2**self.exponent_bits - 1 - self.bias  # exponent of the all-ones field
        # IEEE formats spend the all-ones exponent on inf/NaN, e8m0 spends it (0xFF) on NaN.
        return top - 1 if self.specials in ("ieee", "e8m0") else top

    @property
    def max(self) -> float:
        m = self.mantissa_bits
        if self.specials == "fn":  # the all-ones mantissa in the top binade is NaN
            frac = 2.0 - 2.0 ** (1 - m)
        else:
            frac = 2.0 - 2.0 ** (-m)
        return math.ldexp(frac, self.emax)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        if not self.has_subnormals:
            return self.min_normal
        return math.ldexp(1.0, self.emin - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """Distance from 1.0 to the next larger number."""
        return math.ldexp(1.0, -self.mantissa_bits)

    @property
    def dtype(self) -> np.dtype | None:
        """The real numpy/ml_dtypes dtype of this format, if one exists (used by native mode and tests)."""
        if self.dtype_name is None:
            return None
        if self.dtype_name in ("float32", "float16"):
            return np.dtype(self.dtype_name)
        return np.dtype(getattr(ml_dtypes, self.dtype_name))

    def ulp(self, x):
        """Unit in the last place at |x|: the spacing of the format's numbers in x's binade.

        Works on Python floats and numpy arrays (computed in float64, exact for every format here).
        For |x| below the smallest normal the spacing is the subnormal spacing; for 0 it is min_subnormal.
        """
        x = np.abs(np.asarray(x, dtype=np.float64))
        _, exp = np.frexp(x)  # x = frac * 2^exp with frac in [0.5, 1): floor(log2 x) = exp - 1, exactly
        e = np.where(x > 0, exp - 1, self.emin)
        e = np.maximum(e, self.emin)
        out = np.ldexp(1.0, (e - self.mantissa_bits).astype(np.int64))
        return float(out) if out.ndim == 0 else out

    def __str__(self) -> str:
        return self.name


def _ieee(name: str, e: int, m: int, dtype_name: str | None = None, description: str = "") -> Format:
    return Format(
        name=name,
        exponent_bits=e,
        mantissa_bits=m,
        bias=2 ** (e - 1) - 1,
        specials="ieee",
        dtype_name=dtype_name,
        description=description,
    )


_BUILTIN: tuple[Format, ...] = (
    _ieee("fp32", 8, 23, "float32", "IEEE binary32"),
    _ieee("tf32", 8, 10, None, "NVIDIA TensorFloat-32 (matmul input format on Ampere+)"),
    _ieee("bf16", 8, 7, "bfloat16", "bfloat16 (TPU/GPU training format)"),
    _ieee("fp16", 5, 10, "float16", "IEEE binary16"),
    Format(name="fp8_e4m3fn", exponent_bits=4, mantissa_bits=3, bias=7, specials="fn",
           dtype_name="float8_e4m3fn", description="OCP FP8 E4M3 (forward operands)"),
    _ieee("fp8_e5m2", 5, 2, "float8_e5m2", "OCP FP8 E5M2 (gradients)"),
    Format(name="fp8_e4m3fnuz", exponent_bits=4, mantissa_bits=3, bias=8, specials="fnuz",
           dtype_name="float8_e4m3fnuz", description="AMD/Graphcore FP8 E4M3 (no -0, NaN=0x80)"),
    Format(name="fp8_e5m2fnuz", exponent_bits=5, mantissa_bits=2, bias=16, specials="fnuz",
           dtype_name="float8_e5m2fnuz", description="AMD/Graphcore FP8 E5M2 (no -0, NaN=0x80)"),
    _ieee("fp8_e4m3", 4, 3, "float8_e4m3", "IEEE-style E4M3 with inf (max 240)"),
    Format(name="fp6_e2m3fn", exponent_bits=2, mantissa_bits=3, bias=1, specials="none",
           dtype_name="float6_e2m3fn", description="OCP MX FP6 E2M3"),
    Format(name="fp6_e3m2fn", exponent_bits=3, mantissa_bits=2, bias=3, specials="none",
           dtype_name="float6_e3m2fn", description="OCP MX FP6 E3M2"),
    Format(name="fp4_e2m1fn", exponent_bits=2, mantissa_bits=1, bias=1, specials="none",
           dtype_name="float4_e2m1fn", description="OCP MX FP4 E2M1"),
    Format(name="e8m0", exponent_bits=8, mantissa_bits=0, bias=127, specials="e8m0",
           dtype_name="float8_e8m0fnu", description="OCP MX block scale (powers of two)"),
)

FORMATS: dict[str, Format] = {f.name: f for f in _BUILTIN}

ALIASES: dict[str, str] = {
    "float32": "fp32", "f32": "fp32", "single": "fp32",
    "tensorfloat32": "tf32",
    "bfloat16": "bf16",
    "float16": "fp16", "f16": "fp16", "half": "fp16",
    "fp8": "fp8_e4m3fn", "e4m3": "fp8_e4m3fn", "e4m3fn": "fp8_e4m3fn", "float8_e4m3fn": "fp8_e4m3fn",
    "e5m2": "fp8_e5m2", "float8_e5m2": "fp8_e5m2", "bf8": "fp8_e5m2",
    "e4m3fnuz": "fp8_e4m3fnuz", "float8_e4m3fnuz": "fp8_e4m3fnuz",
    "e5m2fnuz": "fp8_e5m2fnuz", "float8_e5m2fnuz": "fp8_e5m2fnuz",
    "float8_e4m3": "fp8_e4m3", "e4m3_ieee": "fp8_e4m3",
    "fp6": "fp6_e2m3fn", "e2m3": "fp6_e2m3fn", "float6_e2m3fn": "fp6_e2m3fn",
    "e3m2": "fp6_e3m2fn", "float6_e3m2fn": "fp6_e3m2fn",
    "fp4": "fp4_e2m1fn", "e2m1": "fp4_e2m1fn", "float4_e2m1fn": "fp4_e2m1fn",
    "float8_e8m0fnu": "e8m0", "e8m0fnu": "e8m0", "scale": "e8m0",
}

_CUSTOM = re.compile(r"^e(\d+)m(\d+)$")
_CUSTOM_IEEE = re.compile(r"^e(\d+)m(\d+)_ieee$")


def format_names() -> list[str]:
    """Every canonical format name (custom eXmY formats are accepted too, but not listed)."""
    return list(FORMATS)


def get_format(name: str | Format) -> Format:
    """Look up a format by name, alias or `eXmY` (IEEE-style custom format with inf and NaN).

    Raises UserError with the valid names and the closest match when `name` is unknown.
    """
    if isinstance(name, Format):
        return name
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key in FORMATS:
        return FORMATS[key]
    match = _CUSTOM_IEEE.match(key)
    if match:
        # "eXmY_ieee": the IEEE-style eXmY even where the plain name means another format (e8m0 is the MX
        # scale, e2m3 the OCP fp6): the sensitivity map sweeps one family of formats. Canonical name: the
        # plain "eXmY" where that already is the IEEE-style format, else "eXmY_ieee".
        plain = f"e{match.group(1)}m{match.group(2)}"
        if ALIASES.get(plain, plain) not in FORMATS:
            return get_format(plain)
        e, m = int(match.group(1)), int(match.group(2))
        _check_custom(name, e, m)
        return _ieee(key, e, m, description="custom IEEE-style format with inf/NaN")
    match = _CUSTOM.match(key)
    if match:
        e, m = int(match.group(1)), int(match.group(2))
        _check_custom(name, e, m)
        fmt = _ieee(key, e, m, description="custom IEEE-style format with inf/NaN")
        return fmt
    raise unknown_choice("format", name, FORMATS, aliases=ALIASES,
                         patterns=["eXmY (custom, e.g. e5m7)", "eXmY_ieee (IEEE-style even where eXmY names another format)"])


def _check_custom(name, e: int, m: int) -> None:
    if not (2 <= e <= 8 and 0 <= m <= 23):
        raise UserError(
            f"custom format {name!r} must have 2..8 exponent bits and 0..23 mantissa bits "
            "(the lab stores every format in float32)"
        )


def register_format(fmt: Format) -> Format:
    """Add a user-defined format to the registry (for formats that are not IEEE-style eXmY)."""
    if not (1 <= fmt.exponent_bits <= 8 and 0 <= fmt.mantissa_bits <= 23):
        raise UserError(f"format {fmt.name!r}: float32 must hold it (exponent bits <= 8, mantissa <= 23)")
    FORMATS[fmt.name] = fmt
    return fmt


def format_table() -> list[dict]:
    """One row per built-in format with the figures the CLI prints."""
    rows = []
    for f in FORMATS.values():
        rows.append(
            dict(
                name=f.name, bits=f.bits, exponent_bits=f.exponent_bits, mantissa_bits=f.mantissa_bits,
                bias=f.bias, max=f.max, min_normal=f.min_normal, min_subnormal=f.min_subnormal, eps=f.eps,
                has_inf=f.has_inf, has_nan=f.has_nan, specials=f.specials, description=f.description,
                aliases=sorted(a for a, target in ALIASES.items() if target == f.name),
            )
        )
    return rows


def roundoff_per_binade(fmt: Format, lo: int = -2, hi: int = 31) -> list[dict]:
    """Maximum roundoff in each binade [2^k, 2^(k+1)) as ST-MoE prints it (one ulp) and the
    round-to-nearest bound (half an ulp). Binades past the format's max are omitted."""
    rows = []
    for k in range(lo, hi):
        if math.ldexp(1.0, k) > fmt.max:
            break
        if math.ldexp(1.0, k + 1) <= fmt.min_subnormal:
            continue
        ulp = math.ldexp(1.0, max(k, fmt.emin) - fmt.mantissa_bits)
        rows.append(dict(format=fmt.name, binade_lo=math.ldexp(1.0, k), binade_hi=math.ldexp(1.0, k + 1),
                         one_ulp=ulp, half_ulp=ulp / 2))
    return rows


def check_name(name: str) -> str:
    """Canonical name of a format; raises UserError if unknown."""
    return get_format(name).name


__all__ = [
    "Format", "FORMATS", "ALIASES", "get_format", "register_format", "format_names", "format_table",
    "roundoff_per_binade", "check_name", "UserError",
]
