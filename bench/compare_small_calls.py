#!/usr/bin/env python3
"""Small-call overhead: maskattn.attention against torch's scaled_dot_product_attention at
the shapes where fixed per-call costs dominate (a decode step of an L-layer model makes L
calls of one query each), forward alone and forward + backward, same threads.

    python bench/compare_small_calls.py --threads 2 --reps 60
    python bench/compare_small_calls.py --threads 2 --isa avx2   # both sides as on an AVX2 server

Shapes ``B,H_q,L_q,L_k,d[,causal]``. Each cell times ours and SDPA alternately, call by
call, so both see the same state of a shared machine; medians of --reps calls after
warm-ups (and the minima, which show how much a busy machine inflated them). Ratio =
ours / SDPA medians (at or below 1: no slower). Benchmarks report, never assert.

``--clock cpu`` times the process's CPU time (all its threads) instead of wall-clock time:
on a machine shared with other work, waiting for a core then counts for neither side, so
A/B comparisons of two builds hold up under load (with ``--threads 1``, where no idle
worker spins, it is the work itself).
"""

import argparse
import platform
import statistics
import time

import isa_switch

isa_switch.apply_before_torch()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import maskattn  # noqa: E402
from maskattn import _maskattn as native  # noqa: E402

SHAPES = "1,1,48,48,64;2,4,96,96,32,causal;1,12,1,700,64"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = {}
            for line in f:
                if ":" in line:
                    key, val = (x.strip() for x in line.split(":", 1))
                    info.setdefault(key, val)
        return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')})"
    except OSError:
        return platform.processor() or "unknown CPU"


def parse_shape(text):
    parts = text.split(",")
    b, h, lq, lk, d = (int(x) for x in parts[:5])
    return b, h, lq, lk, d, len(parts) > 5 and parts[5] == "causal"


def pair_times(ours, peer, reps, clock=time.perf_counter):
    for _ in range(5):
        ours()
        peer()
    a, b = [], []
    for _ in range(reps):
        t = clock()
        ours()
        a.append(clock() - t)
        t = clock()
        peer()
        b.append(clock() - t)
    return [f(x) * 1e6 for x in (a, b) for f in (statistics.median, min)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--shapes", default=SHAPES, help="';'-separated B,H_q,L_q,L_k,d[,causal]")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall-clock or process CPU time")
    isa_switch.add_argument(p)
    args = p.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    maskattn.set_num_threads(args.threads)
    print(f"# {cpu_model()}; torch {torch.__version__}; {args.threads} threads each; median of {args.reps} calls, {args.clock} time")
    print(f"# {isa_switch.ours_from_package(native)}")
    print(f"# {isa_switch.torch_side(torch)}")
    # The minima show how much a busy machine inflated the medians.
    print(f"{'shape (B,H,Lq,Lk,d)':<26} {'autograd':<9} {'ours µs':>9} {'SDPA µs':>9} {'ratio':>6}   {'min ours':>9} {'min SDPA':>9}")
    for text in args.shapes.split(";"):
        b, h, lq, lk, d, causal = parse_shape(text)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(b, h, lq, d, generator=g)
        k = torch.randn(b, h, lk, d, generator=g)
        v = torch.randn(b, h, lk, d, generator=g)
        mask = maskattn.causal() if causal else None
        name = f"{b},{h},{lq},{lk},{d}" + (" causal" if causal else "")
        for grad in (False, True):
            qs, ks, vs = (t.clone().requires_grad_(grad) for t in (q, k, v))
            dout = torch.randn(b, h, lq, d, generator=g)

            def ours():
                out = maskattn.attention(qs, ks, vs, mask)
                if grad:
                    out.backward(dout)

            def sdpa():
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
                if grad:
                    out.backward(dout)

            with torch.set_grad_enabled(grad):
                a, amin, s, smin = pair_times(ours, sdpa, args.reps, clock)
            label = "fwd+bwd" if grad else "fwd"
            print(f"{name:<26} {label:<9} {a:9.0f} {s:9.0f} {a / s:6.2f}   {amin:9.0f} {smin:9.0f}")


if __name__ == "__main__":
    main()
