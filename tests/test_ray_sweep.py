"""`kvsieve bench --ray` on a local 2-CPU Ray cluster with a tiny model: the same rows as serially, none lost when a
worker is killed mid-sweep."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'kvsieve[ray]'")

from bench_tiny import TinyLoader, tiny_model  # noqa: E402
from kvsieve.bench.runner import BenchConfig, Runner, row_key  # noqa: E402

HERE = Path(__file__).parent
VOLATILE = {"run_id", "timestamp", "prefill_seconds", "decode_seconds_per_token"}
SWEEP = dict(tasks=["passkey", "multi_passkey"], methods=["full", "snapkv", "zerotuning"], compressions=[0.5],
             lengths=[384], samples=2)  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    """A small local cluster whose workers can import this folder's helpers (bench_tiny)."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), before) if p)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2, logging_level="ERROR",
             log_to_driver=False, configure_logging=False)  # fmt: skip
    yield
    ray.shutdown()
    if before is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = before


@pytest.fixture(scope="module")
def serial_rows(tmp_path_factory):
    """The sweep run in this process, one thread as on the workers."""
    import torch

    loader = TinyLoader()
    model, tokenizer = loader()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("serial")
        return Runner(BenchConfig(**SWEEP, out=str(out)), model, tokenizer).run()
    finally:
        torch.set_num_threads(threads)


def by_key(rows: list[dict]) -> dict:
    return {row_key(r): {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


def lines(out: Path) -> list[str]:
    return (out / "results.jsonl").read_text().splitlines()


def test_ray_rows_equal_serial_rows(cluster, serial_rows, tmp_path):
    _, tokenizer = TinyLoader()()
    runner = Runner(BenchConfig(**SWEEP, out=str(tmp_path)), tokenizer=tokenizer, loader=TinyLoader())
    assert runner.model is None  # the driver never loads the weights
    rows = runner.run(ray="local", workers=2)
    assert len(rows) == len(serial_rows) == runner.total_rows() == len(lines(tmp_path))
    assert by_key(rows) == by_key(serial_rows)  # predictions, scores, bytes: identical
    assert Runner(BenchConfig(**SWEEP, out=str(tmp_path)), tokenizer=tokenizer, loader=TinyLoader()).plan() == []


def test_a_worker_killed_mid_sweep_loses_no_row(cluster, serial_rows, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    loader = TinyLoader(pid_dir=str(pids), delay=0.02)  # ~1 s per unit, so the kill lands inside one
    _, tokenizer = TinyLoader()()
    out = tmp_path / "out"
    runner = Runner(BenchConfig(**SWEEP, out=str(out)), tokenizer=tokenizer, loader=loader)
    killed: list[int] = []

    def progress(n: int) -> None:
        if (
            not killed and (out / "results.jsonl").exists()
        ):  # first unit back: kill a worker (one is inside its next unit)
            victim = int(sorted(pids.glob("*.pid"))[0].read_text())
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    rows = runner.run(progress=progress, ray="local", workers=2)
    assert killed, "no worker was killed"
    assert len(list(pids.glob("*.pid"))) == 3  # two workers, and the killed one restarted
    keys = [row_key(json.loads(line)) for line in lines(out)]
    assert len(keys) == len(set(keys)) == runner.total_rows()  # none lost, none twice
    assert by_key(rows) == by_key(serial_rows)


def test_ray_missing_is_a_clear_error(monkeypatch):
    import sys

    from kvsieve.bench.distributed import import_ray
    from kvsieve.errors import KVSieveError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(KVSieveError, match=r"pip install 'kvsieve\[ray\]'"):
        import_ray()


def test_tiny_model_helper_is_deterministic():
    a, b = tiny_model(100), tiny_model(100)
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters(), strict=True))
