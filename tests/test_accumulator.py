"""The matmul accumulator model (`ops.matmul_accumulated`, the policy's `acc=` option): bit for bit against an
op-by-op numpy reference of the stated summation order, promotion, float32 accumulators, the backward
products, the policy grammar (string, TOML, exit 2) and a few training steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from precision_lab import ops
from precision_lab.cli import main
from precision_lab.errors import UserError
from precision_lab.policy import Accumulator, parse_policy, policy_from_toml_table, policy_to_toml_table

_ROUND = {"nearest_even": np.rint, "toward_zero": np.trunc}


def _round_np(x: np.ndarray, mantissa_bits: int, rounding: str) -> np.ndarray:
    """float32 values rounded to `mantissa_bits` explicit bits with float64 numpy (normal range of an e8
    format: the values here never leave it). Independent of the lab's integer `quantize`."""
    x64 = x.astype(np.float64)
    with np.errstate(divide="ignore"):
        e = np.where(x64 == 0, 0.0, np.floor(np.log2(np.abs(x64))))
    quantum = np.ldexp(1.0, (e - mantissa_bits).astype(np.int64))
    return (_ROUND[rounding](x64 / quantum) * quantum).astype(np.float32)


def reference(a, b, mantissa_bits, promote_every, *, block=32, rounding="toward_zero"):
    """The stated order, one numpy op at a time: K in blocks of `block` (zero-padded), each block's sum of
    products in float32, s = round_acc(s + block sum) in K order, every promote_every elements f = f + s in
    float32 and s = 0; result f + s (or s when never promoting). mantissa_bits None: no accumulator rounding."""
    m, k = a.shape
    step = promote_every or block
    kp = -(-k // step) * step
    a = np.pad(a, ((0, 0), (0, kp - k)))
    b = np.pad(b, ((0, kp - k), (0, 0)))
    f = np.zeros((m, b.shape[1]), np.float32)
    s = np.zeros_like(f)
    for j in range(kp // block):
        # exact in float64 and in float32 for the inputs used here (checked by the caller)
        blk = (a[:, j * block:(j + 1) * block].astype(np.float64) @ b[j * block:(j + 1) * block].astype(np.float64))
        assert (blk.astype(np.float32).astype(np.float64) == blk).all(), "test inputs must give exact block sums"
        s = s + blk.astype(np.float32)
        if mantissa_bits is not None:
            s = _round_np(s, mantissa_bits, rounding)
        if promote_every and ((j + 1) * block) % promote_every == 0:
            f, s = f + s, np.zeros_like(s)
    return f + s if promote_every else s


def integer_operands(m, k, n, seed=0, hi=255):
    """Small integers times powers of two: every block sum is exact in float32, the running sums are not
    exact in 8-14 significant bits (so the accumulator really rounds)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-hi, hi + 1, (m, k)) * 2.0 ** rng.integers(-3, 4, (m, 1))
    b = rng.integers(0, hi + 1, (k, n)) * 2.0 ** rng.integers(-3, 4, (1, n))
    return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("rounding", ["toward_zero", "nearest_even"])
@pytest.mark.parametrize("accumulator,bits", [("e8m13", 13), ("e8m9", 9)])
@pytest.mark.parametrize("promote_every", [None, 64, 128, 700 + 68])
def test_matches_numpy_reference_bit_for_bit(accumulator, bits, promote_every, rounding):
    a, b = integer_operands(3, 700, 5)  # K = 700: not a multiple of the block (32) nor of 128
    got = np.asarray(ops.matmul_accumulated(a, b, accumulator, promote_every, rounding=rounding))
    want = reference(a, b, bits, promote_every, rounding=rounding)
    np.testing.assert_array_equal(got, want)
    assert (want != (a.astype(np.float64) @ b)).any()  # the accumulator really rounded something


def test_block_size_and_policy_form():
    """block=8 is another order (checked against the reference); the policy's string form carries it."""
    a, b = integer_operands(2, 200, 3, seed=1)
    want = reference(a, b, 11, 64, block=8, rounding="nearest_even")
    np.testing.assert_array_equal(ops.matmul_accumulated(a, b, "e8m11", 64, block=8, rounding="nearest_even"), want)
    np.testing.assert_array_equal(ops.matmul_accumulated(a, b, "e8m11/64/k8/nearest_even"), want)


def test_promotion_never_vs_128_vs_k():
    """promote_every >= K is never promoting (bit for bit); promoting every 128 of a long positive sum is
    much more accurate than never (DeepSeek-V3's fix)."""
    rng = np.random.default_rng(2)
    k = 4096
    a = np.asarray(jnp.asarray(rng.uniform(1, 2, (8, k)), jnp.bfloat16), np.float32)
    b = np.asarray(jnp.asarray(rng.uniform(1, 2, (k, 8)), jnp.bfloat16), np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    never = np.asarray(ops.matmul_accumulated(a, b, "e8m13", None))
    np.testing.assert_array_equal(ops.matmul_accumulated(a, b, "e8m13", k), never)
    every128 = np.asarray(ops.matmul_accumulated(a, b, "e8m13", 128))
    err_never = np.abs(never - exact).max() / exact.max()
    err_128 = np.abs(every128 - exact).max() / exact.max()
    assert err_never > 1e-3 and err_128 < err_never / 10, (err_never, err_128)
    np.testing.assert_array_equal(every128, reference(a, b, 13, 128))


@pytest.mark.parametrize("accumulator", ["fp32", "e8m23"])
@pytest.mark.parametrize("promote_every", [None, 128])
def test_float32_accumulator_is_float32_summation_in_that_order(accumulator, promote_every):
    """bf16 operands with a small exponent range inside each block of 32 and a wide one across blocks:
    block sums exact in float32, the running float32 sum not, so the result pins the order (blocks, then
    promotion groups) bit for bit."""
    rng = np.random.default_rng(3)
    k = 1000
    block_scale = 2.0 ** rng.integers(-8, 4, -(-k // 32)).repeat(32)[:k]
    a = rng.choice([-1, 1], (4, k)) * rng.uniform(1, 2, (4, k)) * 2.0 ** rng.integers(0, 3, (4, k)) * block_scale
    b = rng.uniform(1, 2, (k, 6)) * 2.0 ** rng.integers(0, 3, (k, 6))
    a = np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32)
    b = np.asarray(jnp.asarray(b, jnp.bfloat16), np.float32)
    got = np.asarray(ops.matmul_accumulated(a, b, accumulator, promote_every))
    want = reference(a, b, None, promote_every)
    np.testing.assert_array_equal(got, want)
    assert (want.astype(np.float64) != a.astype(np.float64) @ b).any()  # float32 rounding happened


def test_accumulated_dot_and_its_backward_products():
    """A policy with `acc=` makes ops.dot's forward, dgrad and wgrad each an accumulated product: the
    forward is matmul_accumulated(x, w); dx = matmul_accumulated(g, w^T) (sum over N), dw =
    matmul_accumulated(x^T, g) (sum over the M tokens)."""
    policy = parse_policy("fp32,ffn_operands=fp32:acc=e8m7/64/k8")
    acc = "e8m7/64/k8"
    x, w = integer_operands(100, 72, 40, seed=4, hi=15)
    g = integer_operands(100, 40, 1, seed=5, hi=15)[0]

    @jax.jit
    def forward_backward(x_, w_, g_):
        y_, vjp = jax.vjp(lambda u, v: ops.dot("mk,kn->mn", u, v, policy, lhs="ffn_operands", rhs="ffn_operands"),
                          x_, w_)
        return (y_, *vjp(g_))

    y, dx, dw = forward_backward(x, w, g)
    np.testing.assert_array_equal(y, reference(x, w, 7, 64, block=8))
    np.testing.assert_array_equal(dx, ops.matmul_accumulated(g, w.T, acc))
    np.testing.assert_array_equal(dw, ops.matmul_accumulated(x.T, g, acc))
    np.testing.assert_array_equal(dw, reference(x.T.copy(), g, 7, 64, block=8))
    assert (np.asarray(dw) != x.T.astype(np.float64) @ g).any()  # the accumulator rounded the wgrad


def test_policy_accumulator_string_and_toml_round_trip():
    text = "st-moe,experts=bf16:acc=e8m13/128,router_weights=fp32:acc=e5m10/k16/nearest_even,head_operands=bf16:acc=e8m13"
    p = parse_policy(text)
    assert p["expert_operands"].accumulator == Accumulator(format="e8m13", promote_every=128)
    assert p["router_weights"].accumulator == Accumulator(format="e5m10", block=16, rounding="nearest_even")
    assert p["head_operands"].accumulator.promote_every is None
    s = str(p)
    assert "expert_operands=bf16:acc=e8m13/128" in s and "router_weights=fp32:acc=e5m10/k16/nearest_even" in s
    assert parse_policy(s) == p
    assert policy_from_toml_table(policy_to_toml_table(p)) == p
    assert parse_policy("fp32,experts=bf16:acc=e8m13/none") == parse_policy("fp32,experts=bf16:acc=e8m13")


@pytest.mark.parametrize("policy,needle", [
    ("st-moe,experts=bf16:acc=e8m99x/128", "closest match: 'e8m0'"),
    ("st-moe,experts=bf16:acc=e8m13/0", "promote_every must be a positive integer"),
    ("st-moe,experts=bf16:acc=e8m13/-128", "promote_every must be a positive integer"),
    ("st-moe,experts=bf16:acc=e8m13/100", "multiple of the block"),
    ("st-moe,experts=bf16:acc=e8m13/128/foo", "FORMAT[/PROMOTE_EVERY][/kBLOCK][/ROUNDING]"),
    ("st-moe,activations=bf16:acc=e8m13", "valid components: attn_operands"),
])
def test_bad_accumulator_exits_2_with_one_line(tmp_path, capsys, policy, needle):
    with pytest.raises(UserError):
        parse_policy(policy)
    assert main(["train", "--out", str(tmp_path / "out"), "--no-progress", "--policy", policy]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_accumulator_in_the_function_call():
    a = np.ones((2, 64), np.float32)
    with pytest.raises(UserError, match="promote_every"):
        ops.matmul_accumulated(a, a.T, "e8m13", 0)
    with pytest.raises(UserError, match="valid choices"):
        ops.matmul_accumulated(a, a.T, "e8m13x", 128)


def test_a_policy_with_an_accumulator_trains():
    """The expert GEMMs (grouped, sorted dispatch) accumulating in e8m10 without promotion, forward and
    backward: a few steps train to finite losses, and the run records the accumulator in its policy. (Only
    the experts, to keep the compile short: every other matmul takes the same `dot` path, tested above.)"""
    from precision_lab.config import run_config
    from precision_lab.train import train

    model = {"preset": "tiny", "d_model": 32, "d_ff": 64, "num_encoder_layers": 1, "num_decoder_layers": 1,
             "moe_every": 1, "num_experts": 4}
    run = run_config({"model": model, "policy": "fp32,experts=fp32:acc=e8m10",
                      "train": {"steps": 4, "chunk_steps": 4, "eval_every": 0, "checkpoint_every": 0,
                                "batch_size": 4}})
    assert "expert_operands=fp32:acc=e8m10" in str(run.policy)
    loss = np.asarray(train(run, seeds=[0], progress=False).metrics["loss"])
    assert loss.size >= 4 and np.isfinite(loss).all()


@pytest.mark.parametrize("promote_every", [None, 128])
def test_prefixes_are_the_shorter_products(promote_every):
    """The roundoff analysis reads every K from one long product: the accumulator's value after K elements
    (accumulate_blocks(prefixes=True)) is bit for bit the K-long product, promoted or not."""
    from precision_lab.policy import Accumulator

    a, b = integer_operands(3, 640, 4, seed=6)
    acc = Accumulator(format="e8m9", promote_every=promote_every)
    partial = jnp.einsum("mjk,jkn->jmn", a.reshape(3, 20, 32), b.reshape(20, 32, 4),
                         precision=jax.lax.Precision.HIGHEST)
    prefixes = np.asarray(ops.accumulate_blocks(partial, acc, prefixes=True))
    for k in (96, 160, 640):  # inside the first group, across a promotion, a whole number of groups
        np.testing.assert_array_equal(prefixes[k // 32 - 1], ops.matmul_accumulated(a[:, :k], b[:k], acc), err_msg=k)


def test_roundoff_analysis_promotion_and_float32_floor():
    """accumulator_error: 14 bits never promoted is far worse than promoted every 128 at K = 4096; a float32
    (24-bit) accumulator stays near float32 roundoff; median <= max."""
    from precision_lab.roundoff import accumulator_error

    rows = accumulator_error(input_formats=("fp8_e4m3fn",), significant_bits=(14, 24), ks=(128, 4096),
                             distributions=("uniform",), dots=64)
    at = {(r["significant_bits"], r["promote_every"], r["k"]): r for r in rows}
    assert all(r["median_rel_err"] <= r["max_rel_err"] for r in rows)
    assert at[(14, 0, 4096)]["max_rel_err"] > 10 * at[(14, 128, 4096)]["max_rel_err"]
    assert at[(14, 0, 128)]["max_rel_err"] == at[(14, 128, 128)]["max_rel_err"]  # K <= 128: nothing to promote
    assert 1e-4 < at[(14, 0, 4096)]["max_rel_err"] < 0.1
    assert at[(24, 0, 4096)]["max_rel_err"] < 1e-5
