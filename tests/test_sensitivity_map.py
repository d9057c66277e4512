"""The precision sensitivity map (issue 14, item 6): traced-format policy specs, one compiled program per
component group, bad input, and the report's fewest-bits rule."""

import numpy as np
import pytest

from precision_lab.cli import main
from precision_lab.config import run_config
from precision_lab.errors import UserError
from precision_lab.policy import get_policy, parse_policy
from precision_lab.runner import SMOKE_BASE
from precision_lab.sweep import expand, group_runs, parse_sweep
from precision_lab.train import BATCHABLE_FIELDS, hparams_of, train


def test_traced_spec_parses_prints_and_is_checked():
    p = parse_policy("fp32,router=e8m3:traced")
    assert p["router_logits"].traced and p["router_logits"].format == "e8m3" and not p["router_logits"].is_identity
    assert parse_policy(str(p)) == p and "e8m3:traced" in str(p)
    assert p.traced_format.mantissa_bits == 3
    table = get_policy({"preset": "fp32", "traced_group": "router", "traced_format": "e8m0_ieee"})
    assert table["router_softmax"].traced and table.traced_format.specials == "ieee"
    assert table["grads"].format == "fp32" and not table["grads"].traced
    with pytest.raises(UserError, match="traced format must be an IEEE-style"):
        parse_policy("fp32,router=fp8_e4m3fn:traced")  # no inf: not an IEEE-style format
    with pytest.raises(UserError, match="traced format must be an IEEE-style"):
        parse_policy("fp32,grads=e5m2:current:traced")
    with pytest.raises(UserError, match="share one format"):
        parse_policy("fp32,router=e8m3:traced,grads=e5m3:traced")
    with pytest.raises(UserError, match="needs policy.traced_format"):
        get_policy({"preset": "fp32", "traced_group": "router"})
    with pytest.raises(UserError, match="precision_telemetry"):
        run_config({"policy": "fp32,router=e8m3:traced", "train": {"precision_telemetry": True}})


def test_unknown_component_group_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "map.toml"
    bad.write_text("seeds = 1\n[base]\npolicy = { preset = 'fp32', traced_group = 'routr', traced_format = 'e8m3' }\n"
                   "[[axes]]\nfield = 'policy.traced_group'\nvalues = ['router', 'atn_softmax']\n")
    assert main(["sweep", str(bad), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    # the field, the bad name and the valid choices (with the closest match)
    assert "policy.traced_group" in err and "atn_softmax" in err and "attn_softmax" in err and "router" in err, err
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").iterdir())


def test_formats_of_one_group_share_one_program_and_groups_do_not():
    spec = parse_sweep({"seeds": [0, 1], "base": {"policy": {"preset": "fp32", "traced_group": "router",
                                                             "traced_format": "e8m23"}},
                        "axes": [{"field": "policy.traced_group", "values": ["router", "grads", "master"]},
                                 {"field": "policy.traced_format", "values": ["e8m23", "e8m0_ieee", "e8m3", "e3m3"]}]})
    groups = group_runs(expand(spec, tuple(BATCHABLE_FIELDS)))
    assert [len(g) for g in groups] == [8, 8, 8]  # 4 formats x 2 seeds per group, one group per component group
    assert len(group_runs(expand(spec))) == 12  # without batching the format: a program per format


def test_ops_with_a_traced_format_match_the_static_format_forward_and_backward():
    """dot (custom VJP: the widths enter it as an input, its backward rounds `grads` and `matmul_out` in the
    traced format), softmax and cast, under jit and grad, in two formats served by one compiled function."""
    import jax
    import jax.numpy as jnp

    from precision_lab import ops

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((8, 16)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal((16, 4)).astype(np.float32) * np.float32(30.0))
    traced = parse_policy("fp32,grads=e8m3:traced,matmul_out=e8m3:traced,router_softmax=e8m3:traced")

    def loss(a, b, policy):
        y = ops.dot("mk,kn->mn", a, b, policy, lhs="attn_operands", rhs="attn_operands")
        p = ops.softmax(y, policy, "router_softmax")
        return jnp.sum(p * ops.cast(y, policy, "grads"))

    def run_traced(a, b, fields):
        with ops.traced_format(fields):
            return jax.value_and_grad(loss, argnums=(0, 1))(a, b, traced)

    run_traced = jax.jit(run_traced)
    for fmt in ("e5m2", "e8m0_ieee"):
        static = parse_policy(f"fp32,grads={fmt},matmul_out={fmt},router_softmax={fmt}")
        want = jax.jit(jax.value_and_grad(lambda a, b: loss(a, b, static), argnums=(0, 1)))(a, b)
        f = static["grads"].fmt
        got = run_traced(a, b, jnp.asarray([f.exponent_bits, f.mantissa_bits], jnp.int32))
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert run_traced._cache_size() == 1
    with pytest.raises(UserError, match="traced_format"):
        loss(a, b, traced)  # no widths given: refused, never a silent float32


def _micro(policy):
    return run_config({**{k: dict(v) for k, v in SMOKE_BASE.items()}, "train": {**SMOKE_BASE["train"], "steps": 3},
                       "policy": policy})


@pytest.mark.slow
def test_traced_run_is_bit_identical_to_the_static_one():
    """One member, one group: the traced program trains exactly what the static policy trains (slow: two
    training programs compile, 2-3 min on the loaded 2 cores; the ops-level test above is the fast check)."""
    static = train(_micro("fp32,grads=e5m3"), seeds=[0], progress=False)
    traced = train(_micro({"preset": "fp32", "traced_group": "grads", "traced_format": "e5m3"}), seeds=[0],
                   progress=False)
    for name in ("loss", "grad_norm", "update_rms"):
        np.testing.assert_array_equal(traced.metrics[name], static.metrics[name])
    assert traced.summary["final_eval_loss"] == static.summary["final_eval_loss"]
    assert traced.summary["hparams"][0]["traced_mantissa_bits"] == 3.0


@pytest.mark.slow
def test_members_in_different_formats_train_as_their_static_policies():
    """Two formats vmapped in one program, each against its own static run (float32 re-association of a
    batched program aside: rtol 1e-5, measured 1e-6)."""
    fmts = ["e8m3", "e5m2"]
    runs = [_micro({"preset": "fp32", "traced_group": "expert_operands", "traced_format": f}) for f in fmts]
    both = train(runs[0], seeds=[0, 0], hparams=[hparams_of(r) for r in runs], progress=False)
    for i, f in enumerate(fmts):
        alone = train(_micro(f"fp32,expert_operands={f}"), seeds=[0], progress=False)
        np.testing.assert_allclose(both.metrics["loss"][:, i], alone.metrics["loss"][:, 0], rtol=1e-5)
    assert not np.array_equal(both.metrics["loss"][:, 0], both.metrics["loss"][:, 1])  # the formats differ


def _cell_configs(gaps: dict[str, list[float]], diverged: frozenset = frozenset()):
    """Synthetic ConfigResults of one group: {format: per-seed eval loss}, e8m23 the reference."""
    from precision_lab.report import ConfigResult

    out = []
    for fmt, losses in gaps.items():
        records = [{"seed": s, "resolved": {}, "env": {"unigram_loss": 9.0},
                    "result": {"diverged": fmt in diverged, "final_eval_loss": v, "outcome":
                               "diverged" if fmt in diverged else "stable"}} for s, v in enumerate(losses)]
        out.append(ConfigResult(label=fmt, overrides={"policy.traced_group": "router", "policy.traced_format": fmt},
                                config={}, records=records, metrics=[{} for _ in records]))
    return out


def test_fewest_bits_rule_needs_every_wider_width_within_tolerance(tmp_path):
    from precision_lab import figures
    from precision_lab.report import fewest_bits, sensitivity_axes, sensitivity_map, table_sensitivity_map

    ref = [3.000, 3.010, 3.020]
    configs = _cell_configs({
        "e8m23": ref,
        "e8m0_ieee": [v + 0.005 for v in ref],  # a lucky pass below a failing width: does not count
        "e8m1": [v + 0.30 for v in ref],
        "e8m3": [ref[0] + 0.004, ref[1] + 0.006, ref[2] + 0.005],
        "e8m7": [ref[0] + 0.001, ref[1] - 0.001, ref[2] + 0.000],
        "e2m3_ieee": ref, "e4m3_ieee": ref,
    }, diverged=frozenset({"e2m3_ieee"}))
    grid = sensitivity_map(configs)
    mant, expo = sensitivity_axes(grid["router"])
    assert list(mant) == [0, 1, 3, 7] and list(expo) == [2, 4, 8]
    assert fewest_bits(mant, lambda c: c.point_within) == 3
    assert fewest_bits(mant, lambda c: c.shown_within) == 3  # CI upper end of +0.005 +- ~0.0025 < 0.01
    assert fewest_bits(expo, lambda c: c.point_within) == 4  # e2m3 diverged; e4m3 and e8m3 within
    assert grid["router"]["e8m1"].ci_excludes_zero and grid["router"]["e2m3_ieee"].failed
    text = table_sensitivity_map(configs)
    assert "| router | 3 | 3 | 4 | 4 |" in text and "x (all diverged)" in text and "+0.300*" in text
    paths = figures.sensitivity_map_figure(configs, tmp_path, "map")
    assert paths[0].stat().st_size > 1000
