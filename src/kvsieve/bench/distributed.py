"""The bench's work units on a Ray cluster: one actor per worker loads the model once and runs whole units.

Only the driver writes ``results.jsonl``: a unit's rows come back when the unit is done, so a worker that dies
mid-unit leaves nothing half-written. Ray restarts a dead actor (``max_restarts``) and retries the unit it was running
(``max_task_retries``); a unit still lost after that is reported, and the next run of the same command resumes it.
Actors ask Ray for one GPU each when the cluster has GPUs (Ray then sets ``CUDA_VISIBLE_DEVICES`` for them), else for
``cpus_per_worker`` CPUs, which is also the actor's torch thread count.

Ray is imported only here, only when ``kvsieve bench --ray`` is used (``pip install 'kvsieve[ray]'``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable

from ..errors import KVSieveError
from .units import RunInfo, UnitRunner, WorkUnit

RESTARTS = 3  # per actor; a unit is retried as often


def import_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise KVSieveError("--ray needs Ray, which is not installed; pip install 'kvsieve[ray]'") from None
    return ray


class BenchWorker:
    """A Ray actor: the model, loaded once, and the same :class:`UnitRunner` the serial bench uses."""

    def __init__(self, loader: Callable, info: RunInfo, threads: int):
        import torch

        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = loader(device)
        self.runner = UnitRunner(model, tokenizer, info)

    def run(self, unit: WorkUnit) -> list[dict]:
        return list(self.runner.run(unit))

    def pid(self) -> int:
        return os.getpid()


def run_on_ray(
    units: list[WorkUnit],
    info: RunInfo,
    loader: Callable,
    take: Callable[[dict], None],
    *,
    address: str = "local",
    workers: int | None = None,
) -> None:
    """Run ``units`` on Ray actors, handing every row to ``take`` in this process as its unit completes."""
    ray = import_ray()
    if not units:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=None if address == "local" else address,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
        )
    actors: list = []
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        n = workers or gpus or cpus
        threads = max(1, cpus // n)
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": threads}
        worker = ray.remote(BenchWorker).options(**options, max_restarts=RESTARTS, max_task_retries=RESTARTS)
        actors = [worker.remote(loader, info, threads) for _ in range(min(n, len(units)))]
        _dispatch(ray, actors, units, take)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()


def _dispatch(ray, actors: list, units: list[WorkUnit], take: Callable[[dict], None]) -> None:
    """One unit in flight per actor; a finished unit's rows go to ``take`` and its actor gets the next unit."""
    from ray.exceptions import RayActorError, RayTaskError

    queue = deque(units)
    inflight: dict = {}  # object ref -> (unit, actor)
    lost: list[WorkUnit] = []

    def submit(actor) -> None:
        unit = queue.popleft()
        inflight[actor.run.remote(unit)] = (unit, actor)

    for actor in actors:
        if queue:
            submit(actor)
    while inflight:
        [ref], _ = ray.wait(list(inflight), num_returns=1)
        unit, actor = inflight.pop(ref)
        try:
            rows = ray.get(ref)
        except RayActorError:  # the actor died more often than it may restart: it is gone, its unit is lost
            lost.append(unit)
            if not inflight and queue:  # no live actor left to run the rest
                lost += queue
                queue.clear()
            continue
        except RayTaskError as err:  # the unit itself raised: the same error the serial bench would raise
            cause = err.cause if isinstance(getattr(err, "cause", None), Exception) else err
            raise cause from None
        for row in rows:
            take(row)
        if queue:
            submit(actor)
    if lost:
        raise KVSieveError(
            f"{len(lost)} work unit(s) were lost with their Ray workers after {RESTARTS} restarts; every finished row "
            "is saved: rerun the same command to run the rest"
        )
