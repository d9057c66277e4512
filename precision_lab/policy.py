"""Per-component precision policy: which format every part of an MoE model computes, stores and
communicates in.

A `PrecisionPolicy` maps every name in `COMPONENTS` to a `Spec` (format, scaling, rounding, overflow) and
has a `mode`: "emulate" (float32 storage, bit-exact rounding after every elementary op) or "native" (real
low-precision jax dtypes where they exist: fast, but XLA may keep excess precision).

Compact string form, parsed left to right, later entries override earlier ones:

    st-moe,experts=fp8_e4m3fn:delayed:saturate,grads=fp8_e5m2:delayed,mode=emulate

  * a bare word is a preset name (`PRESETS`), applied first;
  * `default=SPEC` sets every component; a group name (`GROUPS`: router, attention, experts, ...) sets its
    members; a component name sets one component;
  * SPEC is `FORMAT[:token...]`, each token a scaling (`SCALINGS`), rounding (`ROUNDINGS`) or overflow
    (`OVERFLOWS`) name, in any order, or `acc=ACCUMULATOR` (matmul operand components only, see
    `Accumulator`): e.g. `experts=fp8_e4m3fn:delayed:saturate:acc=e8m13/128`.

`str(policy)` prints the canonical form (the most common spec as `default`, then every component that
differs, in `COMPONENTS` order) and `parse_policy(str(p)) == p` always. TOML: a table of the same keys
(`policy_to_toml_table` / `policy_from_toml_table`), e.g. `[policy] default = "bf16"  router = "fp32"`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType

from precision_lab.errors import UserError, unknown_choice
from precision_lab.formats import get_format
from precision_lab.rounding import OVERFLOWS, ROUNDINGS

COMPONENTS: dict[str, str] = {
    "params": "parameter storage (the copy the forward pass reads)",
    "master": "master weights: the parameter update is applied and stored in this format",
    "activations": "residual stream between blocks",
    "embeddings": "embedding lookup output",
    "norms": "RMSNorm arithmetic (mean square, rsqrt, scale)",
    "attn_operands": "attention matmul operands (Q/K/V/out projections, QK^T, PV)",
    "attn_logits": "attention logits (QK^T output plus position bias)",
    "attn_softmax": "attention softmax and its exponentials",
    "ffn_operands": "dense FFN matmul operands",
    "expert_operands": "expert FFN matmul operands",
    "head_operands": "output projection matmul operands",
    "matmul_out": "matmul outputs, after float32 accumulation",
    "router_input": "router input (the token representation the router sees)",
    "router_weights": "router weight matrix as the router matmul reads it",
    "router_logits": "router logits",
    "router_softmax": "router softmax and its exponentials (router probabilities)",
    "router_grads": "router backward: its incoming gradient (cotangent of the gates and logits) and its input gradient",
    "combine_weights": "gates that weight expert outputs when combining",
    "comm": "expert dispatch/combine communication (all-to-all)",
    "output_logits": "output logits, their softmax/logsumexp and the loss",
    "grads": "gradients: the cotangent operand of every backward matmul",
    "grad_allreduce": "gradient all-reduce across data-parallel replicas",
    "optimizer_state": "optimizer state storage (moments, factored statistics)",
}

GROUPS: dict[str, tuple[str, ...]] = {
    "router": ("router_input", "router_weights", "router_logits", "router_softmax", "router_grads"),
    "attention": ("attn_operands", "attn_logits", "attn_softmax"),
    "experts": ("expert_operands",),
    "ffn": ("ffn_operands",),
    "operands": ("attn_operands", "ffn_operands", "expert_operands", "head_operands"),
    "exponentials": ("attn_softmax", "router_softmax", "output_logits"),
    "weights": ("params", "master"),
    "gradients": ("grads", "grad_allreduce"),
}

# The components whose spec may carry an accumulator: the operands of the model's real matmuls (a dot uses
# its lhs operand's accumulator, else its rhs operand's). The one-hot dispatch/combine products
# (activations, comm, combine_weights) are data movement, not GEMMs, and never accumulate narrowly.
ACCUMULATOR_COMPONENTS: tuple[str, ...] = ("attn_operands", "ffn_operands", "expert_operands", "head_operands",
                                           "router_input", "router_weights")

SCALINGS: tuple[str, ...] = ("none", "current", "delayed", "mx", "tile1x128", "tile128x128")
# Delayed scaling reads an amax history, and only matmul sites keep one (ops.init_dot_state): the components
# that are nothing but matmul operands or the backward matmuls' incoming gradient. Anywhere else (an
# elementwise cast, a matmul output) there is no history, and silently using the current amax instead would
# make "delayed" mean "current": such a policy is refused.
DELAYED_SCALING_COMPONENTS: tuple[str, ...] = (
    "attn_operands", "ffn_operands", "expert_operands", "head_operands", "router_weights", "grads")
MODES: tuple[str, ...] = ("emulate", "native")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Accumulator:
    """A matmul's accumulator: the running sum over the contraction dimension K is rounded to `format`
    after every `block` products are added, and (promote_every set) moved into a float32 accumulator every
    `promote_every` elements of K (DeepSeek-V3 section 3.3: N_C = 128). The summation order this models is
    documented in `precision_lab.ops.matmul_accumulated`.

    Written `FORMAT[/PROMOTE_EVERY][/kBLOCK][/ROUNDING]` (e.g. `e8m13/128`, `e8m13/128/k16/nearest_even`);
    `str()` prints that canonical form and parses back to the same accumulator.
    """

    format: str = "e8m13"
    promote_every: int | None = None
    block: int = 32
    rounding: str = "toward_zero"

    def __post_init__(self):
        try:
            object.__setattr__(self, "format", get_format(self.format).name)
        except UserError as err:
            raise UserError(f"accumulator format: {err}") from None
        if self.rounding not in ROUNDINGS or self.rounding == "stochastic":
            raise unknown_choice("accumulator rounding", self.rounding, [r for r in ROUNDINGS if r != "stochastic"])
        if not _positive_int(self.block):
            raise UserError(f"accumulator block must be a positive integer (products summed per accumulator "
                            f"rounding), got {self.block!r}")
        if self.promote_every is not None:
            if not _positive_int(self.promote_every):
                raise UserError(f"accumulator promote_every must be a positive integer (elements of K between "
                                f"promotions to float32) or omitted (never promote), got {self.promote_every!r}")
            if self.promote_every % self.block:
                raise UserError(f"accumulator promote_every ({self.promote_every}) must be a multiple of the block "
                                f"({self.block}): a promotion happens between blocks")

    def __str__(self) -> str:
        parts = [self.format]
        if self.promote_every is not None:
            parts.append(str(self.promote_every))
        if self.block != ACC_BLOCK:
            parts.append(f"k{self.block}")
        if self.rounding != ACC_ROUNDING:
            parts.append(self.rounding)
        return "/".join(parts)


ACC_BLOCK = 32  # products summed (in float32) per accumulator rounding: one Hopper FP8 MMA step along K
ACC_ROUNDING = "toward_zero"  # tensor cores truncate when they align and normalise (see ops.matmul_accumulated)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def parse_accumulator(text: str, field: str = "accumulator") -> Accumulator:
    """Parse `FORMAT[/PROMOTE_EVERY][/kBLOCK][/ROUNDING]` (promote_every `none`: never promote)."""
    head, *tokens = [t.strip() for t in str(text).strip().split("/")]
    kw: dict = {}
    valid = "FORMAT[/PROMOTE_EVERY][/kBLOCK][/ROUNDING], e.g. e8m13/128"
    for tok in tokens:
        low = _ROUNDING_ALIASES.get(tok.lower(), tok.lower())
        if low.lstrip("-").isdigit() or low == "none":
            key, value = "promote_every", None if low == "none" else int(low)
        elif low[:1] == "k" and low[1:].lstrip("-").isdigit():
            key, value = "block", int(low[1:])
        elif low in ROUNDINGS:
            key, value = "rounding", low
        else:
            raise UserError(f"{field}: unknown accumulator option {tok!r} in {text!r}; expected {valid} "
                            f"(rounding one of {', '.join(r for r in ROUNDINGS if r != 'stochastic')})")
        if key in kw:
            raise UserError(f"{field}: two {key} options in accumulator {text!r}; expected {valid}")
        kw[key] = value
    try:
        return Accumulator(format=head, **kw)
    except UserError as err:
        raise UserError(f"{field}: {err}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spec:
    """How one component rounds: format, scaling into the format, rounding mode, overflow behaviour.

    overflow None is the format's own cast (see `precision_lab.rounding.quantize`) without scaling; a scaled
    spec (current, delayed, mx, tile*) saturates unless it says `nonfinite` (then a value the scale maps past
    the format's max becomes inf, or NaN in formats without inf: a delayed scale from a stale amax history).
    """

    format: str = "fp32"
    scaling: str = "none"
    rounding: str = "nearest_even"
    overflow: str | None = None
    accumulator: Accumulator | None = None  # matmul operands only: how the product's K sum accumulates
    # The format's widths enter the compiled program as run-time values (`ops.traced_format`): one program
    # serves every IEEE-style format, bit for bit what the static rounding gives (`quantize_ieee_traced`).
    traced: bool = False

    def __post_init__(self):
        object.__setattr__(self, "format", get_format(self.format).name)
        if isinstance(self.accumulator, str):
            object.__setattr__(self, "accumulator", parse_accumulator(self.accumulator))
        if self.scaling not in SCALINGS:
            raise unknown_choice("scaling", self.scaling, SCALINGS)
        if self.rounding not in ROUNDINGS:
            raise unknown_choice("rounding", self.rounding, ROUNDINGS)
        if self.overflow is not None and self.overflow not in OVERFLOWS:
            raise unknown_choice("overflow", self.overflow, OVERFLOWS)
        if self.traced and (self.fmt.specials != "ieee" or self.scaling != "none" or self.rounding != "nearest_even"
                            or self.accumulator is not None):
            raise UserError(f"spec {self}: a traced format must be an IEEE-style format (eXmY, eXmY_ieee, bf16, "
                            "fp16, fp8_e5m2, ...) rounded to nearest even, without scaling or accumulator")

    @property
    def fmt(self):
        return get_format(self.format)

    @property
    def is_identity(self) -> bool:
        """True when rounding to this spec never changes a float32 value."""
        return self.format == "fp32" and self.scaling == "none" and self.overflow != "saturate" and not self.traced

    def __str__(self) -> str:
        parts = [self.format]
        if self.scaling != "none":
            parts.append(self.scaling)
        if self.rounding != "nearest_even":
            parts.append(self.rounding)
        if self.overflow is not None:
            parts.append(self.overflow)
        if self.accumulator is not None:
            parts.append(f"acc={self.accumulator}")
        if self.traced:
            parts.append(TRACED)
        return ":".join(parts)


TRACED = "traced"  # the spec token of a traced format (`Spec.traced`)


_ROUNDING_ALIASES = {"rne": "nearest_even", "nearest": "nearest_even", "sr": "stochastic", "rtz": "toward_zero"}


def parse_spec(text: str, field: str = "spec") -> Spec:
    """Parse `FORMAT[:token...]` where each token is a scaling, rounding or overflow name."""
    head, *tokens = [t.strip() for t in str(text).strip().split(":")]
    if not head:
        raise UserError(f"{field}: empty spec; expected FORMAT[:scaling][:rounding][:overflow]")
    try:
        fmt = get_format(head).name
    except UserError as err:
        raise UserError(f"{field}: {err}") from None
    kw: dict = {}
    for tok in tokens:
        if tok.lower().startswith("acc="):
            if "accumulator" in kw:
                raise UserError(f"{field}: two accumulator options in {text!r}")
            kw["accumulator"] = parse_accumulator(tok[4:], field=f"{field} accumulator")
            continue
        tok = _ROUNDING_ALIASES.get(tok.lower(), tok.lower())
        if tok == TRACED:
            if "traced" in kw:
                raise UserError(f"{field}: two traced options in {text!r}")
            kw["traced"] = True
            continue
        if tok in SCALINGS:
            key = "scaling"
        elif tok in ROUNDINGS:
            key = "rounding"
        elif tok in OVERFLOWS:
            key = "overflow"
        else:
            err = unknown_choice(f"{field} option", tok, [*SCALINGS, *ROUNDINGS, *OVERFLOWS, TRACED, "acc=ACCUMULATOR"])
            raise UserError(str(err)) from None
        if key in kw:
            raise UserError(f"{field}: two {key} options in {text!r}")
        kw[key] = tok
    return Spec(format=fmt, **kw)


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    """A frozen mapping component -> Spec (every component present), plus the op mode."""

    specs: Mapping[str, Spec]
    mode: str = "emulate"

    def __post_init__(self):
        missing = [c for c in COMPONENTS if c not in self.specs]
        extra = [c for c in self.specs if c not in COMPONENTS]
        if missing:
            raise UserError(f"policy is missing components {missing}")
        if extra:
            raise unknown_choice("component", extra[0], COMPONENTS)
        if self.mode not in MODES:
            raise unknown_choice("mode", self.mode, MODES)
        for c in COMPONENTS:
            if self.specs[c].scaling == "delayed" and c not in DELAYED_SCALING_COMPONENTS:
                raise UserError(f"policy {c}={self.specs[c]}: delayed scaling needs a matmul site's amax history, "
                                f"which only {', '.join(DELAYED_SCALING_COMPONENTS)} have; use current, mx, "
                                f"tile1x128 or tile128x128 for {c}")
        for c, spec in self.specs.items():
            if spec.accumulator is not None and c not in ACCUMULATOR_COMPONENTS:
                raise UserError(f"policy {c}: an accumulator (acc=...) belongs to a matmul operand component; "
                                f"valid components: {', '.join(ACCUMULATOR_COMPONENTS)} (or the groups operands, "
                                f"experts, ffn)")
        traced = sorted({s.format for s in self.specs.values() if s.traced})
        if len(traced) > 1:
            raise UserError(f"policy: traced specs must share one format (the run's traced format), got "
                            f"{', '.join(traced)}")
        ordered = {c: self.specs[c] for c in COMPONENTS}
        object.__setattr__(self, "specs", MappingProxyType(ordered))

    def __getitem__(self, component: str) -> Spec:
        try:
            return self.specs[component]
        except KeyError:
            raise unknown_choice("component", component, COMPONENTS) from None

    def __eq__(self, other) -> bool:
        return isinstance(other, PrecisionPolicy) and dict(self.specs) == dict(other.specs) and self.mode == other.mode

    def __hash__(self) -> int:
        return hash((tuple(self.specs.items()), self.mode))

    def replace(self, **components: Spec | str) -> PrecisionPolicy:
        """A copy with some components (or groups, or `default`, or `mode`) changed."""
        return parse_policy(",".join(f"{k}={v}" for k, v in components.items()), base=self)

    def uses(self, predicate) -> bool:
        return any(predicate(s) for s in self.specs.values())

    @property
    def traced_format(self):
        """The `Format` every traced spec rounds to in this run (at most one: see `Spec.traced`), or None."""
        names = [s.format for s in self.specs.values() if s.traced]
        return get_format(names[0]) if names else None

    def __str__(self) -> str:
        return format_policy(self)

    def to_dict(self) -> dict[str, str]:
        """Every component's spec as a string, plus the mode (the fully resolved policy, for records)."""
        return {"mode": self.mode, **{c: str(s) for c, s in self.specs.items()}}


def format_policy(policy: PrecisionPolicy) -> str:
    """Canonical compact string: `default=<most common spec>` then each differing component."""
    counts = Counter(str(s) for s in policy.specs.values())
    default = max(counts, key=lambda k: (counts[k], k == "fp32"))  # ties: prefer fp32 as the default
    parts = [f"default={default}"]
    parts += [f"{c}={s}" for c, s in policy.specs.items() if str(s) != default]
    if policy.mode != "emulate":
        parts.append(f"mode={policy.mode}")
    return ",".join(parts)


def _assign(specs: dict[str, Spec], key: str, spec: Spec) -> None:
    if key in ("default", "all"):
        targets = tuple(COMPONENTS)
    elif key in GROUPS:
        targets = GROUPS[key]
    elif key in COMPONENTS:
        targets = (key,)
    else:
        raise unknown_choice("policy component", key, [*COMPONENTS, *GROUPS, "default", "mode"])
    for t in targets:
        specs[t] = spec


def parse_policy(text: str, base: PrecisionPolicy | None = None) -> PrecisionPolicy:
    """Parse the compact string form (see module docstring); `base` is the starting policy (fp32)."""
    specs = dict((base or PRESETS["fp32"]).specs)
    mode = (base or PRESETS["fp32"]).mode
    for item in [t.strip() for t in str(text).split(",") if t.strip()]:
        if "=" not in item:
            preset = get_preset(item)
            specs, mode = dict(preset.specs), preset.mode
            continue
        key, value = (s.strip() for s in item.split("=", 1))
        key = key.lower()
        if key == "mode":
            if value not in MODES:
                raise unknown_choice("policy mode", value, MODES)
            mode = value
            continue
        if key not in ("default", "all") and key not in GROUPS and key not in COMPONENTS:
            raise unknown_choice("policy component", key, [*COMPONENTS, *GROUPS, "default", "mode"])
        _assign(specs, key, parse_spec(value, field=f"policy {key}"))
    return PrecisionPolicy(specs, mode)


def policy_to_toml_table(policy: PrecisionPolicy) -> dict[str, str]:
    """The canonical form as a TOML table (key = "spec")."""
    return dict(item.split("=", 1) for item in format_policy(policy).split(","))


# A TOML policy table may name one component (or group) and a format in two keys, `traced_group` and
# `traced_format`: the policy is then the rest of the table with `GROUP=FORMAT:traced` applied last. Two
# keys, so a sweep can cross an axis of groups with an axis of formats, and the trainer batches the formats
# (`train.BATCHABLE_FIELDS`: runs that differ only in `policy.traced_format` share one compiled program).
TRACED_KEYS = ("traced_group", "traced_format")


def traced_group_choices() -> list[str]:
    """What `traced_group` may name: a component or a group (`default` would trace every component)."""
    return [*COMPONENTS, *GROUPS]


def policy_from_toml_table(table: Mapping[str, object]) -> PrecisionPolicy:
    """Inverse of `policy_to_toml_table`; a `preset` key, if present, is applied first; `traced_group` with
    `traced_format` (see `TRACED_KEYS`) last."""
    items = []
    if "preset" in table:
        items.append(str(table["preset"]))
    items += [f"{k}={v}" for k, v in table.items() if k != "preset" and k not in TRACED_KEYS]
    given = [k for k in TRACED_KEYS if k in table]
    if given:
        if len(given) == 1:
            missing = next(k for k in TRACED_KEYS if k not in table)
            raise UserError(f"policy.{given[0]} needs policy.{missing} too (a component group and the format "
                            "it is traced in)")
        group, fmt = table["traced_group"], table["traced_format"]
        if not isinstance(group, str) or group.strip().lower() not in traced_group_choices():
            raise unknown_choice("policy.traced_group", group, traced_group_choices())
        if not isinstance(fmt, str):
            raise UserError(f"policy.traced_format must be a format name (e.g. e8m3, e8m0_ieee), got {fmt!r}")
        try:
            spec = Spec(format=fmt, traced=True)
        except UserError as err:
            raise UserError(f"policy.traced_format: {err}") from None
        items.append(f"{group.strip().lower()}={spec}")
    return parse_policy(",".join(items))


def get_policy(policy: str | PrecisionPolicy | Mapping | None) -> PrecisionPolicy:
    """A policy from a preset name, a compact string, a TOML table, or a policy (returned as is)."""
    if policy is None:
        return PRESETS["fp32"]
    if isinstance(policy, PrecisionPolicy):
        return policy
    if isinstance(policy, Mapping):
        return policy_from_toml_table(policy)
    return parse_policy(policy)


def get_preset(name: str) -> PrecisionPolicy:
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise unknown_choice("policy preset", name, PRESETS)
    return PRESETS[key]


# -- presets ------------------------------------------------------------------------------------------------


def _uniform(spec: str, **overrides: str) -> PrecisionPolicy:
    specs = {c: parse_spec(spec) for c in COMPONENTS}
    for key, value in overrides.items():
        _assign(specs, key, parse_spec(value))
    return PrecisionPolicy(specs)


_STMOE = dict(
    # ST-MoE section 3 (PAPER.md): float32 weights cast to bf16 for matmuls with f32 accumulation;
    # activations stored and operated on in bf16; router computed in float32 ("selective precision");
    # every exponentiated tensor in float32; gradient all-reduce in float32.
    params="fp32", master="fp32", optimizer_state="fp32", grad_allreduce="fp32",
    router="fp32", exponentials="fp32", combine_weights="fp32",
)

PRESET_SOURCES: dict[str, str] = {
    "fp32": "reference: everything float32",
    "bf16": "Switch Transformer Table 2 'bfloat16' (diverged): every compute, communication and gradient "
            "component bf16, router included; float32 master weights and optimizer state",
    "bf16-selective": "Switch Table 2 'selective precision': as bf16, with the router (input, weights, "
                      "logits, softmax, and its backward) in float32",
    "st-moe": "ST-MoE section 3: bf16 matmul operands/activations, float32 weights, router, exponentials "
              "and gradient all-reduce",
    "fp8-hybrid": "Micikevicius et al. 2022 / Transformer Engine: st-moe with e4m3 forward matmul operands "
                  "and e5m2 gradients, delayed scaling, saturating casts",
    "mxfp8": "OCP MX v1.0: st-moe with matmul operands in MXFP8 (e4m3, 32-element e8m0 blocks) and "
             "gradients in MXFP8 e5m2",
    "mxfp4-experts": "OCP MX v1.0: st-moe with expert matmul operands in MXFP4 (e2m1, 32-element blocks)",
    "tpu-default": "TPU at default matmul precision: float32 everywhere, but every matmul rounds its "
                   "operands to bf16 (one bf16 pass) and accumulates in float32",
}

_FP8_FWD = "fp8_e4m3fn:delayed:saturate"
_FP8_BWD = "fp8_e5m2:delayed:saturate"

PRESETS: dict[str, PrecisionPolicy] = {}
PRESETS["fp32"] = _uniform("fp32")
PRESETS["bf16"] = _uniform("bf16", params="fp32", master="fp32", optimizer_state="fp32")
PRESETS["bf16-selective"] = _uniform("bf16", params="fp32", master="fp32", optimizer_state="fp32", router="fp32")
PRESETS["st-moe"] = _uniform("bf16", **_STMOE)
PRESETS["fp8-hybrid"] = _uniform("bf16", **_STMOE, operands=_FP8_FWD, grads=_FP8_BWD)
PRESETS["mxfp8"] = _uniform("bf16", **_STMOE, operands="fp8_e4m3fn:mx:saturate", grads="fp8_e5m2:mx:saturate")
PRESETS["mxfp4-experts"] = _uniform("bf16", **_STMOE, experts="fp4_e2m1fn:mx:saturate")
# router_grads follows `grads` here (the router is not float32 on a TPU at default precision: its backward
# matmuls round the cotangent to bf16 like every other matmul).
PRESETS["tpu-default"] = _uniform("fp32", operands="bf16", router_input="bf16", router_weights="bf16", grads="bf16",
                                  router_grads="bf16")

__all__ = [
    "COMPONENTS", "GROUPS", "SCALINGS", "DELAYED_SCALING_COMPONENTS", "MODES", "Spec", "Accumulator",
    "ACCUMULATOR_COMPONENTS", "parse_accumulator", "PrecisionPolicy", "PRESETS", "PRESET_SOURCES",
    "parse_spec", "parse_policy", "format_policy", "get_policy", "get_preset", "policy_to_toml_table",
    "policy_from_toml_table", "TRACED", "TRACED_KEYS", "traced_group_choices",
]
