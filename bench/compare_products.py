#!/usr/bin/env python3
"""The model path's f32 matrix products against PyTorch's, at the shapes `maskattn train`
and a 384-wide encoder make, side by side: GFLOP/s of `maskattn_candle::products` (the
`product_shapes` example, as the fused linear layer calls it) and of `torch.mm` on the same
layout, same threads, rounds alternating the two. `--layout` picks the linear layer's
product: `fwd` `x · Wᵀ` (default), `dx` `dy · W`, `dw` `dyᵀ · x` (the weight gradient: the
left operand a transposed row-major matrix).

    cargo build --release -p maskattn-candle --example product_shapes
    python bench/compare_products.py --threads 2 --rounds 3
    python bench/compare_products.py --threads 2 --isa avx2   # both sides as on an AVX2 server
    python bench/compare_products.py --threads 2 --layout dw

PyTorch is never a dependency of the project or its tests; this script is run by hand.
"""

import argparse
import datetime
import statistics
import subprocess
import sys
import time

import isa_switch

EXAMPLE = "target/release/examples/product_shapes"


def ours(args):
    out = subprocess.run([args.bin, str(args.threads), str(args.reps), args.layout], check=True, capture_output=True, text=True).stdout
    rows, isa = {}, "unknown"
    for line in out.splitlines():
        f = line.split()
        if f[0] == "isa":
            isa = " ".join(f[1:])
        else:
            rows[tuple(int(x) for x in f[:3])] = float(f[3])
    return rows, isa


def operands(torch, shape, layout):
    """The two operands of `[m × k] · [k × n]` laid out as `layout` says (see the top)."""
    m, k, n = shape
    if layout == "fwd":
        return torch.randn(m, k), torch.randn(n, k).t()
    if layout == "dx":
        return torch.randn(m, k), torch.randn(k, n)
    return torch.randn(k, m).t(), torch.randn(k, n)


def theirs(torch, shape, reps, layout):
    m, k, n = shape
    a, b = operands(torch, shape, layout)
    for _ in range(5):
        torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times) / 1e9


def main():
    isa_switch.apply_before_torch()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--bin", default=EXAMPLE)
    p.add_argument("--layout", choices=["fwd", "dx", "dw"], default="fwd")
    isa_switch.add_argument(p)
    args = p.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("compare_products.py needs PyTorch: pip install torch (in a virtual environment outside the repo)")
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    mine, peer, isa = {}, {}, None
    for _ in range(args.rounds):
        rows, isa = ours(args)
        for shape, g in rows.items():
            mine.setdefault(shape, []).append(g)
            peer.setdefault(shape, []).append(theirs(torch, shape, args.reps, args.layout))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
    print(f"- f32 products, layout {args.layout}, {started:%Y-%m-%d %H:%M} UTC, {args.rounds} round(s), medians of {args.reps} calls")
    print(f"- CPU: {cpu}; threads: {args.threads} each")
    print(f"- maskattn products on {isa}; {isa_switch.torch_side(torch)}")
    print()
    print("| [m × k] · [k × n] | maskattn GFLOP/s | PyTorch GFLOP/s | ours ÷ PyTorch |")
    print("| --- | --- | --- | --- |")
    for shape in mine:
        a, b = statistics.median(mine[shape]), statistics.median(peer[shape])
        m, k, n = shape
        print(f"| {m} × {k} · {k} × {n} | {a:.1f} | {b:.1f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
