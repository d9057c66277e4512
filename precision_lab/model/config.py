"""Model configuration: one frozen, keyword-only dataclass and named presets.

Variants are `dataclasses.replace(get_model_config("tiny"), routing="top1", ...)`; every field is checked in
`__post_init__`, and a bad value raises `UserError` with one line naming the field and the valid values.

Where each preset comes from (numbers from PAPER.md section 6 and the Switch paper; `model-info` prints what
the shapes give, see `precision_lab.model.info`):
  tiny        a CPU toy: one train step in tens of ms on 2 cores; 8 experts top-2, sparse every 2nd block.
  small       d_model 256, 4+4 blocks, 16 experts top-2, sparse every 2nd block: the largest sweep model.
  switch-base Switch-Base (Fedus et al. Table 9): d_model 768, dense-ReLU-dense d_ff 2048, 12+12 blocks,
              12 heads, d_kv 64, 128 experts top-1, sparse every 2nd block, vocab 32128, Switch's truncated
              normal router init (scale 0.1), CF 1.25/2.0. With this ReLU FFN the count is 5.0B; the paper's
              7.4B is what T5.1.1's gated FFN gives (3 matrices per expert instead of 2: 7.43B), so the
              published Switch-Base most likely used GEGLU: `replace(cfg, ffn_type="geglu")` reproduces it.
  gshard      `small` with GShard/Mesh-TF routing: top-2, renormalised gates, random second expert
              (threshold 0.2), top-1 load-balance mask. A routing variant at lab scale, not GShard's 600B MT.
  dense-l     ST-MoE Table 11 Dense-L: d_model 1024, GEGLU d_ff 2816, 16 heads, d_kv 64, untied embeddings,
              vocab 32128, 27+27 blocks (27 is the table's layer count: Dense-L is ST-MoE-L with 3 more
              blocks per stack to match its FLOPs). 0.87B params; the table prints 0.8B.
  st-moe-l    ST-MoE-L: Dense-L's shapes with 24+24 blocks, 32 experts top-2 every 4th block, and an extra
              dense FFN after each sparse FFN (ST-MoE's sparse-dense layout): 4.10B params (table: 4.1B).
  st-moe-32b  ST-MoE-32B: d_model 5120, GEGLU d_ff 20480, 64 heads, d_kv 128, 24+24 blocks, 64 experts
              top-2 every 4th block with the extra dense FFN, group size 4096, CF 1.25/2.0: 269.1B params
              (table: 269B).
The sizes of st-moe-l and st-moe-32b are reproduced only with the extra dense FFN in every sparse block
(without it: 4.0B and 265.3B); untied input/output embeddings (T5.1.1) are needed for both as well.
"""

from __future__ import annotations

import dataclasses
import math

from precision_lab.errors import UserError, unknown_choice
from precision_lab.router import ROUTINGS

FFN_TYPES: tuple[str, ...] = ("geglu", "relu")
EXTRA_DENSE: tuple[str, ...] = ("none", "before", "after")
LOAD_BALANCE_MASKS: tuple[str, ...] = ("top1", "topk")
AUX_AGGREGATIONS: tuple[str, ...] = ("mean", "sum")
ROUTER_INITS: tuple[str, ...] = ("normal", "truncated_normal")
WEIGHT_INITS: tuple[str, ...] = ("t5", "truncated_normal")
DISPATCHES: tuple[str, ...] = ("sorted", "dense")  # model/dispatch.py


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """An ST-MoE encoder-decoder (T5.1.1 conventions: pre-norm RMSNorm, relative position bias, no biases).

    Shapes:
      vocab_size, d_model, num_heads, d_kv (None = d_model // num_heads), num_encoder_layers,
      num_decoder_layers: the usual T5 sizes.
      d_ff: FFN width. For "geglu" it is the width of each of the two input projections. For "relu" with
        `relu_flop_matched` (ST-MoE's "FLOP-matched dense-ReLU-dense" ablation) the hidden width is
        3 * d_ff // 2, so the two ReLU matmuls cost what GEGLU's three do; without it the width is d_ff.
      expert_d_ff: the experts' d_ff (None = d_ff), same convention.
      ffn_type: "geglu" (gelu-tanh(x W0) * (x W1), T5.1.1) | "relu".
      rmsnorm_scale: whether RMSNorm has a learned scale (ST-MoE's stability table removes it).
      qk_norm: qk-layernorm (Dehghani et al. 2023; Wortsman et al. 2023): RMSNorm over d_kv on every head's
        queries and keys before the logits, computed per the `norms` component, each with a learned [d_kv]
        scale shared by the heads (the query's starts at d_kv^-0.5: T5 folds 1/sqrt(d_kv) into the query
        init, which the norm would undo). Bounds every logit by d_kv * max|q scale| * max|k scale| (sqrt(d_kv)
        at init).
      tie_embeddings: share the input embedding with the output projection (then logits are scaled by
        d_model^-0.5, as T5.1.0 did); T5.1.1 and ST-MoE untie them.
      relative_attention_num_buckets / _max_distance: T5 relative position buckets (32 / 128).
      dropout_rate: dropout on embeddings, sublayer outputs, attention probabilities and FFN hidden units;
        expert_dropout_rate replaces it inside experts (Switch's "expert dropout"). Training only.
      weight_init, init_scale: how every weight matrix but the router's (attention, FFN, experts, output
        projection) is drawn. "t5" (default): normal with std init_scale * fan_in^-1/2 (1.0 = T5's own).
        "truncated_normal": Switch's model-wide init (Fedus et al. section 2.3, Table 3): truncated normal
        (cut at 2 std) with std sqrt(init_scale / fan_in), so init_scale is Switch's s (0.1 default-stable,
        1.0 its unstable variant) and scales every matrix's variance. fan_in is the contracted size; the
        query's includes d_kv (T5 folds attention's 1/sqrt(d_kv) into the query init). The router keeps its
        own knob (router_init*); the embedding table (a lookup, not a matmul) stays N(0, 1).

    Mixture of experts:
      num_experts: 0 = a dense model.
      flop_matched_dense: with num_experts = 0, the FLOP-matched dense control of an MoE model (issue 13):
        each block that would be sparse (moe_every's layout) gets a dense FFN of k * the expert hidden
        width (k = experts per token from routing/top_k), so every token costs the forward FLOPs of its k
        experts (the router's D x E matmul and capacity drops aside); `model-info` shows the match. moe_every: block i (0-based) of each stack is sparse when
        i % moe_every == moe_every - 1 (flaxformer's MIXED layout: every moe_every-th block, the last of
        each run), e.g. blocks 3, 7, 11, ... for moe_every 4.
      extra_dense_ffn: "none" | "before" | "after": an extra dense FFN sublayer around each sparse one.
      routing: "top1" (Switch) | "top2" (ST-MoE: raw probabilities as combine weights) | "top2-gshard"
        (renormalised gates, second expert kept with probability min(1, gate2 / gshard_threshold) in
        training; at evaluation kept iff gate2 >= gshard_threshold) | "topk" (top_k experts, raw probs) |
        controls that ignore the router (router.fixed_routing; top_k experts, gates 1/k, same capacity):
        "random" (uniformly random experts per token position and step, deterministic per seed) | "hash"
        (experts fixed by a hash of the token id, Hash Layers).
      top_k: the k of "topk" (ignored otherwise).
      router_normalize_gates: combine weights = the selected probabilities divided by their sum (Mixtral's
        top-2) instead of the raw probabilities (ST-MoE, the default); "top2-gshard" always renormalises.
      router_init: "normal" (std router_init_std, flaxformer's 2e-2) | "truncated_normal" (Switch: std
        sqrt(router_init_scale / d_model), truncated at 2 std; scale 0.1 is Switch's default, 1.0 its
        unstable variant).
      router_jitter_eps: multiply the router input by uniform[1 - eps, 1 + eps] in training (0 = off).
      router_softmax_shift: False exponentiates the raw router logits (the roundoff ST-MoE worries about).
      train_capacity_factor / eval_capacity_factor: expert capacity = round(CF * tokens_per_group /
        num_experts), at least min_capacity (flaxformer). group_size: the most tokens per routing group.
      expert_dispatch: how routed tokens reach the experts (model/dispatch.py): "sorted" (default: a
        grouped GEMM over the routed tokens in blocks of expert_block_size rows, one device) | "dense"
        (one-hot einsums, every expert runs all C slots; the layout that shards over experts). Same
        routing and roundings; see dispatch.py for where their float32 sums differ.
      batch_prioritized_routing: V-MoE's BPR, encoder only (decoder routing stays in token order).
      load_balance_mask: the f_i of the load-balancing loss from the "top1" choice (ST-MoE, Switch) or the
        "topk" set (flaxformer, HF; uniform routing then gives k, not 1).
      aux_loss_aggregation: "mean" (T5X) or "sum" (Mesh TF) over sparse layers.

    Losses (coefficients of `ModelOutput.loss`; the raw pieces are in the output too):
      load_balance_coef c_B (1e-2), router_z_loss_coef c_z (1e-3, ST-MoE), output_z_loss_coef (0 = off;
      PaLM/T5X use 1e-4 on logsumexp(output logits)^2).

    Bookkeeping for `model_info` only (the model accepts any lengths): inputs_length, targets_length.
    """

    # Transformer
    vocab_size: int = 512
    d_model: int = 64
    d_ff: int = 128
    expert_d_ff: int | None = None
    num_heads: int = 4
    d_kv: int | None = None
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    ffn_type: str = "geglu"
    relu_flop_matched: bool = True
    rmsnorm_scale: bool = True
    qk_norm: bool = False
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.0
    expert_dropout_rate: float = 0.0
    init_scale: float = 1.0
    weight_init: str = "t5"
    # Mixture of experts
    num_experts: int = 8
    flop_matched_dense: bool = False
    moe_every: int = 4
    extra_dense_ffn: str = "none"
    routing: str = "top2"
    top_k: int = 2
    router_init: str = "normal"
    router_init_std: float = 2e-2
    router_init_scale: float = 0.1
    router_jitter_eps: float = 0.0
    router_softmax_shift: bool = True
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    group_size: int = 4096
    min_capacity: int = 4
    expert_dispatch: str = "sorted"
    expert_block_size: int = 64
    batch_prioritized_routing: bool = False
    gshard_threshold: float = 0.2
    router_normalize_gates: bool = False
    load_balance_mask: str = "top1"
    aux_loss_aggregation: str = "mean"
    # Loss coefficients
    load_balance_coef: float = 1e-2
    router_z_loss_coef: float = 1e-3
    output_z_loss_coef: float = 0.0
    # For model_info
    inputs_length: int = 128
    targets_length: int = 29

    def __post_init__(self):
        for name, choices in (("ffn_type", FFN_TYPES), ("routing", ROUTINGS), ("extra_dense_ffn", EXTRA_DENSE),
                              ("load_balance_mask", LOAD_BALANCE_MASKS), ("aux_loss_aggregation", AUX_AGGREGATIONS),
                              ("router_init", ROUTER_INITS), ("expert_dispatch", DISPATCHES),
                              ("weight_init", WEIGHT_INITS)):
            if getattr(self, name) not in choices:
                raise unknown_choice(name, getattr(self, name), choices)
        for name in ("vocab_size", "d_model", "d_ff", "num_heads", "num_encoder_layers", "num_decoder_layers",
                     "relative_attention_num_buckets", "relative_attention_max_distance", "moe_every", "top_k",
                     "group_size", "inputs_length", "targets_length", "expert_block_size"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("num_experts", "min_capacity"):
            _check_int(name, getattr(self, name), low=0)
        if not isinstance(self.qk_norm, bool):
            raise UserError(f"qk_norm must be true or false, got {self.qk_norm!r}")
        for name in ("expert_d_ff", "d_kv"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=1)
        if self.d_kv is None and self.d_model % self.num_heads:
            raise UserError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}) "
                            "when d_kv is None; set d_kv or change num_heads")
        if self.relative_attention_num_buckets < 4:
            raise UserError(f"relative_attention_num_buckets must be >= 4, got {self.relative_attention_num_buckets}")
        for name in ("dropout_rate", "expert_dropout_rate"):
            _check_float(name, getattr(self, name), 0.0, 1.0, high_open=True)
        _check_float("router_jitter_eps", self.router_jitter_eps, 0.0, 1.0, high_open=True)
        _check_float("gshard_threshold", self.gshard_threshold, 0.0, 1.0, low_open=True)
        for name in ("init_scale", "router_init_std", "router_init_scale", "norm_eps", "train_capacity_factor",
                     "eval_capacity_factor"):
            _check_float(name, getattr(self, name), 0.0, math.inf, low_open=True)
        for name in ("load_balance_coef", "router_z_loss_coef", "output_z_loss_coef"):
            _check_float(name, getattr(self, name), 0.0, math.inf)
        if not isinstance(self.router_normalize_gates, bool):
            raise UserError(f"router_normalize_gates must be true or false, got {self.router_normalize_gates!r}")
        if not isinstance(self.flop_matched_dense, bool):
            raise UserError(f"flop_matched_dense must be true or false, got {self.flop_matched_dense!r}")
        if self.flop_matched_dense and self.num_experts:
            raise UserError(f"flop_matched_dense = true is the dense control of an MoE model: it needs "
                            f"num_experts = 0, got {self.num_experts}")
        if self.num_experts:
            if self.num_selected_experts > self.num_experts:
                raise UserError(f"routing {self.routing!r} selects {self.num_selected_experts} experts but "
                                f"num_experts is {self.num_experts}; valid: top_k <= num_experts")
            if not (self.sparse_blocks("encoder") or self.sparse_blocks("decoder")):
                raise UserError(f"moe_every ({self.moe_every}) leaves no sparse block in "
                                f"{self.num_encoder_layers}+{self.num_decoder_layers} layers; valid: 1.."
                                f"{max(self.num_encoder_layers, self.num_decoder_layers)} (or num_experts=0)")

    # -- derived sizes --------------------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """d_kv, defaulting to d_model // num_heads."""
        return self.d_kv if self.d_kv is not None else self.d_model // self.num_heads

    def _hidden(self, d_ff: int) -> int:
        return 3 * d_ff // 2 if self.ffn_type == "relu" and self.relu_flop_matched else d_ff

    @property
    def ffn_hidden(self) -> int:
        """Hidden width of the dense FFN as built (see d_ff)."""
        return self._hidden(self.d_ff)

    @property
    def expert_hidden(self) -> int:
        """Hidden width of each expert as built."""
        return self._hidden(self.expert_d_ff if self.expert_d_ff is not None else self.d_ff)

    @property
    def num_selected_experts(self) -> int:
        """k: experts each token asks for."""
        return {"top1": 1, "top2": 2, "top2-gshard": 2}.get(self.routing, self.top_k)

    def num_layers(self, stack: str) -> int:
        return self.num_encoder_layers if stack == "encoder" else self.num_decoder_layers

    def is_sparse(self, layer: int) -> bool:
        """Whether block `layer` (0-based, either stack) has an MoE FFN (flaxformer MIXED layout)."""
        return self.num_experts > 0 and layer % self.moe_every == self.moe_every - 1

    def ffn_hidden_at(self, layer: int) -> int:
        """Hidden width of block `layer`'s dense FFN: ffn_hidden, or k * expert_hidden where a FLOP-matched
        dense model stands in for a sparse block (flop_matched_dense)."""
        if self.flop_matched_dense and self.num_experts == 0 and layer % self.moe_every == self.moe_every - 1:
            return self.num_selected_experts * self.expert_hidden
        return self.ffn_hidden

    def sparse_blocks(self, stack: str) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers(stack)) if self.is_sparse(i))

    def moe_layer_names(self) -> tuple[str, ...]:
        """Names of the sparse layers, in the order of every per-layer output ("encoder/3", "decoder/3")."""
        return tuple(f"{stack}/{i}" for stack in ("encoder", "decoder") for i in self.sparse_blocks(stack))


def _check_int(name: str, value, *, low: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_float(name: str, value, low: float, high: float, *, low_open=False, high_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise UserError(f"{name} must be a number in {interval}, got {value!r}")


# -- presets ------------------------------------------------------------------------------------------------

# tiny's vocabulary is small on purpose: a few hundred steps must be enough to learn the synthetic language's
# transitions (a 410-token language leaves the model at the unigram plateau for most of a short run).
_TINY = ModelConfig(
    vocab_size=128, d_model=64, d_ff=128, num_heads=4, d_kv=16, num_encoder_layers=2, num_decoder_layers=2,
    num_experts=8, moe_every=2, routing="top2", group_size=256, inputs_length=64, targets_length=14,
)
_SMALL = dataclasses.replace(
    _TINY, vocab_size=512, d_model=256, d_ff=512, num_heads=4, d_kv=64, num_encoder_layers=4,
    num_decoder_layers=4, num_experts=16, moe_every=2, group_size=512, inputs_length=128, targets_length=29,
)
_T5_LARGE = dict(
    vocab_size=32128, d_model=1024, d_ff=2816, num_heads=16, d_kv=64, inputs_length=512, targets_length=114,
    group_size=4096,
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": _TINY,
    "small": _SMALL,
    "gshard": dataclasses.replace(_SMALL, routing="top2-gshard", load_balance_mask="top1"),
    "switch-base": ModelConfig(
        vocab_size=32128, d_model=768, d_ff=2048, ffn_type="relu", relu_flop_matched=False, num_heads=12,
        d_kv=64, num_encoder_layers=12, num_decoder_layers=12, num_experts=128, moe_every=2, routing="top1",
        router_init="truncated_normal", router_init_scale=0.1, group_size=4096, inputs_length=512,
        targets_length=114,
    ),
    "dense-l": ModelConfig(**_T5_LARGE, num_encoder_layers=27, num_decoder_layers=27, num_experts=0),
    "st-moe-l": ModelConfig(
        **_T5_LARGE, num_encoder_layers=24, num_decoder_layers=24, num_experts=32, moe_every=4,
        routing="top2", extra_dense_ffn="after",
    ),
    "st-moe-32b": ModelConfig(
        vocab_size=32128, d_model=5120, d_ff=20480, num_heads=64, d_kv=128, num_encoder_layers=24,
        num_decoder_layers=24, num_experts=64, moe_every=4, routing="top2", extra_dense_ffn="after",
        group_size=4096, inputs_length=512, targets_length=114,
    ),
}

# What the paper reports, for model-info's comparison (PAPER.md section 6; Switch Table 9 for switch-base).
PAPER_SIZES: dict[str, dict[str, float]] = {
    "dense-l": {"params": 0.8e9, "flops_per_sequence": 645e9},
    "st-moe-l": {"params": 4.1e9, "flops_per_sequence": 645e9},
    "st-moe-32b": {"params": 269e9, "flops_per_sequence": 20.2e12},
    "switch-base": {"params": 7.4e9},
}


def get_model_config(name: str | ModelConfig) -> ModelConfig:
    """The preset called `name` (a ModelConfig passes through)."""
    if isinstance(name, ModelConfig):
        return name
    if name not in PRESETS:
        raise unknown_choice("model preset", name, PRESETS)
    return PRESETS[name]


__all__ = ["ModelConfig", "PRESETS", "PAPER_SIZES", "get_model_config", "FFN_TYPES", "ROUTINGS"]
