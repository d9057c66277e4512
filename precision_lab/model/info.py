"""Model size and cost from shapes alone: `model_info(cfg)` runs `jax.eval_shape` over `init` (nothing is
allocated, so st-moe-32b's 269B parameters are fine on a laptop).

Conventions:
  params             every parameter (embeddings, norms, position-bias tables, routers, all experts).
  active_params      the parameters one token touches: everything but the experts, plus k experts' weights
                     in each sparse layer (k = experts per token). The input embedding counts whole, as the
                     parameter count conventionally does.
  flops_per_sequence forward pass only, 2 FLOPs per multiply-accumulate, one sequence of cfg.inputs_length
                     encoder and cfg.targets_length decoder tokens; every matmul counted (projections,
                     attention QK^T and PV, FFNs, router, output projection), each token using its k experts
                     (no capacity padding, no dropped tokens). Not counted: embedding lookup, norms, softmax,
                     elementwise ops, dispatch/combine einsums (data movement; dense one-hot einsums would add
                     2*S*E*C*D per group). Multiply by 3 for forward + backward.
How the presets compare with ST-MoE Table 11 (PAPER.md section 6) is printed by `model_info_text`.
"""

from __future__ import annotations

import json
import math

import jax

from precision_lab.model.config import PAPER_SIZES, PRESETS, ModelConfig, get_model_config
from precision_lab.policy import get_policy


def _param_shapes(cfg: ModelConfig):
    from precision_lab.model.transformer import init

    params, _ = jax.eval_shape(lambda k: init(k, cfg, get_policy("fp32")), jax.random.PRNGKey(0))
    return params


def _size(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def forward_macs(cfg: ModelConfig, inputs_length: int | None = None, targets_length: int | None = None) -> dict:
    """Multiply-accumulates of one forward pass per component (see the module docstring for what counts)."""
    li = cfg.inputs_length if inputs_length is None else inputs_length
    lt = cfg.targets_length if targets_length is None else targets_length
    d, hk, k = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_selected_experts
    ffn_mats = 3 if cfg.ffn_type == "geglu" else 2
    dense_ffn = ffn_mats * d * cfg.ffn_hidden  # per token (flop_matched_dense: ffn_hidden_at per block)
    expert_ffn = ffn_mats * d * cfg.expert_hidden
    macs = {"attention": 0, "ffn": 0, "experts": 0, "router": 0, "output": lt * d * cfg.vocab_size}

    def ffn_sublayers(layer: int, length: int):
        if cfg.is_sparse(layer):
            macs["router"] += length * d * cfg.num_experts
            macs["experts"] += length * k * expert_ffn
            macs["ffn"] += length * dense_ffn * (cfg.extra_dense_ffn != "none")
        else:
            macs["ffn"] += length * ffn_mats * d * cfg.ffn_hidden_at(layer)

    for layer in range(cfg.num_encoder_layers):
        macs["attention"] += 4 * li * d * hk + 2 * li * li * hk
        ffn_sublayers(layer, li)
    for layer in range(cfg.num_decoder_layers):
        macs["attention"] += 4 * lt * d * hk + 2 * lt * lt * hk  # causal self-attention (full square computed)
        macs["attention"] += 2 * lt * d * hk + 2 * li * d * hk + 2 * lt * li * hk  # cross-attention
        ffn_sublayers(layer, lt)
    return macs


def model_info(cfg: ModelConfig | str) -> dict:
    """Sizes and forward FLOPs of `cfg` (a ModelConfig or preset name); JSON-serialisable."""
    name = cfg if isinstance(cfg, str) else next((n for n, c in PRESETS.items() if c == cfg), None)
    cfg = get_model_config(cfg)
    params = _param_shapes(cfg)
    total = _size(params)
    experts = sum(_size({n: w for n, w in b["moe"].items() if n != "router"})
                  for stack in ("encoder", "decoder") for b in params[stack]["blocks"] if "moe" in b)
    per_expert_share = cfg.num_selected_experts / cfg.num_experts if cfg.num_experts else 0.0
    macs = forward_macs(cfg)
    info = {
        "preset": name,
        "params": total,
        "expert_params": experts,
        "active_params": int(round(total - experts + experts * per_expert_share)),
        "flops_per_sequence": 2 * sum(macs.values()),
        "flops_by_part": {part: 2 * m for part, m in macs.items()},
        "inputs_length": cfg.inputs_length,
        "targets_length": cfg.targets_length,
        "sparse_layers": list(cfg.moe_layer_names()),
    }
    if name in PAPER_SIZES:
        info["paper"] = dict(PAPER_SIZES[name])
    return info


def _human(n: float, billion: str = "B") -> str:
    """3 significant digits with K/M/B/T; FLOPs pass billion="G" (as the README writes them: 119G, not 119B)."""
    for unit, scale in (("T", 1e12), (billion, 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:#.3g}".rstrip(".") + unit  # 22.0T, not 22T: always 3 digits
    return f"{n:.3g}"


def model_info_text(cfg: ModelConfig | str, *, as_json: bool = False) -> str:
    """`model_info` as a few human-readable lines (or JSON), with the paper's numbers where known."""
    info = model_info(cfg)
    if as_json:
        return json.dumps(info, indent=2, sort_keys=True)
    paper = info.get("paper", {})

    def vs(key, billion="B"):
        return (f"   (paper: {_human(paper[key], billion)}, ratio {info[key] / paper[key]:.3f})" if key in paper
                else "")

    lines = [
        f"model {info['preset'] or 'custom'}: {len(info['sparse_layers'])} sparse layers "
        f"({', '.join(info['sparse_layers']) or 'dense'})",
        f"params              {info['params']:>18,d}  {_human(info['params'])}{vs('params')}",
        f"expert params       {info['expert_params']:>18,d}  {_human(info['expert_params'])}",
        f"active params/token {info['active_params']:>18,d}  {_human(info['active_params'])}",
        f"forward FLOPs/seq   {info['flops_per_sequence']:>18,d}  {_human(info['flops_per_sequence'], 'G')}"
        f"{vs('flops_per_sequence', 'G')}   [{info['inputs_length']} in / {info['targets_length']} out tokens]",
        "  by part: " + ", ".join(f"{k} {_human(v, 'G')}" for k, v in info["flops_by_part"].items()),
    ]
    return "\n".join(lines)


__all__ = ["model_info", "model_info_text", "forward_macs"]
