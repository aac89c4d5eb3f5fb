"""Wall time of one bench sweep on a local Ray cluster with 1 and with 2 workers (same run, same rows).

Usage: python benchmarks/bench_scaling.py [--model smollm2-135m] [--tasks passkey,niah_single_number]
       [--methods full,snapkv,streaming_llm] [--samples 2] [--length 1024] [--workers 1,2]

Each configuration runs ``--rounds`` times, the order alternating, and its fastest round counts. Each worker is a
Ray actor that loads the model once and gets ``cpus // workers`` torch threads, so on a 2-core
machine 1 worker uses 2 threads and 2 workers 1 thread each: the ratio is what spreading work units buys over
intra-op threading. Model loading inside the workers is included (it is part of what a sweep costs). Every
configuration writes its own results directory; the script checks that they hold the same rows (predictions,
scores, bytes). Needs ``pip install 'kvsieve[ray]'``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kvsieve.bench.runner import BenchConfig, Runner, row_key

VOLATILE = {"run_id", "timestamp", "prefill_seconds", "decode_seconds_per_token"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="passkey,niah_single_number")
    parser.add_argument("--methods", default="full,snapkv,streaming_llm")
    parser.add_argument("--compression", default="0.5")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (default: 2)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, order alternating; the fastest counts")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows_of: dict[int, dict] = {}
    seconds: dict[int, float] = {}
    counts = [int(x) for x in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):  # alternate the order, so warm-up costs (page cache) hit both alike
            for n in counts if round_ % 2 == 0 else counts[::-1]:
                config = BenchConfig(
                    model=args.model, tasks=args.tasks.split(","), methods=args.methods.split(","),
                    compressions=[float(x) for x in args.compression.split(",")], lengths=[args.length],
                    samples=args.samples, out=str(Path(tmp) / f"round-{round_}-workers-{n}"),
                )  # fmt: skip
                runner = Runner(config)
                t0 = time.perf_counter()
                rows = runner.run(ray="local", workers=n)
                took = time.perf_counter() - t0
                seconds[n] = min(seconds.get(n, took), took)
                rows_of[n] = {row_key(r): {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}
                print(f"round {round_ + 1}, {n} worker(s): {len(rows)} rows in {took:.1f} s", flush=True)
    ray.shutdown()
    base = min(seconds)
    for n in sorted(seconds):
        same = "same rows" if rows_of[n] == rows_of[base] else "ROWS DIFFER"
        speedup = seconds[base] / seconds[n]
        print(f"workers={n}: {seconds[n]:7.1f} s   speed-up vs {base} worker(s): {speedup:.2f}x   {same}")


if __name__ == "__main__":
    main()
