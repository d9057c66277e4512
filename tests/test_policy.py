"""PrecisionPolicy: parse/print round trips, TOML, presets resolve as documented, one-line errors."""

import dataclasses
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from precision_lab.errors import UserError
from precision_lab.policy import (COMPONENTS, DELAYED_SCALING_COMPONENTS, GROUPS, PRESETS, PrecisionPolicy, Spec, format_policy, get_policy,
                                  parse_policy, parse_spec, policy_from_toml_table, policy_to_toml_table)
from precision_lab.rounding import OVERFLOWS, ROUNDINGS

specs = st.builds(
    Spec,
    format=st.sampled_from(["fp32", "bf16", "fp16", "tf32", "fp8_e4m3fn", "fp8_e5m2", "fp4_e2m1fn", "e5m7", "e3m4"]),
    scaling=st.sampled_from(["none", "current", "delayed", "mx", "tile1x128", "tile128x128"]),
    rounding=st.sampled_from(ROUNDINGS),
    overflow=st.sampled_from([None, *OVERFLOWS]),
)
policies = st.builds(
    # delayed scaling only where a matmul site keeps an amax history (anywhere else the policy is refused)
    lambda chosen, mode: PrecisionPolicy({c: s if s.scaling != "delayed" or c in DELAYED_SCALING_COMPONENTS
                                          else dataclasses.replace(s, scaling="current")
                                          for c, s in zip(COMPONENTS, chosen)}, mode),
    st.lists(specs, min_size=len(COMPONENTS), max_size=len(COMPONENTS)),
    st.sampled_from(["emulate", "native"]),
)


@settings(max_examples=200)
@given(policies)
def test_string_round_trip(policy):
    text = format_policy(policy)
    assert parse_policy(text) == policy
    assert format_policy(parse_policy(text)) == text  # the printed form is canonical


@settings(max_examples=100)
@given(policies)
def test_toml_round_trip(policy):
    table = policy_to_toml_table(policy)
    text = "[policy]\n" + "\n".join(f'{k} = "{v}"' for k, v in table.items())
    assert policy_from_toml_table(tomllib.loads(text)["policy"]) == policy


@settings(max_examples=100)
@given(specs)
def test_spec_round_trip(spec):
    assert parse_spec(str(spec)) == spec


def test_compact_user_line():
    p = parse_policy("router=fp32,experts=fp8_e4m3fn:delayed,grads=fp8_e5m2")
    assert all(p[c] == Spec(format="fp32") for c in GROUPS["router"])
    assert p["expert_operands"] == Spec(format="fp8_e4m3fn", scaling="delayed")
    assert p["grads"] == Spec(format="fp8_e5m2")
    assert p["activations"] == Spec(format="fp32")  # unspecified components stay at the base (fp32)
    later = parse_policy("st-moe,router_softmax=bf16:stochastic")  # a preset, then an override
    assert later["router_softmax"] == Spec(format="bf16", rounding="stochastic")
    assert later["attn_operands"] == PRESETS["st-moe"]["attn_operands"]


def test_presets_resolve_as_documented():
    f32, bf16 = Spec(format="fp32"), Spec(format="bf16")
    assert all(s == f32 for s in PRESETS["fp32"].specs.values())
    bf = PRESETS["bf16"]
    assert bf["router_logits"] == bf16 and bf["router_softmax"] == bf16 and bf["grad_allreduce"] == bf16
    assert bf["master"] == f32
    sel = PRESETS["bf16-selective"]
    assert all(sel[c] == f32 for c in GROUPS["router"]) and sel["expert_operands"] == bf16
    stm = PRESETS["st-moe"]
    assert stm["params"] == f32 and stm["activations"] == bf16 and stm["expert_operands"] == bf16
    assert stm["router_softmax"] == f32 and stm["attn_softmax"] == f32 and stm["output_logits"] == f32
    assert stm["grad_allreduce"] == f32 and stm["router_input"] == f32
    fp8 = PRESETS["fp8-hybrid"]
    for c in GROUPS["operands"]:
        assert fp8[c] == Spec(format="fp8_e4m3fn", scaling="delayed", overflow="saturate")
    assert fp8["grads"] == Spec(format="fp8_e5m2", scaling="delayed", overflow="saturate")
    assert fp8["router_logits"] == f32
    assert PRESETS["mxfp8"]["ffn_operands"].scaling == "mx"
    mx4 = PRESETS["mxfp4-experts"]
    assert mx4["expert_operands"] == Spec(format="fp4_e2m1fn", scaling="mx", overflow="saturate")
    assert mx4["ffn_operands"] == bf16
    tpu = PRESETS["tpu-default"]
    assert tpu["attn_operands"] == bf16 and tpu["router_weights"] == bf16 and tpu["matmul_out"] == f32
    assert tpu["activations"] == f32 and tpu["router_softmax"] == f32


@pytest.mark.parametrize("text,needle", [
    ("routr=fp32", "closest match: 'router'"),
    ("router=fp33", "closest match: 'fp32'"),
    ("experts=fp8:delayd", "closest match: 'delayed'"),
    ("experts=fp8:nearest_evn", "closest match: 'nearest_even'"),
    ("st-mo", "closest match: 'st-moe'"),
    ("mode=nativ", "closest match: 'native'"),
])
def test_unknown_names_are_one_line_errors(text, needle):
    with pytest.raises(UserError) as err:
        parse_policy(text)
    assert needle in str(err.value) and "\n" not in str(err.value) and "valid choices" in str(err.value)


def test_get_policy_accepts_every_form():
    assert get_policy("bf16") == PRESETS["bf16"]
    assert get_policy({"preset": "st-moe", "router": "bf16"})["router_logits"] == Spec(format="bf16")
    assert get_policy(None) == PRESETS["fp32"]
    assert PRESETS["st-moe"].replace(router="bf16")["router_input"] == Spec(format="bf16")
    d = PRESETS["fp8-hybrid"].to_dict()
    assert d["mode"] == "emulate" and d["grads"] == "fp8_e5m2:delayed:saturate" and len(d) == len(COMPONENTS) + 1


def test_delayed_scaling_without_amax_history_is_refused(tmp_path, capsys):
    """Regression: `delayed` on a component no matmul site keeps a history for (an elementwise cast, a matmul
    output) silently became `current`. Now the policy is refused with one line; the CLI exits 2."""
    from precision_lab.cli import main

    for text in ("activations=fp8_e4m3fn:delayed", "matmul_out=bf16:delayed", "default=fp8_e4m3fn:delayed"):
        with pytest.raises(UserError, match="delayed scaling needs a matmul site's amax history") as err:
            parse_policy(text)
        assert "\n" not in str(err.value)
    for c in DELAYED_SCALING_COMPONENTS:  # matmul operands and the incoming gradient keep one
        assert parse_policy(f"{c}=fp8_e4m3fn:delayed")[c].scaling == "delayed"
    assert main(["train", "--preset", "tiny", "--policy", "st-moe,comm=fp8_e4m3fn:delayed", "--steps", "1",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "comm" in err and "current" in err
    assert not (tmp_path / "run").exists()


def test_router_grads_follow_the_float32_router():
    """"float32 router" means float32 both ways: presets whose router is float32 keep its backward
    (incoming gradient, input gradient) in float32 too; the `router` group sets it with the forward."""
    f32 = Spec(format="fp32")
    for name in ("fp32", "bf16-selective", "st-moe", "fp8-hybrid", "mxfp8", "mxfp4-experts"):
        assert PRESETS[name]["router_grads"] == f32, name
    assert PRESETS["bf16"]["router_grads"] == Spec(format="bf16")
    assert PRESETS["tpu-default"]["router_grads"] == PRESETS["tpu-default"]["grads"]
    assert parse_policy("bf16,router=fp32") == PRESETS["bf16-selective"]
    assert parse_policy("bf16-selective,router_grads=bf16")["router_grads"] == Spec(format="bf16")
