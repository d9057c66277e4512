#!/usr/bin/env python
"""Probe (round 10, issue 12 item 1): how efficiently each class of matmul of the train step runs.

    .venv/bin/python benchmarks/probes/dot_efficiency.py [matched|quickstart] [seeds]

Profiles one block of the Trainer's compiled chunk (as benchmarks/profile_step.py does) and, for every
executed dot (YNNPACK dot fusions and XLA's own dots), reads its output shape and contraction size from the
compiled HLO: busy ms/step, GFLOP/step and GFLOP/s of busy thread time per (kind, output shape, K) class.
"""
import collections, os, re, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _profiled import busy_per_op, from_argv
prog, wall, pd, k = from_argv()
per_op, _ = busy_per_op(pd, k)
slinky = 0.0; threads = collections.Counter()
for plane in pd.planes:
    for line in plane.lines:
        for ev in line.events:
            if "linky" in ev.name: slinky += ev.duration_ns / 1e6 / k
        threads[line.name] += sum(ev.duration_ns for ev in line.events) / 1e6 / k
print("threads:", {t: round(v, 1) for t, v in threads.most_common(8)})
print("slinky events ms/step", round(slinky, 1))
txt = prog.compiled.as_text()
shapes = {}
for m in re.finditer(r"%([\w.\-]+) = \w+\[([\d,]*)\]", txt):
    shapes[m.group(1)] = [int(x) for x in m.group(2).split(",") if x]
fused = {m.group(1): m.group(2) for m in re.finditer(r"\n\s*(?:ROOT )?%([\w.\-]+) = [^\n]*calls=%([\w.\-]+)", txt)}
bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", txt, re.S)}
lines = {m.group(1): m.group(0) for m in re.finditer(r"(?m)^\s*(?:ROOT )?%([\w.\-]+) = .*$", txt)}  # by name
dotre = re.compile(r"= f32\[([\d,]*)\]\S* dot\(%?([\w.\-]+), %?([\w.\-]+)\)[^\n]*?lhs_contracting_dims=\{([\d,]*)\}")
def dotinfo(name):
    body = bodies.get(fused.get(name, ""), None)
    src = body if body is not None else lines.get(name, "")
    m = dotre.search(src)
    if not m: return None
    out = [int(x) for x in m.group(1).split(",") if x]
    lhs = shapes.get(m.group(2), [])
    kdim = 1
    for c in m.group(4).split(","):
        if c and lhs: kdim *= lhs[int(c)]
    n = 1
    for x in out: n *= x
    return out, kdim, 2 * n * kdim
rows = []
for name, ms in per_op.items():
    info = dotinfo(name)
    if info: rows.append((name, ms, *info))
tot = sum(r[1] for r in rows); fl = sum(r[4] for r in rows) / 1e9
print(f"dots: {len(rows)} ops {tot:.1f} ms/step busy, {fl:.2f} GFLOP -> {fl / tot * 1e3:.0f} GFLOP/s busy; all ops busy {sum(per_op.values()):.1f}, wall {wall:.1f}")
cat = collections.defaultdict(lambda: [0, 0.0, 0.0])
for name, ms, out, kd, f in rows:
    key = f"{'ynn' if name.startswith('ynn') else 'xla'} out{out} K{kd}"
    c = cat[key]; c[0] += 1; c[1] += ms; c[2] += f / 1e9
for key, (n, ms, g) in sorted(cat.items(), key=lambda kv: -kv[1][1])[:40]:
    print(f"{ms:7.2f} ms {n:3d}x {g:6.3f} GFLOP {g / ms * 1e3:6.0f} GFLOP/s  {key}")
