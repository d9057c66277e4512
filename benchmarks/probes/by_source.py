#!/usr/bin/env python
"""Probe (round 10, issue 12 item 1): the profiled train step's busy time grouped by the source of its ops.

    .venv/bin/python benchmarks/probes/by_source.py [matched|quickstart] [seeds] [func|line]

Each executed op is mapped to its HLO stack frame (the lab function, or file line, it was traced from; the
innermost frames first). Ops of a custom_vjp (ops._dot) are attributed to its call, forward and backward.
"""
import collections, os, re, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _profiled import busy_per_op, from_argv
prog, wall, pd, k = from_argv()
per_op, count = busy_per_op(pd, k)
txt = prog.compiled.as_text()
sec = lambda name: re.search(name + r"\n(.*?)\n\n", txt, re.S).group(1).splitlines()
files = {int(l.split()[0]): l.split('"')[1] for l in sec("FileNames")}
funcs = {int(l.split()[0]): l.split('"')[1] for l in sec("FunctionNames")}
locs = {}
for l in sec("FileLocations"):
    i = int(l.split()[0]); m = dict(re.findall(r"(\w+)=(\d+)", l)); locs[i] = (int(m["file_name_id"]), int(m["function_name_id"]), int(m["line"]))
frames = {}
for l in sec("StackFrames"):
    i = int(l.split()[0]); m = dict(re.findall(r"(\w+)=(\d+)", l)); frames[i] = (int(m["file_location_id"]), int(m.get("parent_frame_id", 0)))
def chain(fid):
    out, seen = [], set()
    while fid in frames and fid not in seen:
        seen.add(fid); loc, parent = frames[fid]
        f, fn, ln = locs[loc]; out.append((os.path.basename(files[f]), funcs[fn], ln)); fid = parent
    return out
sfid = {m.group(1): int(m.group(2)) for m in re.finditer(r"\n\s*(?:ROOT )?%([\w.\-]+) = [^\n]*stack_frame_id=(\d+)", txt)}
KEY = sys.argv[3] if len(sys.argv) > 3 else "func"
roles = collections.Counter(); nops = collections.Counter()
for name, ms in per_op.items():
    ch = chain(sfid.get(name, -1))
    # innermost frame first? print both ends
    lab = [c for c in ch if c[0] not in ("train.py",)]
    if KEY == "func":
        r = " < ".join(f"{c[1]}" for c in ch[:3]) if ch else "?"
    else:
        r = " < ".join(f"{c[1]}:{c[2]}" for c in ch[:2]) if ch else "?"
    roles[r] += ms; nops[r] += count[name]
tot = sum(roles.values())
print(f"busy {tot:.1f} ms/step, wall {wall:.1f}")
for r, ms in roles.most_common(int(os.environ.get("TOP", 45))):
    print(f"{ms:7.2f} {100*ms/tot:5.1f}% {nops[r]:6.0f} ops  {r}")
