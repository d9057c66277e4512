"""qk-layernorm (`model.qk_norm`): parameter count, the bound it puts on attention logits, and that it trains."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from precision_lab.config import run_config
from precision_lab.errors import UserError
from precision_lab.model import apply, get_model_config, init
from precision_lab.model.info import model_info
from precision_lab.policy import get_policy
from precision_lab.train import train

FP32 = get_policy("fp32")
SMALL = dataclasses.replace(get_model_config("tiny"), d_model=32, d_ff=64, num_encoder_layers=1,
                            num_decoder_layers=1, moe_every=1, num_experts=4)


def _batch(seed=0, batch=2, len_in=16, len_out=6, vocab=128):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, vocab, (batch, len_in)).astype(np.int32)
    targets = rng.integers(2, vocab, (batch, len_out)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets), "decoder_inputs": jnp.asarray(dec_in),
            "loss_mask": jnp.ones((batch, len_out), jnp.float32)}


def test_model_info_counts_the_qk_norm_scales():
    """Two [d_kv] scales per attention sublayer: tiny has 2 encoder self-, 2 decoder self- and 2 cross-
    attention sublayers, d_kv 16: 6 * 2 * 16 = 192 parameters more."""
    tiny = get_model_config("tiny")
    extra = model_info(dataclasses.replace(tiny, qk_norm=True))["params"] - model_info(tiny)["params"]
    attention_sublayers = tiny.num_encoder_layers + 2 * tiny.num_decoder_layers  # self; self + cross
    assert extra == attention_sublayers * 2 * tiny.head_dim == 192


def test_qk_norm_must_be_a_bool():
    with pytest.raises(UserError, match="qk_norm"):
        dataclasses.replace(SMALL, qk_norm="yes")


def _scale_qk(params, factor):
    """Multiply every attention's query and key projection by `factor` (what attention-logit growth does)."""
    def visit(tree):
        if isinstance(tree, dict):
            out = {k: visit(v) for k, v in tree.items()}
            if "q" in tree and "k" in tree:
                out["q"], out["k"] = tree["q"] * factor, tree["k"] * factor
            return out
        if isinstance(tree, list):
            return [visit(v) for v in tree]
        return tree
    return visit(params)


def test_qk_norm_bounds_the_attention_logits():
    """Growing q and k weights 1000x multiplies the logits by ~1e6 without qk-layernorm; with it every logit
    stays within d_kv * max|q scale| * max|k scale| + max|position bias| (Cauchy-Schwarz on two RMS-1
    vectors of d_kv elements: each has L2 norm sqrt(d_kv); sqrt(d_kv) at init), and the logits do not change at all (the norm removes the factor)."""
    batch = _batch()
    results = {}
    for qk_norm in (False, True):
        cfg = dataclasses.replace(SMALL, qk_norm=qk_norm)
        params, state = init(jax.random.key(0), cfg, FP32)
        run = jax.jit(lambda p: apply(p, state, batch, cfg=cfg, policy=FP32, train=False).max_attention_logit)
        results[qk_norm] = (float(run(params)), float(run(_scale_qk(params, 1000.0))), params)
    plain, plain_big, _ = results[False]
    normed, normed_big, params = results[True]
    assert plain_big > 1e5 * plain  # logits scale with the product of the two weights
    bias = max(float(jnp.max(jnp.abs(params[s]["position_bias"]))) for s in ("encoder", "decoder"))
    head_dim = SMALL.head_dim
    bound = head_dim * head_dim**-0.5 * 1.0 + bias  # the initial scales: d_kv^-0.5 and 1
    assert normed_big <= bound + 1e-5, (normed_big, bound)
    np.testing.assert_allclose(normed_big, normed, rtol=1e-4)


def test_qk_norm_trains():
    run = run_config({"model": {**{f.name: getattr(SMALL, f.name) for f in dataclasses.fields(SMALL)
                                   if f.name in ("d_model", "d_ff", "num_encoder_layers", "num_decoder_layers",
                                                 "moe_every", "num_experts")}, "qk_norm": True},
                      "train": {"steps": 30, "chunk_steps": 10, "eval_every": 0, "checkpoint_every": 0,
                                "batch_size": 8}, "policy": "fp32"})
    result = train(run, seeds=[0], progress=False)
    loss = result.metrics["loss"][:, 0]
    assert np.isfinite(loss).all()
    assert np.mean(loss[-5:]) < loss[0] - 1.0, loss
