#!/usr/bin/env python3
"""The Python package (`pip install ./python`) against PyTorch on the CPU, from Python:

1. the speed grid — maskattn.attention against scaled_dot_product_attention given the same
   mask as a dense bool tensor, forward and forward+backward;
2. FlexAttention (torch.compile'd) forward on the masks it skips blocks for (its backward
   is unavailable on the CPU), at the --flex-shape;
3. the per-call overhead of maskattn.attention over the bare kernel (the native call with
   a prebuilt block mask and preallocated buffers) at small shapes.

    python bench/compare_python.py --threads 2
    python bench/compare_python.py --threads 2 --grid 1,8,4096,64 --masks window,documents
    python bench/compare_python.py --threads 2 --isa avx2   # both sides as on an AVX2 server

Medians of --reps calls after two warm-ups; each cell runs ours and the peer back to back so
both see the same state of a shared machine. Ratios are peer time / ours (above 1: ours is
faster). Benchmarks report, never assert.
"""

import argparse
import math
import statistics
import sys
import time

import isa_switch

isa_switch.apply_before_torch()  # before torch reads ATEN_CPU_CAPABILITY

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import maskattn  # noqa: E402
from maskattn import _maskattn as native  # noqa: E402
from maskattn.ops import _NATIVE_NO_MODS, _raw, _raw_out  # noqa: E402

GRID = "1,8,1024,64;1,8,2048,64;1,8,4096,64;4,8,512,64"
MASKS = "full,causal,key-padding,window,documents"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--grid", default=GRID, help="';'-separated B,H,L,d shapes")
    p.add_argument("--masks", default=MASKS, help=f"comma-separated subset of {MASKS}")
    p.add_argument("--flex-shape", default="1,8,4096,64", help="B,H,L,d for FlexAttention ('' skips it)")
    p.add_argument("--flex-masks", default="window,documents")
    p.add_argument("--overhead-reps", type=int, default=2000)
    isa_switch.add_argument(p)
    return p.parse_args()


def timed(fn, reps):
    # Two warm-up calls: the first of a peer allocates and plans.
    fn()
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def masks_for(name, b, l):
    """(maskattn mask, the same as a dense bool [1|B, 1, L, L], FlexAttention mask_mod)."""
    i = torch.arange(l).view(l, 1)
    j = torch.arange(l).view(1, l)
    if name == "full":
        return None, None, None
    if name == "causal":
        return maskattn.causal(), j <= i, lambda b_, h_, qi, kv: kv <= qi
    if name == "key-padding":
        # The last quarter of the keys is padding, as in `maskattn bench`.
        n = l - l // 4
        dense = (j < n).expand(l, l)
        return maskattn.key_padding(torch.full((b,), n)), dense, lambda b_, h_, qi, kv: kv < n
    if name == "window":
        return maskattn.window(256, 0), (j <= i) & (j >= i - 256), lambda b_, h_, qi, kv: (kv <= qi) & (kv >= qi - 256)
    if name == "documents":
        # 4 equal documents per row.
        doc = l // 4
        ids = (torch.arange(l) // doc).expand(b, l)
        same = (i // doc) == (j // doc)

        def mod(b_, h_, qi, kv):
            start = kv - kv % doc
            return (qi >= start) & (qi < start + doc)

        return maskattn.documents(ids), same, mod
    raise SystemExit(f"unknown mask {name}")


def grid(args):
    print("| B,H,L,d | mask | pass | maskattn ms | SDPA (bool mask) ms | ratio | skipped tiles |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in args.grid.split(";"):
        b, h, l, d = (int(x) for x in shape.split(","))
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, l, d, generator=g) for _ in range(3))
        dout = torch.randn(b, h, l, d, generator=g)
        for name in args.masks.split(","):
            mask, dense, _ = masks_for(name, b, l)
            block = None if mask is None else mask.compile(b, h, l, l)
            skipped = 0.0 if block is None else block.skipped_tile_fraction
            for pass_ in ("fwd", "fwd+bwd"):
                if pass_ == "fwd":
                    def mine():
                        with torch.no_grad():
                            maskattn.attention(q, k, v, block)

                    def peer():
                        with torch.no_grad():
                            F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
                else:
                    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

                    def mine():
                        maskattn.attention(qg, kg, vg, block).backward(dout)

                    def peer():
                        F.scaled_dot_product_attention(qg, kg, vg, attn_mask=dense).backward(dout)
                a = timed(mine, args.reps)
                p = timed(peer, args.reps)
                print(f"| {shape} | {name} | {pass_} | {a:.2f} | {p:.2f} | {p / a:.2f}x | {100 * skipped:.1f}% |")
                sys.stdout.flush()


def flex(args):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        print(f"FlexAttention unavailable: {e}")
        return
    b, h, l, d = (int(x) for x in args.flex_shape.split(","))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, l, d, generator=g) for _ in range(3))
    print()
    print(f"FlexAttention forward at {args.flex_shape} f32 (its backward is unavailable on the CPU)")
    print("| mask | maskattn ms | FlexAttention ms | ratio | Flex compile s |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.flex_masks.split(","):
        mask, _, mod = masks_for(name, b, l)
        block = mask.compile(b, h, l, l)
        # A fresh compile per mask with static shapes (see bench/compare_flex.py).
        torch._dynamo.reset()
        compiled = torch.compile(flex_attention, dynamic=False)
        t0 = time.perf_counter()
        bm = create_block_mask(mod, b, h, l, l, device="cpu")
        with torch.no_grad():
            compiled(q, k, v, block_mask=bm)
        compile_s = time.perf_counter() - t0

        def mine():
            with torch.no_grad():
                maskattn.attention(q, k, v, block)

        def peer():
            with torch.no_grad():
                compiled(q, k, v, block_mask=bm)

        a = timed(mine, args.reps)
        p = timed(peer, args.reps)
        print(f"| {name} | {a:.2f} | {p:.2f} | {p / a:.2f}x | {compile_s:.1f} |")
        sys.stdout.flush()


def overhead(args):
    print()
    print("Per-call overhead of maskattn.attention over the bare kernel (µs per call, f32; the")
    print("fastest of 5 interleaved rounds, the one other work on a shared machine disturbed least)")
    print("| B,H,L,d | bare kernel µs | attention, no grad µs | overhead µs | attention + autograd graph µs | overhead µs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in ("1,1,64,64", "1,1,16,64", "1,8,128,64"):
        b, h, l, d = (int(x) for x in shape.split(","))
        q, k, v = (torch.randn(b, h, l, d) for _ in range(3))
        qg = q.clone().requires_grad_(True)
        block = maskattn.causal().compile(b, h, l, l)
        out = torch.empty(b, h, l, d)
        lse = torch.empty(b, h, l)
        raw = ((_raw(q), _raw(k), _raw(v)), block._native, 1.0 / math.sqrt(d), _NATIVE_NO_MODS, (_raw_out(out), _raw_out(lse)))

        def bare():
            native.forward(*raw)

        def call():
            with torch.no_grad():
                maskattn.attention(q, k, v, block)

        def call_grad():
            maskattn.attention(qg, k, v, block)

        n = args.overhead_reps
        # Interleaved rounds, so drifts of a shared machine hit each side alike.
        rounds = {f: [] for f in (bare, call, call_grad)}
        for _ in range(5):
            for f in rounds:
                f()
                t = time.perf_counter()
                for _ in range(n // 5):
                    f()
                rounds[f].append((time.perf_counter() - t) / (n // 5) * 1e6)
        bt, ct, gt = (min(rounds[f]) for f in (bare, call, call_grad))
        print(f"| {shape} | {bt:.1f} | {ct:.1f} | {ct - bt:.1f} | {gt:.1f} | {gt - bt:.1f} |")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    maskattn.set_num_threads(args.threads)
    print(f"threads {args.threads}; PyTorch {torch.__version__}; maskattn {maskattn.__version__}; f32")
    print(isa_switch.ours_from_package(native))
    print(isa_switch.torch_side(torch))
    if args.grid:
        grid(args)
    if args.flex_shape:
        flex(args)
    overhead(args)


if __name__ == "__main__":
    main()
