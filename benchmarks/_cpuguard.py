"""How much CPU *other* processes used while a benchmark ran (Linux /proc/stat).

The machines are 2-core VMs shared with whatever else the session runs (tests, builds):
one busy neighbour halves a 2-thread benchmark. Every benchmark JSON carries
`cpu_guard = {"other_busy_cores": ..., "steal_pct": ...}` so contaminated runs show.
other_busy_cores = (all non-idle CPU time - this process's own and its children's) / wall;
about 0 on a quiet machine, up to nproc when fully contended.
"""

from __future__ import annotations

import os
import platform
import time


def _stat():
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal guest guest_nice
    busy = v[0] + v[1] + v[2] + v[5] + v[6]
    steal = v[7] if len(v) > 7 else 0
    return busy, steal, sum(v[:8])


def _own() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuGuard:
    def __enter__(self):
        self.s0, self.o0, self.t0 = _stat(), _own(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s1, self.o1, self.t1 = _stat(), _own(), time.perf_counter()
        return False

    def result(self) -> dict:
        if self.s0 is None or self.s1 is None:
            return {}
        hz = os.sysconf("SC_CLK_TCK")
        wall = self.t1 - self.t0
        busy = (self.s1[0] - self.s0[0]) / hz
        total = max(1, self.s1[2] - self.s0[2])
        return {
            "other_busy_cores": round(max(0.0, busy - (self.o1 - self.o0)) / wall, 3),
            "steal_pct": round(100 * (self.s1[1] - self.s0[1]) / total, 2),
            "wall_s": round(wall, 2),
        }


def cpu_model() -> str:
    """The CPU's model name (recorded with every benchmark result)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
