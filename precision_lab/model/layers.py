"""T5.1.1 building blocks made of precision-aware ops: RMSNorm, attention with relative position bias, the
dense FFN (GEGLU or ReLU), dropout.

Every function is pure: `init_*(key, cfg, policy) -> (params, scale_state)` and an apply function taking
(params, scale_state, inputs, ...). Arrays are float32; the policy rounds them (see precision_lab.ops).
`scale_state` mirrors the matmul sites: one `ops.init_dot_state` entry (usually None) per `ops.dot` call.

Initialisation follows Mesh TF's T5 (no 1/sqrt(d_kv) in attention; it is folded into the query init):
q ~ N(0, (d_model * d_kv)^-1), k, v ~ N(0, d_model^-1), o ~ N(0, (heads * d_kv)^-1), FFN in ~ N(0, d_model^-1),
FFN out ~ N(0, hidden^-1), each std times `cfg.init_scale`; or, with cfg.weight_init "truncated_normal", Switch's
truncated normal with std sqrt(init_scale / fan_in) for each of them (`init_weight`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from precision_lab import ops
from precision_lab.model.config import ModelConfig
from precision_lab.policy import PrecisionPolicy

def normal(key, shape, std: float):
    """<float32>[shape] ~ N(0, std^2)."""
    return jax.random.normal(key, shape, jnp.float32) * jnp.float32(std)


def init_weight(key, shape, fan_in: int, cfg: ModelConfig):
    """A weight matrix of the given fan-in, per cfg.weight_init: T5's normal with std init_scale / sqrt(fan_in),
    or Switch's truncated normal (2 std) with std sqrt(init_scale / fan_in)."""
    if cfg.weight_init == "truncated_normal":
        std = (cfg.init_scale / fan_in) ** 0.5
        return jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * jnp.float32(std)
    return normal(key, shape, cfg.init_scale * fan_in**-0.5)


def dot_state(policy: PrecisionPolicy, lhs: str, rhs: str):
    return ops.init_dot_state(policy, lhs=lhs, rhs=rhs)


# -- RMSNorm ----------------------------------------------------------------------------------------------------


def init_norm(cfg: ModelConfig):
    """RMSNorm params: {"scale": ones[D]} or {} without a learned scale."""
    return {"scale": jnp.ones((cfg.d_model,), jnp.float32)} if cfg.rmsnorm_scale else {}


def rms_norm(params, x, *, cfg: ModelConfig, policy: PrecisionPolicy):
    """<float32>[..., D] -> RMSNorm(x) * scale (if any), computed per the `norms` component."""
    return ops.rms_norm(x, params.get("scale"), policy, "norms", eps=cfg.norm_eps)


# -- dropout -------------------------------------------------------------------------------------------------------


def dropout(x, rate: float, key, policy: PrecisionPolicy, component: str = "activations"):
    """Inverted dropout; identity when rate == 0 or key is None (evaluation)."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return ops.cast(jnp.where(keep, x / jnp.float32(1.0 - rate), jnp.float32(0.0)), policy, component)


# -- relative position bias (T5) -----------------------------------------------------------------------------------


def relative_position_buckets(q_len: int, k_len: int, *, bidirectional: bool, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """<int32>[q_len, k_len] T5 bucket of (key position - query position); static, computed in numpy.

    Half the buckets (bidirectional: per direction) hold exact distances 0..max_exact-1, the rest are log
    spaced up to max_distance, beyond which everything shares the last bucket. Causal stacks put every
    future position into bucket 0 (the causal mask hides them anyway).
    """
    relative = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    n = -relative
    bucket = np.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket += (n < 0).astype(np.int64) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        large = max_exact + (np.log(np.maximum(n, 1) / max_exact) / math.log(max_distance / max_exact)
                             * (num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (bucket + np.where(n < max_exact, n, large)).astype(np.int32)


def init_position_bias(key, cfg: ModelConfig):
    """<float32>[num_buckets, heads] bias table, shared by all blocks of one stack (T5)."""
    n, h = cfg.relative_attention_num_buckets, cfg.num_heads
    return normal(key, (n, h), math.sqrt(2.0 / (n + h)))


def position_bias(table, q_len: int, k_len: int, *, bidirectional: bool, cfg: ModelConfig):
    """<float32>[1, H, q_len, k_len] bias added to the attention logits."""
    buckets = relative_position_buckets(q_len, k_len, bidirectional=bidirectional,
                                        num_buckets=cfg.relative_attention_num_buckets,
                                        max_distance=cfg.relative_attention_max_distance)
    # The lookup table[buckets] written as a one-hot matmul (exact: one nonzero term per output). Its
    # gradient is then a small matmul too; as a gather, XLA:CPU scatter-adds through an [Lq * Lk, H]
    # transpose with an H-wide (4) minor axis, which it writes slowly (benchmarks/RESULTS.md, round 2).
    ids = jnp.arange(table.shape[0])[None, None, :]
    onehot = jnp.where(jnp.asarray(buckets)[..., None] == ids, jnp.float32(1.0), jnp.float32(0.0))  # (Lq, Lk, n)
    return jnp.einsum("nh,qkn->hqk", table, onehot, precision=jax.lax.Precision.HIGHEST)[None]  # (1, H, Lq, Lk)


@jax.custom_vjp
def add_position_bias(logits, bias):
    """<float32>[B, H, Lq, Lk] logits + [1, H, Lq, Lk] bias shared by the batch.

    Only the backward pass is special: the bias gradient sums the batch by pairwise halving (x[:n/2] +
    x[n/2:], ...) instead of a reduce over the leading axis, which XLA:CPU runs one strided column at a
    time: 19.9 ms vs 0.31 ms for 4 x [16, 4, 128, 128] on the 2-core benchmark machine
    (benchmarks/xla_cpu_micro.py). Pairwise sums are also the more accurate order."""
    return logits + bias


def _add_position_bias_fwd(logits, bias):
    return logits + bias, None


def _add_position_bias_bwd(_, g):
    return g, sum_leading_pairwise(g)


add_position_bias.defvjp(_add_position_bias_fwd, _add_position_bias_bwd)


def sum_leading_pairwise(x):
    """Sum over axis 0 keeping it (size 1), by pairwise halving in float32."""
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        head = x[:half] + x[half:2 * half]
        x = head if x.shape[0] % 2 == 0 else jnp.concatenate([head[:1] + x[2 * half:], head[1:]], axis=0)
    return x


# -- attention -----------------------------------------------------------------------------------------------------

_ATTN = ("attn_operands", "attn_operands")


def init_attention(key, cfg: ModelConfig, policy: PrecisionPolicy):
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    kq, kk, kv, ko = jax.random.split(key, 4)
    params = {
        "q": init_weight(kq, (d, h, k), d * k, cfg),  # d_kv folded in: attention has no 1/sqrt(d_kv)
        "k": init_weight(kk, (d, h, k), d, cfg),
        "v": init_weight(kv, (d, h, k), d, cfg),
        "o": init_weight(ko, (h, k, d), h * k, cfg),
    }
    if cfg.qk_norm:  # qk-layernorm: see ModelConfig.qk_norm for the query scale's d_kv^-0.5
        params["q_norm"] = jnp.full((k,), k**-0.5, jnp.float32)
        params["k_norm"] = jnp.ones((k,), jnp.float32)
    state = {site: dot_state(policy, *_ATTN) for site in ("q", "k", "v", "logits", "values", "o")}
    return params, state


def attention(params, state, x_q, x_kv, bias, mask, *, policy: PrecisionPolicy, dropout_rate: float = 0.0,
              key=None, norm_eps: float = 1e-6):
    """Multi-head attention without 1/sqrt(d) scaling (T5); with qk-layernorm when params has "q_norm" and
    "k_norm" (RMSNorm of each head's queries and keys over d_kv, per the `norms` component, eps norm_eps).

    Args:
      x_q: <float32>[B, Lq, D] queries' input; x_kv: <float32>[B, Lk, D] keys'/values' input.
      bias: <float32>[1, H, Lq, Lk] relative position bias, or None (cross-attention).
      mask: <bool>[B or 1, 1, Lq, Lk] True where a query may attend to a key.
    Returns:
      (<float32>[B, Lq, D] output, <float32>[] max |logit| over unmasked positions).
    """
    # Heads-major [B, H, L, K] projections: the per-head matmuls below then read contiguous [L, K] tiles
    # (token-major [B, L, H, K] operands: 138/59 vs 186/177 GFLOP/s, benchmarks/xla_cpu_micro.py).
    def proj(x, w, site, eq="bld,dhk->bhlk"):
        return ops.dot(eq, x, w, policy, lhs="attn_operands", rhs="attn_operands", state=state[site])

    q = proj(x_q, params["q"], "q")  # (B, H, Lq, K)
    k = proj(x_kv, params["k"], "k")  # (B, H, Lk, K)
    v = proj(x_kv, params["v"], "v")  # (B, H, Lk, K)
    if "q_norm" in params:  # qk-layernorm: |logit| <= K * max|q_norm| * max|k_norm|, whatever q, k grow to
        q = ops.rms_norm(q, params["q_norm"], policy, "norms", eps=norm_eps)
        k = ops.rms_norm(k, params["k_norm"], policy, "norms", eps=norm_eps)
    # QK^T and PV multiply two activations: both operands' gradients are matmul outputs (rhs_grad).
    logits = ops.dot("bhqk,bhtk->bhqt", q, k, policy, lhs="attn_operands", rhs="attn_operands",
                     out="attn_logits", state=state["logits"], rhs_grad="matmul_out")  # (B, H, Lq, Lk)
    if bias is not None:
        logits = ops.cast(add_position_bias(logits, bias), policy, "attn_logits")
    max_logit = jax.lax.stop_gradient(jnp.max(jnp.where(mask, jnp.abs(logits), jnp.float32(0.0))))
    # Masked keys get probability exactly 0 whatever the formats: the softmax masks after rounding its input
    # (T5 adds -1e10 instead, which an fn/fnuz attn_softmax overflows to NaN and fp6/fp4 saturate).
    probs = ops.softmax(logits, policy, "attn_softmax", axis=-1, where=mask)  # (B, H, Lq, Lk)
    probs = dropout(probs, dropout_rate, key, policy, "attn_softmax")
    out = ops.dot("bhqt,bhtk->bhqk", probs, v, policy, lhs="attn_operands", rhs="attn_operands",
                  state=state["values"], rhs_grad="matmul_out")  # (B, H, Lq, K)
    y = proj(out, params["o"], "o", eq="bhqk,hkd->bqd")  # (B, Lq, D)
    return ops.cast(y, policy, "activations"), max_logit


# -- feed-forward --------------------------------------------------------------------------------------------------


def ffn_weight_shapes(cfg: ModelConfig, hidden: int) -> dict[str, tuple[int, int]]:
    """Weight shapes of one FFN of `hidden` units: GEGLU has wi_0 (gelu branch), wi_1 (linear), wo."""
    d = cfg.d_model
    if cfg.ffn_type == "geglu":
        return {"wi_0": (d, hidden), "wi_1": (d, hidden), "wo": (hidden, d)}
    return {"wi": (d, hidden), "wo": (hidden, d)}


def init_ffn_weights(key, cfg: ModelConfig, hidden: int, lead: tuple[int, ...] = ()):
    """FFN weights, with optional leading axes (experts: lead=(E,))."""
    shapes = ffn_weight_shapes(cfg, hidden)
    keys = jax.random.split(key, len(shapes))
    return {name: init_weight(k, (*lead, *shape), shape[0], cfg) for k, (name, shape) in zip(keys, shapes.items())}


def init_ffn(key, cfg: ModelConfig, policy: PrecisionPolicy, hidden: int | None = None):
    """A dense FFN of `hidden` units (default cfg.ffn_hidden); apply reads the width from the weights."""
    params = init_ffn_weights(key, cfg, cfg.ffn_hidden if hidden is None else hidden)
    return params, {site: dot_state(policy, "ffn_operands", "ffn_operands") for site in params}


def ffn_hidden_activation(pre: dict, cfg: ModelConfig, policy: PrecisionPolicy):
    """GEGLU: gelu_tanh(x W0) * (x W1) (T5.1.1's gated-gelu); ReLU: relu(x Wi). Rounded as activations;
    gelu is one fused op, rounded once (ops.gelu says why), the gate product another rounding."""
    if cfg.ffn_type == "geglu":
        gelu = ops.gelu(pre["wi_0"], policy, "activations")
        return ops.cast(gelu * pre["wi_1"], policy, "activations")
    # relu(v) is v or +0, so it is representable wherever the rounded matmul output v is: `ops.exact` lets
    # the cast below skip a rounding that cannot change a bit when `activations` equals `matmul_out`.
    return ops.cast(ops.exact(jax.nn.relu(pre["wi"]), like=pre["wi"]), policy, "activations")


def ffn(params, state, x, *, cfg: ModelConfig, policy: PrecisionPolicy, dropout_rate: float = 0.0, key=None):
    """Dense FFN: <float32>[B, L, D] -> <float32>[B, L, D]; matmuls per `ffn_operands`."""
    pre = {name: ops.dot("bld,df->blf", x, params[name], policy, lhs="ffn_operands", rhs="ffn_operands",
                         state=state[name]) for name in params if name != "wo"}  # (B, L, F) each
    h = dropout(ffn_hidden_activation(pre, cfg, policy), dropout_rate, key, policy)
    y = ops.dot("blf,fd->bld", h, params["wo"], policy, lhs="ffn_operands", rhs="ffn_operands", state=state["wo"])
    return ops.cast(y, policy, "activations")
