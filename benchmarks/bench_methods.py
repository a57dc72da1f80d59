"""Time every merge method on one large tensor, as a ratio to ``linear`` measured in the same run.

Also in the same run:
- exact top-k by ``mx.partition`` threshold (what TIES/breadcrumbs use) against ``mx.argsort``,
- the float32 two-level reduction behind slerp's norms against numpy float64.

Inputs: a base and 3 fine-tunes (base + 0.01·noise), float32, shape ROWS×COLS (a Llama-7B
``up_proj`` is 11008×4096). Each method is run ``--repeat`` times after one warm-up; the median
is reported.

    python benchmarks/bench_methods.py                  # 2048×4096
    python benchmarks/bench_methods.py --rows 11008 --cols 4096
"""

from __future__ import annotations  # noqa: I001  (mlxmerge before mlx.core)

import argparse
import statistics
import time

import mlxmerge  # noqa: F401  (before mlx.core)
import mlx.core as mx
import numpy as np

from mlxmerge.merge.methods.common import norm, top_k_mask
from mlxmerge.merge.registry import METHODS, REQUIRED, call_method, derive_key


def timed(fn, repeat: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    shape = (args.rows, args.cols)
    mx.random.seed(0)
    base = mx.random.normal(shape)
    xs = [base + 0.01 * mx.random.normal(shape) for _ in range(3)]
    mx.eval(base, *xs)
    print(f"device {mx.default_device()}, tensor {shape} float32, 3 models + base")

    results = {}
    for name, spec in METHODS.items():
        n = spec.max_models or 3
        params = {k: [1.0 / n] * n for k, v in spec.tensor_params.items() if v is REQUIRED}
        params.update({k: 0.5 for k, v in spec.global_params.items() if v is REQUIRED})
        if "density" in spec.tensor_params:
            params["density"] = 0.5
        keys = [derive_key(0, "bench", i) for i in range(n)]
        b = base if spec.base == "required" else None

        def run(name=name, n=n, params=params, keys=keys, b=b):
            return call_method(name, xs[:n], b, params, keys)

        results[name] = timed(run, args.repeat)
    ref = results["linear"]
    print(f"{'method':<18}{'seconds':>10}{'× linear':>10}")
    for name, s in results.items():
        print(f"{name:<18}{s:>10.3f}{s / ref:>10.2f}")

    a = mx.abs(xs[0] - base)
    k = a.size // 5
    t_part = timed(lambda: top_k_mask(a, k), args.repeat)
    t_sort = timed(lambda: mx.argsort(a.reshape(-1))[-k:], args.repeat)
    print(
        f"top-20% mask: partition {t_part:.3f}s, argsort {t_sort:.3f}s, ratio {t_sort / t_part:.2f}"
    )

    ref64 = np.linalg.norm(np.array(xs[0]).astype(np.float64))
    flat32 = float(mx.sqrt(mx.sum(xs[0].reshape(-1) ** 2)))
    linalg = float(mx.linalg.norm(xs[0].reshape(-1)))
    ours = float(norm(xs[0]))
    print(
        f"Frobenius norm rel. error vs float64: blocked fsum {abs(ours - ref64) / ref64:.2e}, "
        f"flat mx.sum {abs(flat32 - ref64) / ref64:.2e}, "
        f"mx.linalg.norm {abs(linalg - ref64) / ref64:.2e}"
    )


if __name__ == "__main__":
    main()
