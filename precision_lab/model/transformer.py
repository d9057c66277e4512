"""The ST-MoE encoder-decoder (T5.1.1 layout) as two pure functions:

    params, scale_state = init(key, cfg, policy)
    out = apply(params, scale_state, batch, cfg=cfg, policy=policy, train=True, key=key)   # -> ModelOutput

`batch` is the dict precision_lab.data produces: inputs <int32>[B, Li], decoder_inputs and targets
<int32>[B, Lt], loss_mask <float32>[B, Lt] (PAD id 0). Each block is pre-norm with residuals:

    encoder block: x += SelfAttn(RMSNorm(x)); x += FFN(RMSNorm(x))          (FFN = dense, or MoE when sparse)
    decoder block: x += CausalSelfAttn(RMSNorm(x)); x += CrossAttn(RMSNorm(x), enc); x += FFN(RMSNorm(x))
    sparse block with extra_dense_ffn "before"/"after": a dense FFN sublayer right before/after the MoE one.

then a final RMSNorm, dropout and the output projection (tied: embedding^T * d_model^-0.5). Relative
position bias: one table per stack, bidirectional buckets in the encoder, causal in the decoder; none in
cross-attention. Dropout (embeddings, attention probabilities, FFN hidden units, sublayer outputs, final
output) only when train=True.

Causality: decoder position t never attends to positions > t. The MoE routing groups mix positions, so a later
token can compete for an expert's capacity: with top-1 (and no BPR, which is encoder-only) earlier tokens
always win their slot, so the decoder stays causal; with top-2, a later token's FIRST choice outranks an
earlier token's SECOND choice and can drop it. That is how Mesh TF and flaxformer behave too; the test pins
causality where nothing is dropped.

`scale_state` holds one delayed-scaling entry per matmul site (None for policies without delayed scaling).
Pass it to `jax.grad` along with params: its "gradient" is the updated state (see precision_lab.ops).
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp

from precision_lab import ops
from precision_lab.model import layers, moe
from precision_lab.model.config import ModelConfig
from precision_lab.policy import PrecisionPolicy

PAD_ID = 0


class ModelOutput(NamedTuple):
    """What `apply` returns (a pytree; per-layer arrays follow `cfg.moe_layer_names()`, M sparse layers).

    loss:                <float32>[] ce_loss + c_B * agg(load_balancing_loss) + c_z * agg(router_z_loss)
                         + output_z_loss_coef * output_z_loss, agg = cfg.aux_loss_aggregation over layers.
    ce_loss:             <float32>[] mean cross-entropy over tokens with loss_mask 1 (nats).
    token_ce:            <float32>[B, Lt] per-token cross-entropy (not masked).
    output_z_loss:       <float32>[] masked mean of logsumexp(output logits)^2.
    output_lse_mean:     <float32>[] masked mean of logsumexp(output logits).
    router_z_loss:       <float32>[M] per sparse layer.
    load_balancing_loss: <float32>[M] per sparse layer.
    router:              {name: <float32>[M]} telemetry per sparse layer (moe.TELEMETRY names).
    expert_index:        tuple of M <int32>[G, S, K] chosen experts (best first) per sparse layer.
    max_attention_logit: <float32>[] max |attention logit| (bias included) over all attention layers.
    logits:              <float32>[B, Lt, V] output logits if apply(return_logits=True), else None.
    """

    loss: jax.Array
    ce_loss: jax.Array
    token_ce: jax.Array
    output_z_loss: jax.Array
    output_lse_mean: jax.Array
    router_z_loss: jax.Array
    load_balancing_loss: jax.Array
    router: dict
    expert_index: tuple
    max_attention_logit: jax.Array
    logits: jax.Array | None = None


# -- init ------------------------------------------------------------------------------------------------------


def _init_block(key, cfg: ModelConfig, policy: PrecisionPolicy, layer: int, *, decoder: bool):
    """One block's params and scale state, as dicts keyed by sublayer name."""
    keys = iter(jax.random.split(key, 8))
    params, state = {}, {}

    def add(name, init_pair, norm=True):
        p, s = init_pair
        params[name], state[name] = p, s
        if norm:
            params[name + "_norm"] = layers.init_norm(cfg)

    add("self_attn", layers.init_attention(next(keys), cfg, policy))
    if decoder:
        add("cross_attn", layers.init_attention(next(keys), cfg, policy))
    if cfg.is_sparse(layer):
        add("moe", moe.init_moe(next(keys), cfg, policy))
        if cfg.extra_dense_ffn != "none":
            add("ffn", layers.init_ffn(next(keys), cfg, policy))
    else:
        add("ffn", layers.init_ffn(next(keys), cfg, policy, cfg.ffn_hidden_at(layer)))
    return params, state


def _init_stack(key, cfg: ModelConfig, policy: PrecisionPolicy, *, decoder: bool):
    n = cfg.num_decoder_layers if decoder else cfg.num_encoder_layers
    k_bias, *k_blocks = jax.random.split(key, n + 1)
    blocks = [_init_block(k, cfg, policy, i, decoder=decoder) for i, k in enumerate(k_blocks)]
    params = {"position_bias": layers.init_position_bias(k_bias, cfg), "final_norm": layers.init_norm(cfg),
              "blocks": [b[0] for b in blocks]}
    return params, {"blocks": [b[1] for b in blocks]}


def init(key, cfg: ModelConfig, policy: PrecisionPolicy):
    """(params, scale_state): float32 params (T5 initialisation, see layers.py) and delayed-scaling state.

    params = {"token_embed": [V, D], "encoder": {...}, "decoder": {...}, "lm_head": [D, V] (untied only)}.
    """
    k_embed, k_enc, k_dec, k_head = jax.random.split(key, 4)
    enc, enc_state = _init_stack(k_enc, cfg, policy, decoder=False)
    dec, dec_state = _init_stack(k_dec, cfg, policy, decoder=True)
    params = {"token_embed": layers.normal(k_embed, (cfg.vocab_size, cfg.d_model), 1.0), "encoder": enc,
              "decoder": dec}
    state = {"encoder": enc_state, "decoder": dec_state,
             "lm_head": layers.dot_state(policy, "head_operands", "head_operands")}
    if not cfg.tie_embeddings:
        params["lm_head"] = layers.init_weight(k_head, (cfg.d_model, cfg.vocab_size), cfg.d_model, cfg)
    return params, state


# -- apply ------------------------------------------------------------------------------------------------------


def _site_key(key, name: str):
    """A key for one random site, stable under changes elsewhere in the model (None stays None)."""
    return None if key is None else jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _needs_key(cfg: ModelConfig) -> bool:
    randomness = (cfg.dropout_rate, cfg.expert_dropout_rate, cfg.router_jitter_eps)
    return any(r > 0.0 for r in randomness) or (cfg.num_experts > 0 and cfg.routing in ("top2-gshard", "random"))


class _Stack(NamedTuple):
    """What one stack needs besides its params: masks, bias, routing mode and where aux goes."""

    name: str
    bias: jax.Array  # (1, H, L, L)
    self_mask: jax.Array  # (B or 1, 1, L, L) bool
    token_mask: jax.Array  # (B, L) float32, 1 = real token (routing)
    prioritized: bool
    sentinel_mask: jax.Array | None = None  # (B, L) float32, 1 = sentinel token (telemetry only)
    token_ids: jax.Array | None = None  # (B, L) int32 (routing "hash")
    route_key: jax.Array | None = None  # routing "random", in training and evaluation


def _run_stack(params, state, x, stack: _Stack, enc_out, cross_mask, aux: list, *, cfg, policy, train, key):
    """Blocks of one stack, then the final norm. Returns (<float32>[B, L, D], max attention logit)."""
    rate = cfg.dropout_rate if train else 0.0
    max_logit = jnp.float32(0.0)
    for i, (p, s) in enumerate(zip(params["blocks"], state["blocks"])):
        site = f"{stack.name}/{i}"

        def residual(x, y, name):
            y = layers.dropout(y, rate, _site_key(key, f"{site}/{name}/out"), policy)
            return ops.cast(x + y, policy, "activations")

        def dense_ffn(x):
            h = layers.rms_norm(p["ffn_norm"], x, cfg=cfg, policy=policy)
            y = layers.ffn(p["ffn"], s["ffn"], h, cfg=cfg, policy=policy, dropout_rate=rate,
                           key=_site_key(key, f"{site}/ffn"))
            return residual(x, y, "ffn")

        h = layers.rms_norm(p["self_attn_norm"], x, cfg=cfg, policy=policy)  # (B, L, D)
        y, m = layers.attention(p["self_attn"], s["self_attn"], h, h, stack.bias, stack.self_mask, policy=policy,
                                dropout_rate=rate, key=_site_key(key, f"{site}/self_attn"), norm_eps=cfg.norm_eps)
        x, max_logit = residual(x, y, "self_attn"), jnp.maximum(max_logit, m)
        if enc_out is not None:
            h = layers.rms_norm(p["cross_attn_norm"], x, cfg=cfg, policy=policy)
            y, m = layers.attention(p["cross_attn"], s["cross_attn"], h, enc_out, None, cross_mask, policy=policy,
                                    dropout_rate=rate, key=_site_key(key, f"{site}/cross_attn"),
                                    norm_eps=cfg.norm_eps)
            x, max_logit = residual(x, y, "cross_attn"), jnp.maximum(max_logit, m)
        if "moe" in p:
            if cfg.extra_dense_ffn == "before":
                x = dense_ffn(x)
            h = layers.rms_norm(p["moe_norm"], x, cfg=cfg, policy=policy)
            y, layer_aux = moe.moe_ffn(p["moe"], s["moe"], h, stack.token_mask, cfg=cfg, policy=policy, train=train,
                                       prioritized=stack.prioritized, key=_site_key(key, f"{site}/moe"),
                                       sentinel_mask=stack.sentinel_mask, token_ids=stack.token_ids,
                                       route_key=_site_key(stack.route_key, f"{site}/moe/route"))
            aux.append(layer_aux)
            x = residual(x, y, "moe")
            if cfg.extra_dense_ffn == "after":
                x = dense_ffn(x)
        else:
            x = dense_ffn(x)
    x = layers.rms_norm(params["final_norm"], x, cfg=cfg, policy=policy)
    return layers.dropout(x, rate, _site_key(key, f"{stack.name}/final"), policy), max_logit


def _embed(params, ids, *, cfg, policy, rate, key):
    """<int32>[B, L] -> <float32>[B, L, D]: lookup rounded to `embeddings`, then the residual format."""
    x = ops.cast(params["token_embed"][ids], policy, "embeddings")
    return ops.cast(layers.dropout(x, rate, key, policy, "embeddings"), policy, "activations")


def apply(params, scale_state, batch, *, cfg: ModelConfig, policy: PrecisionPolicy, train: bool, key=None,
          return_logits: bool = False) -> ModelOutput:
    """Forward pass and losses. `key` is required when train=True and the config has any randomness
    (dropout, expert dropout, router jitter, GShard's random second expert), and whenever the policy rounds
    a component stochastically (its random bits come from `key`, in evaluation too)."""
    # Every stochastic rounding of the forward and backward pass draws from this one key (ops.rounding_keys).
    with ops.rounding_keys(_site_key(key, "stochastic_rounding")):
        return _apply(params, scale_state, batch, cfg=cfg, policy=policy, train=train, key=key,
                      return_logits=return_logits)


def _apply(params, scale_state, batch, *, cfg: ModelConfig, policy: PrecisionPolicy, train: bool, key,
           return_logits: bool) -> ModelOutput:
    if train and key is None and _needs_key(cfg):
        raise ValueError("apply(train=True) needs a PRNG key: this config uses dropout, jitter or random routing")
    # routing "random" draws its experts in evaluation too: from `key` when given (the trainer passes one
    # per seed), else from a fixed key, so an evaluation is deterministic
    route_key = None if cfg.routing != "random" else (key if key is not None else jax.random.PRNGKey(0))
    key = key if train else None
    rate = cfg.dropout_rate if train else 0.0
    inputs, dec_inputs = batch["inputs"], batch["decoder_inputs"]
    targets, loss_mask = batch["targets"], batch["loss_mask"]
    len_in, len_dec = inputs.shape[1], dec_inputs.shape[1]
    enc_valid = inputs != PAD_ID  # (B, Li)
    aux: list[dict] = []

    # Encoder
    enc_stack = _Stack(
        name="encoder",
        bias=layers.position_bias(params["encoder"]["position_bias"], len_in, len_in, bidirectional=True, cfg=cfg),
        self_mask=enc_valid[:, None, None, :],  # (B, 1, 1, Li): queries see every real key
        token_mask=jnp.where(enc_valid, jnp.float32(1.0), jnp.float32(0.0)),
        prioritized=cfg.batch_prioritized_routing,
        sentinel_mask=batch.get("inputs_sentinel"),
        token_ids=inputs,
        route_key=route_key,
    )
    x = _embed(params, inputs, cfg=cfg, policy=policy, rate=rate, key=_site_key(key, "encoder/embed"))
    enc_out, max_enc = _run_stack(params["encoder"], scale_state["encoder"], x, enc_stack, None, None, aux,
                                  cfg=cfg, policy=policy, train=train, key=key)

    # Decoder (decoder_inputs start with PAD = the start token, so its padding mask is the loss mask)
    causal = jnp.tril(jnp.ones((len_dec, len_dec), bool))[None, None]  # (1, 1, Lt, Lt)
    dec_stack = _Stack(
        name="decoder",
        bias=layers.position_bias(params["decoder"]["position_bias"], len_dec, len_dec, bidirectional=False, cfg=cfg),
        self_mask=causal,
        token_mask=loss_mask,
        prioritized=False,
        sentinel_mask=batch.get("decoder_inputs_sentinel"),
        token_ids=dec_inputs,
        route_key=route_key,
    )
    y = _embed(params, dec_inputs, cfg=cfg, policy=policy, rate=rate, key=_site_key(key, "decoder/embed"))
    dec_out, max_dec = _run_stack(params["decoder"], scale_state["decoder"], y, dec_stack, enc_out,
                                  enc_valid[:, None, None, :], aux, cfg=cfg, policy=policy, train=train, key=key)

    # Output projection and losses (per `output_logits`)
    if cfg.tie_embeddings:
        dec_out = ops.cast(dec_out * jnp.float32(cfg.d_model**-0.5), policy, "activations")
        logits = ops.dot("bld,vd->blv", dec_out, params["token_embed"], policy, lhs="head_operands",
                         rhs="head_operands", out="output_logits", state=scale_state["lm_head"])
    else:
        logits = ops.dot("bld,dv->blv", dec_out, params["lm_head"], policy, lhs="head_operands",
                         rhs="head_operands", out="output_logits", state=scale_state["lm_head"])  # (B, Lt, V)
    lse = ops.logsumexp(logits, policy, "output_logits", axis=-1)  # (B, Lt)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (B, Lt)
    token_ce = ops.cast(lse - target_logit, policy, "output_logits")
    n_tokens = jnp.maximum(jnp.sum(loss_mask), 1.0)
    ce_loss = jnp.sum(token_ce * loss_mask) / n_tokens
    output_z = jnp.sum(lse * lse * loss_mask) / n_tokens

    z_losses = jnp.stack([a["z_loss"] for a in aux]) if aux else jnp.zeros((0,), jnp.float32)
    lb_losses = jnp.stack([a["load_balancing_loss"] for a in aux]) if aux else jnp.zeros((0,), jnp.float32)
    loss = total_loss(ce_loss, output_z, z_losses, lb_losses, cfg=cfg)
    telemetry = {name: (jnp.stack([a["telemetry"][name] for a in aux]) if aux else jnp.zeros((0,), jnp.float32))
                 for name in moe.TELEMETRY}
    return ModelOutput(
        loss=loss, ce_loss=ce_loss, token_ce=token_ce, output_z_loss=output_z,
        output_lse_mean=jnp.sum(lse * loss_mask) / n_tokens, router_z_loss=z_losses, load_balancing_loss=lb_losses,
        router=telemetry, expert_index=tuple(a["expert_index"] for a in aux),
        max_attention_logit=jnp.maximum(max_enc, max_dec), logits=logits if return_logits else None,
    )


def total_loss(ce_loss, output_z_loss, router_z_loss, load_balancing_loss, *, cfg: ModelConfig,
               load_balance_coef=None, router_z_loss_coef=None, output_z_loss_coef=None):
    """L = CE + c_B * agg(L_B) + c_z * agg(L_z) + c_out * output z-loss, agg = cfg.aux_loss_aggregation over
    sparse layers. Coefficients default to cfg's; the trainer passes traced ones so that runs differing only
    in a coefficient share one compiled program."""
    c_b = cfg.load_balance_coef if load_balance_coef is None else load_balance_coef
    c_z = cfg.router_z_loss_coef if router_z_loss_coef is None else router_z_loss_coef
    c_out = cfg.output_z_loss_coef if output_z_loss_coef is None else output_z_loss_coef
    loss = ce_loss + c_out * output_z_loss
    if router_z_loss.shape[0]:
        agg = jnp.mean if cfg.aux_loss_aggregation == "mean" else jnp.sum
        loss = loss + c_b * agg(load_balancing_loss) + c_z * agg(router_z_loss)
    return loss
