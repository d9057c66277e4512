#!/usr/bin/env bash
# Is a slowdown the code or the machine? `precision-lab train` at the matched configuration (the `cli`
# section's command, fp32, 1 seed, 60 steps, the old single-language data), an older commit vs the work tree,
# alternating REPS times in one run; prints timing.step_s of each.
#   bash benchmarks/ab_commits.sh 4b51d02 [REPS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OLD="$1"; REPS="${2:-2}"; PY="${PYTHON:-$PWD/.venv/bin/python}"
TREE="$(mktemp -d)/old"; git worktree add -q --detach "$TREE" "$OLD"; trap 'git worktree remove --force "$TREE"' EXIT
ARGS=(train --preset tiny --steps 60 --batch-size 16 --seeds 1 --no-progress --set train.eval_every=0
  --set train.checkpoint_every=0 --set model.vocab_size=512 --set model.d_model=128 --set model.d_ff=512
  --set model.num_heads=4 --set model.d_kv=32 --set model.num_encoder_layers=4 --set model.num_decoder_layers=4
  --set model.num_experts=8 --set model.moe_every=2 --set model.routing=top1 --set model.ffn_type=relu
  --set model.relu_flop_matched=false --set model.tie_embeddings=true --set model.group_size=128
  --set model.train_capacity_factor=4.0 --set model.eval_capacity_factor=4.0 --set model.load_balance_coef=0.001
  --set model.router_z_loss_coef=0.001 --set model.inputs_length=128 --set model.targets_length=32
  --set optim.name=adamw --set optim.lr=0.001 --set optim.weight_decay=0.01 --set optim.schedule=constant
  --set optim.warmup_steps=0 --set optim.b2=0.999 --set data.kind=synthetic)
for rep in $(seq "$REPS"); do
  for tree in "$TREE" "$PWD"; do
    out="$(mktemp -d)/run"
    (cd "$tree" && PYTHONPATH="$tree" "$PY" -m precision_lab.cli "${ARGS[@]}" --out "$out" >/dev/null)
    "$PY" -c "import json,sys; t=json.load(open(sys.argv[2]))['timing']; print(sys.argv[1], 'step ms', round(t['step_s']*1e3, 1))" \
      "$([ "$tree" = "$PWD" ] && echo "work tree" || echo "$OLD")" "$out/summary.json"
  done
done
