"""INT8 vs 16-bit GEMM and linear layers: prints achieved TFLOP/s (TOPS) per shape.

    python benchmarks/int8_gemm.py [--out results.json]

On a GPU: bf16 ``torch.mm`` vs ``torch._int_mm`` (int8 x int8 -> int32) and nn.Linear in bf16
vs the INT8 linears of ``strategies.kernels.int8``. On a CPU it reports what the CPU runs: fp32
and ``_int_mm`` (exact, but not a fast path), at smaller sizes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn


def _time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="write the figures as JSON")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 8192, 8192)] if cuda else [(512, 512, 512),
                                                                                           (1024, 1024, 1024)]
    repeats = 20 if cuda else 3
    env = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}
    print(f"{env['device']}, torch {env['torch']}")
    rows = []
    for m, k, n in sizes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(n, k, device=device, dtype=dtype)
        a8 = torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8)
        b8 = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
        flops = 2 * m * n * k
        t16 = _time(lambda: a @ b.t(), repeats, sync)
        t8 = _time(lambda: torch._int_mm(a8, b8.t()), repeats, sync)
        row = {"kind": "gemm", "m": m, "k": k, "n": n, "dtype": str(dtype).replace("torch.", ""),
               "tflops_16bit": flops / t16 / 1e12, "tops_int8": flops / t8 / 1e12, "speedup": t16 / t8}
        rows.append(row)
        print(f"GEMM {m}x{k}x{n}: {row['dtype']} {row['tflops_16bit']:.3g} TFLOP/s, int8 {row['tops_int8']:.3g} TOPS "
              f"(int8 {row['speedup']:.2f}x the speed)")
    from strategies.kernels.int8 import MODES

    tokens, hidden, ffn = (8192, 4096, 14336) if cuda else (256, 512, 1024)
    linear = nn.Linear(hidden, ffn, bias=False, device=device, dtype=dtype)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    flops = 2 * tokens * hidden * ffn
    with torch.no_grad():
        base = _time(lambda: linear(x), repeats, sync)
        rows.append({"kind": "linear", "mode": str(dtype).replace("torch.", ""), "tokens": tokens, "in": hidden,
                     "out": ffn, "seconds": base, "tflops": flops / base / 1e12})
        print(f"Linear {tokens}x{hidden}->{ffn} {rows[-1]['mode']}: {base * 1e3:.2f} ms")
        for mode, cls in MODES.items():
            q = cls(linear)
            seconds = _time(lambda: q(x), repeats, sync)
            rows.append({"kind": "linear", "mode": mode, "tokens": tokens, "in": hidden, "out": ffn,
                         "seconds": seconds, "tflops": flops / seconds / 1e12, "vs_16bit": base / seconds})
            print(f"Linear {mode}: {seconds * 1e3:.2f} ms ({base / seconds:.2f}x the speed of the unquantized layer)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
