"""Where a sweep's groups run: `precision_lab.sweep.in_process` (the default) or a Ray cluster.

Why Ray: spreading hundreds of groups over many machines needs scheduling by resources, retries of tasks
whose worker died, and a way to bring results home; Ray is a well-kept distributed engine that does all of
it, where hand-rolled process management would do a fraction, worse. The lab adds only the mapping: each
shape group is one Ray task (`num_cpus` stated per task), its records and per-step metrics arrays come back
to the driver as the task's return value, and the driver alone writes the results store (atomically, as
in-process), so workers need no shared file system. A task whose worker process dies (killed, out of
memory, node lost) is run again by Ray, up to `max_retries` times; its group's records are stored once,
when the one successful attempt returns.

Ray is an optional dependency (`pip install 'precision-lab[ray]'`); nothing here imports it until a Ray
executor is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from precision_lab.errors import UserError

EXECUTORS = ("inprocess", "ray")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'precision-lab[ray]' (or pip install ray); "
                        "valid executors without it: inprocess") from None
    return ray


def _in_worker(task: Callable[[Any], Any], cpus: int, item: Any) -> Any:
    """Runs inside a Ray worker: one XLA host device per CPU the task was given (so the group's vmapped
    members spread over them as they do in-process), then the task itself."""
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", cpus)
        except (RuntimeError, ValueError):  # this worker already ran a task: jax has started
            pass
    return task(item)


def ray_executor(address: str | None = None, *, num_cpus: int = 1, max_retries: int = 3,
                 runtime_env: dict | None = None):
    """An executor for `run_sweep` that runs each group as one Ray task.

    address: a running cluster ("auto", "HOST:6379", "ray://HOST:10001"); None starts a local Ray instance
      (or joins the one $RAY_ADDRESS names). If Ray is already initialised in this process it is used as is.
    num_cpus: CPUs reserved per task (per group); the worker's JAX gets that many host devices.
    max_retries: how often Ray reruns a task whose worker process died. A Python exception inside a task
      is not retried (it would fail again): it ends the sweep with that error, after the groups already
      returned are stored.
    """
    if not isinstance(num_cpus, int) or num_cpus < 1:
        raise UserError(f"--cpus-per-task {num_cpus!r}: must be a positive integer")
    if not isinstance(max_retries, int) or max_retries < 0:
        raise UserError(f"--max-retries {max_retries!r}: must be a non-negative integer")
    ray = _import_ray()

    def execute(task: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=address, runtime_env=runtime_env)
            except ConnectionError as err:
                raise UserError(f"--address {address!r}: cannot connect to a Ray cluster ({' '.join(str(err).split())}); "
                                "start one with `ray start --head` and pass its address, or omit --address "
                                "for a local one") from None
        remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=False)(_in_worker)
        pending = {}
        try:
            for item in items:  # submit every group at once: Ray schedules them as CPUs free up
                pending[remote.remote(task, num_cpus, item)] = item
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                item = pending.pop(ref)
                yield item, ray.get(ref)
        finally:
            for ref in pending:  # an error or a closed generator: do not leave groups running for nobody
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()

    return execute


def make_executor(name: str, *, address: str | None = None, num_cpus: int = 1, max_retries: int = 3):
    """The executor called `name` (EXECUTORS); None for in-process (run_sweep's default)."""
    if name == "inprocess":
        if address is not None:
            raise UserError("--address needs --executor ray (the in-process executor runs here)")
        return None
    if name == "ray":
        return ray_executor(address, num_cpus=num_cpus, max_retries=max_retries)
    from precision_lab.errors import unknown_choice

    raise unknown_choice("executor", name, EXECUTORS)

