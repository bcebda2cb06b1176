"""Core CPU benchmark: gate cost (Tables IV, VII, X) and the per-batch routing algorithms.

Why these numbers matter:

* The paper bounds the gate's complexity, C_g < 1e8 multiply-adds per input for detection
  and action recognition and C_g < 1e7 for super-resolution, so that expert selection stays
  cheap enough for an embedded sensor. We report count_macs() for each task's gate next to
  its measured CPU latency, and compare that latency with the "MAC-bound" time, MACs
  divided by this machine's large-matmul multiply-add rate. A ratio near 1 means the gate
  runs as fast as its arithmetic allows; a large ratio means overhead (small batch, depthwise
  conv, memory traffic) dominates, which is the cost a deployment actually pays.
* enforce_bias (Algorithm 1) runs on every gate training step and oracle_assignment gives
  the upper bound on whole evaluation sets; both must stay cheap relative to a training
  step (tens to hundreds of ms), so we time them for batch sizes M and expert counts N.

Run from the repository root:  .venv/bin/python bench/core.py [--quick]
Writes bench/results/core.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bmoe.gating import ACTION_GATE, DETECTION_GATE, SUPERRES_GATE, build_gate, count_macs  # noqa: E402
from bmoe.routing import enforce_bias, oracle_assignment  # noqa: E402

GATES = {  # task -> (spec, paper's bound on C_g)
    "detection": (DETECTION_GATE, 1e8),
    "superres": (SUPERRES_GATE, 1e7),
    "action": (ACTION_GATE, 1e8),
}
RESULTS = Path(__file__).resolve().parent / "results" / "core.json"


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(size: int = 1024, repeats: int = 10) -> float:
    """Multiply-adds per second of a float32 (size x size) @ (size x size) torch.matmul."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    with torch.no_grad():
        return size**3 / median_time(lambda: torch.matmul(a, b), repeats, warmup=3)


def bench_gates(rate: float, repeats: dict[int, int]) -> list[dict]:
    rows = []
    for task, (spec, limit) in GATES.items():
        torch.manual_seed(0)
        gate = build_gate(spec).eval()
        macs = count_macs(gate, spec.input_shape)
        row = {
            "task": task, "input_shape": list(spec.input_shape), "macs": macs,
            "macs_limit": limit, "within_limit": macs < limit,
            "params": sum(p.numel() for p in gate.parameters()),
            "mac_bound_s": macs / rate,
        }
        for batch, reps in repeats.items():
            x = torch.randn(batch, *spec.input_shape)
            with torch.no_grad():
                per_input = median_time(lambda: gate(x), reps, warmup=2) / batch
            row[f"latency_b{batch}_s"] = per_input
            row[f"ratio_b{batch}"] = per_input / row["mac_bound_s"]
        rows.append(row)
    return rows


def bench_routing(Ms: list[int], Ns: list[int], repeats) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    for M in Ms:
        for N in Ns:
            G = torch.softmax(torch.randn(M, N), dim=1)
            b = rng.dirichlet(np.ones(N))  # uniform-ish random simplex vector
            scores = torch.randn(M, N)
            d = rng.uniform(1.0, 10.0, N)  # positive data costs
            d_target = 0.5 * (d.min() + d.max())
            reps = repeats(M)
            rows.append({
                "M": M, "N": N, "repeats": reps,
                "enforce_bias_s": median_time(lambda: enforce_bias(G, b), reps),
                "oracle_assignment_s": median_time(lambda: oracle_assignment(scores, d, d_target), reps),
            })
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt_s(seconds: float) -> str:
    """Seconds as a short human string (us / ms / s)."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds:8.2f} s "


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description="CPU benchmark of the bmoe core. Measures (1) for each task's gate spec "
        "(detection, super-resolution, action): exact multiply-adds per input (count_macs), "
        "parameter count, forward latency per input at batch 1 and 128 (eval, no_grad, median "
        "of repeats) and its ratio to the MAC-bound time (MACs / measured 1024^3 float32 matmul "
        "rate); (2) wall time of enforce_bias (Algorithm 1) and oracle_assignment for batch "
        "sizes M and expert counts N. Prints a table and writes bench/results/core.json.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller M list (128, 1024) and fewer repeats, for a fast check")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)

    if args.quick:
        Ms, gate_reps, mm_reps = [128, 1024], {1: 5, 128: 2}, 5
        routing_reps = lambda M: 3  # noqa: E731
    else:
        Ms, gate_reps, mm_reps = [128, 1024, 8192, 65536], {1: 20, 128: 5}, 10
        routing_reps = lambda M: 15 if M <= 1024 else (7 if M <= 8192 else 3)  # noqa: E731
    Ns = [3, 8, 16]

    t0 = time.perf_counter()
    rate = matmul_rate(repeats=mm_reps)
    gates = bench_gates(rate, gate_reps)
    routing = bench_routing(Ms, Ns, routing_reps)
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick, "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(), "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "matmul_macs_per_s": rate, "gates": gates, "routing": routing,
        "wall_s": time.perf_counter() - t0,
    }

    print(f"torch {result['torch_version']}, {result['num_threads']} threads, {result['cpu_model']}, "
          f"{result['date']}")
    print(f"matmul rate (float32 1024^3): {rate / 1e9:.1f} GMAC/s\n")
    print(f"{'gate':<10} {'MACs':>10} {'limit':>6} {'params':>10} {'MAC-bound':>11} "
          f"{'lat/in b=1':>11} {'ratio':>6} {'lat/in b=128':>12} {'ratio':>6}")
    for g in gates:
        print(f"{g['task']:<10} {g['macs']:>10.3e} {g['macs_limit']:>6.0e} {g['params']:>10,} "
              f"{fmt_s(g['mac_bound_s']):>11} {fmt_s(g['latency_b1_s']):>11} {g['ratio_b1']:>6.1f} "
              f"{fmt_s(g['latency_b128_s']):>12} {g['ratio_b128']:>6.1f}")
    print(f"\n{'M':>6} {'N':>3} {'enforce_bias':>12} {'oracle':>12}")
    for r in routing:
        print(f"{r['M']:>6} {r['N']:>3} {fmt_s(r['enforce_bias_s']):>12} "
              f"{fmt_s(r['oracle_assignment_s']):>12}")
    print(f"\nbenchmark wall time {result['wall_s']:.1f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
