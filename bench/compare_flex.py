#!/usr/bin/env python3
"""Side-by-side with PyTorch FlexAttention (the peer that skips blocks): window(256,0),
4 documents, chunked causal attention (chunks of 512) and a 7 x 7 neighbourhood on the
square patch grid of L positions, at (1,8,4096,64) f32, against `maskattn bench` on the
same cases.

    ~/venv-torch/bin/python bench/compare_flex.py --threads 2
    ~/venv-torch/bin/python bench/compare_flex.py --threads 2 --isa avx2   # as on an AVX2 server

FlexAttention is compiled with `torch.compile` (inductor, which needs a C++ compiler); the
compile time of each new mask is reported apart from the run time. Its CPU backward is
attempted and reported as unavailable if it fails. PyTorch is never a dependency of the
project or its tests; this script is for measuring. Ratios are FlexAttention time /
maskattn time (above 1: maskattn is faster).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import isa_switch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default="target/release/maskattn", help="the maskattn binary")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shape", default="1,8,4096,64", help="B,H,L,d; L a multiple of 4")
    p.add_argument("--masks", default="window,documents,chunks,neighbourhood",
                   help="comma-separated subset of window, documents, chunks, neighbourhood")
    isa_switch.add_argument(p)
    return p.parse_args()


def ours(args, mask, pass_):
    cmd = [args.bin, "--threads", str(args.threads), "bench", "--json", "--reps", str(args.reps),
           "--shape", args.shape, "--mask", mask, "--pass", pass_]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
    return json.loads(lines[1])["median_ms"]


def timed(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    isa_switch.apply_before_torch()
    args = parse_args()
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        sys.exit(f"compare_flex.py needs PyTorch with FlexAttention: {e}")
    torch.set_num_threads(args.threads)
    b, h, l, d = (int(x) for x in args.shape.split(","))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, l, d, generator=g) for _ in range(3))
    doc_len = l // 4  # 4 equal documents, as `maskattn bench` packs them

    def window(b_, h_, i, j):
        return (j <= i) & (j >= i - 256)

    def documents(b_, h_, i, j):
        # Comparisons only: of the forms tried on the development machine this was the
        # fastest (111 ms; `i // n == j // n` 157 ms; a lookup in a captured tensor of
        # document ids about 2 s).
        start = j - j % doc_len
        return (i >= start) & (i < start + doc_len)

    def chunks(b_, h_, i, j):
        # Causal within chunks of 512: maskattn's `causal & chunks(512)`.
        return (j <= i) & (j >= i - i % 512)

    side = int(l ** 0.5)
    grid = f"neighbourhood({side},{side},3)"

    def neighbourhood(b_, h_, i, j):
        # The `side x side` patch grid in raster order, rows and columns within 3.
        return ((i // side - j // side).abs() <= 3) & ((i % side - j % side).abs() <= 3)

    cases = {
        "window": ("window(256,0)", window),
        "documents": ("documents", documents),
        "chunks": ("causal & chunks(512)", chunks),
        "neighbourhood": (grid, neighbourhood),
    }
    chosen = [cases[m] for m in args.masks.split(",")]
    if side * side != l and grid in [c[0] for c in chosen]:
        sys.exit(f"neighbourhood needs a square number of positions, not L = {l}")

    print(f"threads {args.threads}; PyTorch {torch.__version__}; shape {args.shape} f32")
    print(isa_switch.ours_from_binary(args.bin))
    print(isa_switch.torch_side(torch))
    print("| mask | pass | maskattn ms | FlexAttention ms | ratio | Flex compile s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, fn in chosen:
        # A fresh compile per mask, with static shapes: a second mask in the same compiled
        # function otherwise ends in a slower recompiled kernel.
        torch._dynamo.reset()
        compiled = torch.compile(flex_attention, dynamic=False)
        t0 = time.perf_counter()
        bm = create_block_mask(fn, b, h, l, l, device="cpu")
        out = compiled(q, k, v, block_mask=bm)
        compile_s = time.perf_counter() - t0
        flex_fwd = timed(lambda: compiled(q, k, v, block_mask=bm), args.reps)
        mine = ours(args, name, "fwd")
        print(f"| {name} | fwd | {mine:.2f} | {flex_fwd:.2f} | {flex_fwd / mine:.2f} | {compile_s:.1f} |")
        try:
            qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
            dout = torch.randn_like(out)

            def fwd_bwd():
                compiled(qg, kg, vg, block_mask=bm).backward(dout)

            flex_fb = timed(fwd_bwd, args.reps)
            mine = ours(args, name, "fwd+bwd")
            print(f"| {name} | fwd+bwd | {mine:.2f} | {flex_fb:.2f} | {flex_fb / mine:.2f} | |")
        except Exception as e:  # noqa: BLE001 - report whatever the peer cannot do
            msg = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
            print(f"| {name} | fwd+bwd | {ours(args, name, 'fwd+bwd'):.2f} | unavailable ({msg}) | | |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
