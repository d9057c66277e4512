#!/usr/bin/env python
"""Baseline: one full fp32 CPU train step of HuggingFace SwitchTransformersForConditionalGeneration.

Run with the HF venv (see benchmarks/setup_hf.sh):

    benchmarks/.venv-hf/bin/python benchmarks/hf_switch.py --json

The model is built from a SwitchTransformersConfig (random init, no download) at the
lab's reference ST-MoE size:

    d_model 128, d_ff 512, 4 encoder + 4 decoder layers, 4 heads, d_kv 32,
    8 experts, top-1, every 2nd layer sparse (layers 1 and 3 of each stack),
    vocab 512, batch 16 x (128 input, 32 target) tokens, expert_capacity 64.

A train step is: zero_grad, forward with labels and output_router_logits=True (so
the loss is CE + router_z_loss_coef * z_loss + router_aux_loss_coef * aux_loss, as HF
computes them), backward, torch.optim.AdamW step.

Gotchas (HF transformers 5.x, checked in the installed source):
  * expert_capacity is an absolute token count *per sequence* (the router does a
    cumsum over the sequence axis of each batch row), identical for encoder and
    decoder. With 128 encoder tokens / 8 experts, capacity 64 = capacity factor 4.0;
    decoder rows have only 32 tokens, so nothing is ever dropped there.
  * encoder_sparse_step / decoder_sparse_step are *derived* in the config as
    num_layers // num_sparse_{encoder,decoder}_layers; we set num_sparse_*=2 and
    assert the built blocks really are sparse at i % 2 == 1.
  * The router z-loss and aux loss are only added to `loss` when the forward gets
    output_router_logits=True (default False), and HF skips both whenever the
    sparse step is 1 (every layer sparse).
  * Experts run on gathered tokens (torch.where + index_add_), not a capacity-padded
    dense dispatch, so FLOPs count routed tokens only.
  * decoder_start_token_id is not defaulted in transformers 5.x; we set it to the
    pad id 0 (as HF docs recommend) so labels can be shifted right.
  * router_jitter_noise defaults to 0.01 in HF; we use 0 (override with --jitter).
  * FLOPs are data dependent: tokens over capacity skip their expert. At init nothing
    is dropped (16.44 GFLOP/step = `gflop_per_step`); as the router trains, routing
    concentrates and the count falls, so GFLOP/s uses the mean of counts taken right
    before and after the timed loop (`gflop_per_step_timed`). FlopCounterMode counts
    matmul-class ops only (mm/bmm/addmm/...), not the elementwise ops nor AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpuguard import CpuGuard, cpu_model  # noqa: E402


def _loadavg() -> float | None:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return None


def build(args):
    import torch
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    cfg = SwitchTransformersConfig(
        vocab_size=args.vocab,
        d_model=128,
        d_ff=512,
        d_kv=32,
        num_heads=4,
        num_layers=4,
        num_decoder_layers=4,
        num_sparse_encoder_layers=2,  # -> encoder_sparse_step = 4 // 2 = 2
        num_sparse_decoder_layers=2,  # -> decoder_sparse_step = 2
        num_experts=8,
        expert_capacity=args.capacity,
        router_jitter_noise=args.jitter,
        dropout_rate=args.dropout,
        router_z_loss_coef=args.z_coef,
        router_aux_loss_coef=args.aux_coef,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        use_cache=False,
    )
    assert cfg.encoder_sparse_step == 2 and cfg.decoder_sparse_step == 2, (
        cfg.encoder_sparse_step,
        cfg.decoder_sparse_step,
    )
    torch.manual_seed(args.seed)
    model = SwitchTransformersForConditionalGeneration(cfg)
    model.train()
    for stack in (model.encoder, model.decoder):
        sparse = [i for i, b in enumerate(stack.block) if b.is_sparse]
        assert sparse == [1, 3], sparse
    return cfg, model


def make_batches(args, n: int):
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    out = []
    for _ in range(n):
        # ids 2.. avoid pad (0) and eos (1); no attention masks (no padding).
        inp = torch.randint(2, args.vocab, (args.batch, args.src_len), generator=g)
        lab = torch.randint(2, args.vocab, (args.batch, args.tgt_len), generator=g)
        out.append((inp, lab))
    return out


def train_step(model, opt, batch):
    inp, lab = batch
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=inp, labels=lab, output_router_logits=True)
    out.loss.backward()
    opt.step()
    return out


def drop_fraction(model, batch, capacity: int) -> dict:
    """Fraction of routed tokens over capacity per sparse layer (recomputed from router logits)."""
    import torch

    res = {}
    with torch.no_grad():
        out = model(input_ids=batch[0], labels=batch[1], output_router_logits=True)
    for name, logits in (("encoder", out.encoder_router_logits), ("decoder", out.decoder_router_logits)):
        fr = []
        for lg in logits or ():
            if lg is None or lg.dim() != 3:
                continue
            oh = torch.nn.functional.one_hot(lg.argmax(-1), lg.shape[-1])
            pri = torch.cumsum(oh, dim=-2)
            dropped = ((pri > capacity) & (oh > 0)).sum().item()
            fr.append(dropped / (lg.shape[0] * lg.shape[1]))
        res[name] = fr
    res["loss_terms"] = {
        "total": float(out.loss),
        "encoder_z_loss": float(out.encoder_z_loss),
        "encoder_aux_loss": float(out.encoder_aux_loss),
        "decoder_z_loss": float(out.decoder_z_loss),
        "decoder_aux_loss": float(out.decoder_aux_loss),
    }
    return res


def count_flops(model, opt, batch) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with fc:
        train_step(model, opt, batch)
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return {"total": int(fc.get_total_flops()), "by_op": by_op}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per repetition")
    p.add_argument("--reps", type=int, default=5, help="repetitions (median/spread over these)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--tgt-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--capacity", type=int, default=64, help="HF expert_capacity (tokens per sequence)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--jitter", type=float, default=0.0, help="router_jitter_noise (HF default 0.01)")
    p.add_argument("--z-coef", type=float, default=1e-3, help="router_z_loss_coef (HF default 1e-3)")
    p.add_argument("--aux-coef", type=float, default=1e-3, help="router_aux_loss_coef (HF default 1e-3)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line with all numbers")
    p.add_argument("--serve", action="store_true",
                   help="worker mode for interleaved comparisons (benchmarks/lab_bench.py): build, warm up, "
                        "print one JSON line, then answer each stdin line 'time N' with the ms/step of N steps")
    args = p.parse_args(argv)
    if args.serve:
        return serve(args)

    import numpy
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    cfg, model = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    batches = make_batches(args, 4)
    n_params = sum(p.numel() for p in model.parameters())

    load_start = _loadavg()
    drops = drop_fraction(model, batches[0], args.capacity)
    flops = count_flops(model, opt, batches[0])  # at init: no token over capacity yet
    for i in range(args.warmup):
        train_step(model, opt, batches[i % len(batches)])
    flops_warm = count_flops(model, opt, batches[0])

    per_step_ms = []
    k = 0
    with CpuGuard() as guard:
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = train_step(model, opt, batches[k % len(batches)])
                k += 1
            t1 = time.perf_counter()
            per_step_ms.append((t1 - t0) * 1e3 / args.steps)
    final_loss = float(out.loss.detach())
    load_end = _loadavg()
    drops_end = drop_fraction(model, batches[0], args.capacity)
    drops_end.pop("loss_terms")
    flops_end = count_flops(model, opt, batches[0])

    med = statistics.median(per_step_ms)
    gflop = flops["total"] / 1e9
    # Routing (hence tokens over capacity, hence expert FLOPs) drifts as the router trains:
    # rate = mean of the counts taken right before and right after the timed loop.
    gflop_timed = (flops_warm["total"] + flops_end["total"]) / 2e9
    res = {
        "benchmark": "hf_switch_train_step",
        "ms_per_step_median": round(med, 3),
        "ms_per_step_min": round(min(per_step_ms), 3),
        "ms_per_step_max": round(max(per_step_ms), 3),
        "ms_per_step_reps": [round(x, 3) for x in per_step_ms],
        "spread_pct": round(100 * (max(per_step_ms) - min(per_step_ms)) / med, 2),
        "gflop_per_step": round(gflop, 4),
        "gflop_per_step_timed": round(gflop_timed, 4),
        "gflop_per_step_before_after_timing": [round(flops_warm["total"] / 1e9, 4),
                                               round(flops_end["total"] / 1e9, 4)],
        "gflops_achieved": round(gflop_timed / (med / 1e3), 2),
        "gflops_achieved_best_rep": round(gflop_timed / (min(per_step_ms) / 1e3), 2),
        "flops_by_op": flops["by_op"],
        "loadavg_start_end": [load_start, load_end],
        "cpu_guard": guard.result(),
        "steps_per_rep": args.steps,
        "reps": args.reps,
        "warmup": args.warmup,
        "final_loss": round(final_loss, 5),
        "initial_loss_terms": drops.pop("loss_terms"),
        "dropped_token_fraction_init": drops,
        "dropped_token_fraction_end": drops_end,
        "n_params": n_params,
        "config": {
            "d_model": cfg.d_model, "d_ff": cfg.d_ff, "d_kv": cfg.d_kv, "num_heads": cfg.num_heads,
            "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_decoder_layers,
            "encoder_sparse_step": cfg.encoder_sparse_step, "decoder_sparse_step": cfg.decoder_sparse_step,
            "num_experts": cfg.num_experts, "expert_capacity": cfg.expert_capacity,
            "vocab_size": cfg.vocab_size, "batch": args.batch, "src_len": args.src_len,
            "tgt_len": args.tgt_len, "dropout_rate": cfg.dropout_rate,
            "router_jitter_noise": cfg.router_jitter_noise, "router_z_loss_coef": cfg.router_z_loss_coef,
            "router_aux_loss_coef": cfg.router_aux_loss_coef, "router_dtype": cfg.router_dtype,
            "tie_word_embeddings": cfg.tie_word_embeddings, "dense_act_fn": cfg.dense_act_fn,
            "optimizer": f"torch.optim.AdamW(lr={args.lr}, weight_decay={args.weight_decay})",
            "dtype": "float32",
        },
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": numpy.__version__,
            "torch_num_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other",
            "mkldnn": torch.backends.mkldnn.is_available(),
            "cpu": cpu_model(),
            "nproc": os.cpu_count(),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        },
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"HF SwitchTransformers train step (fp32, CPU, {res['env']['torch_num_threads']} threads)")
        print(f"  params {n_params/1e6:.2f} M, torch {torch.__version__}, transformers {transformers.__version__}")
        print(f"  ms/step median {med:.1f}  (min {min(per_step_ms):.1f}, max {max(per_step_ms):.1f}, "
              f"spread {res['spread_pct']:.1f}%, {args.reps} reps x {args.steps} steps)")
        print(f"  GFLOP/step {gflop:.3f} at init, {gflop_timed:.3f} while timed; "
              f"achieved {res['gflops_achieved']:.1f} GFLOP/s")
        print(f"  dropped token fraction at init: {drops}, after timing: {drops_end}")
        print(f"  load average at start/end: {load_start} / {load_end}; other processes' CPU "
              f"during timing: {res['cpu_guard']}")
        print(f"  initial loss terms: {res['initial_loss_terms']}")
    return 0


def serve(args) -> int:
    """Interleaving worker: the driver alternates timed blocks of this model and of the lab's, so both
    see the same machine load. Protocol: one JSON line when ready; then per stdin line 'time N' one JSON
    line {"ms_per_step", "cpu_guard"}; 'quit' or EOF ends."""
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    cfg, model = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    batches = make_batches(args, 4)
    flops = count_flops(model, opt, batches[0])
    for i in range(args.warmup):
        train_step(model, opt, batches[i % len(batches)])
    flops_warm = count_flops(model, opt, batches[0])
    print(json.dumps({"ready": True, "gflop_per_step_init": flops["total"] / 1e9,
                      "gflop_per_step_warm": flops_warm["total"] / 1e9, "flops_by_op": flops["by_op"],
                      "n_params": sum(p.numel() for p in model.parameters()),
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "torch_num_threads": torch.get_num_threads()}), flush=True)
    k = 0
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        n = int(cmd[1])
        with CpuGuard() as guard:
            t0 = time.perf_counter()
            for _ in range(n):
                train_step(model, opt, batches[k % len(batches)])
                k += 1
            dt = time.perf_counter() - t0
        print(json.dumps({"ms_per_step": dt * 1e3 / n, "cpu_guard": guard.result()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
