#!/usr/bin/env python3
"""Side-by-side: the grid of `maskattn bench --suite` against PyTorch's
scaled_dot_product_attention on the CPU, same shapes, masks, dtypes, passes and thread
count, in one run.

    python3 -m venv ~/venv-torch && ~/venv-torch/bin/pip install torch
    cargo build --release
    ~/venv-torch/bin/python bench/compare_torch.py --threads 2 --rounds 3
    ~/venv-torch/bin/python bench/compare_torch.py --threads 2 --isa avx2   # as on an AVX2 server

Each cell is timed back to back (maskattn, then PyTorch) so that both see the same state of
a shared machine; with --rounds N the whole grid is run N times and each side's median over
the rounds is reported (each time itself the median of --reps calls).

The header names what the figures hold for: the CPU model (as `maskattn bench` reports it),
each side's thread count, PyTorch's version, the date, and the limits measured at the calls.
Grouped-query cells give PyTorch K and V with their own H_kv heads (enable_gqa); bf16 cells
hand both sides bf16 tensors.

PyTorch is never a dependency of the project or its tests; this script is for measuring.
Ratios are PyTorch time / maskattn time (above 1: maskattn is faster).
"""

import argparse
import datetime
import json
import os
import platform
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
    p.add_argument("--rounds", type=int, default=1, help="times the grid is run; medians are reported")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    isa_switch.add_argument(p)
    return p.parse_args()


def maskattn_case(args, case):
    """Times one grid case with `maskattn bench`; returns its JSON row."""
    b, h, l, d = case["shape"]
    cmd = [
        args.bin, "--threads", str(args.threads), "bench", "--json", "--reps", str(args.reps),
        "--shape", f"{b},{h},{l},{d}", "--lk", str(case["lk"]), "--kv-heads", str(case["kv_heads"]),
        "--mask", case["mask"], "--dtype", case["dtype"], "--pass", case["pass"],
    ]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
    head, row = json.loads(lines[0]), json.loads(lines[1])
    # The row must be the listed case: a flag the binary ignored would time another cell and
    # compare it with PyTorch on this one.
    got = (row["batch"], row["heads"], row["kv_heads"], row["lk"], row["d"], row["mask"], row["dtype"], row["pass"])
    want = (b, h, case["kv_heads"], case["lk"], d, case["mask"], case["dtype"], case["pass"])
    if got != want:
        sys.exit(f"compare_torch.py: maskattn timed {got}, the grid lists {want}")
    return head, row


def torch_case(torch, F, row, reps):
    """Times one suite row with PyTorch; returns median ms."""
    b, h, hkv, lq, lk, d = (row[k] for k in ("batch", "heads", "kv_heads", "lq", "lk", "d"))
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[row["dtype"]]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    # Grouped-query cells keep H_kv heads in K and V (enable_gqa below): PyTorch's CPU flash
    # kernel takes them as they are, as ours does, rather than copies repeated to H heads.
    k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    assert h % hkv == 0 and q.dtype == k.dtype == v.dtype == dtype, (row, q.dtype)
    mask, causal = None, False
    m = row["mask"]
    i = torch.arange(lq)[:, None] + (lk - lq)  # bottom-right aligned query positions
    j = torch.arange(lk)[None, :]
    if m == "full":
        pass
    elif m == "causal":
        if lq == lk:
            causal = True
        else:
            mask = j <= i
    elif m == "key-padding":
        mask = (j < lk - lk // 4).expand(lq, lk)
    elif m.startswith("window("):
        left, right = (int(x) for x in m[len("window("):-1].split(","))
        mask = (j >= i - left) & (j <= i + right)
    elif m == "documents":
        doc_q = torch.arange(lq) * 4 // lq
        doc_k = torch.arange(lk) * 4 // lk
        mask = doc_q[:, None] == doc_k[None, :]
    else:
        raise SystemExit(f"compare_torch.py: no PyTorch equivalent for mask {m!r}")
    gqa = {"enable_gqa": True} if hkv != h else {}
    fwd_bwd = row["pass"] == "fwd+bwd"
    if fwd_bwd:
        for t in (q, k, v):
            t.requires_grad_(True)
        dout = torch.randn(b, h, lq, d, generator=g).to(dtype)

    def once():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **gqa)
        if fwd_bwd:
            # Fresh gradients each call, as a training step after zero_grad() (set_to_none):
            # no accumulation into the last call's, which maskattn does not do either.
            for t in (q, k, v):
                t.grad = None
            out.backward(dout)

    once()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        once()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def cpu_model(head):
    """The CPU model as `maskattn bench` names it in its header (model name, family, model),
    else the same read here from /proc/cpuinfo, else what Python's platform module knows."""
    cpu = head.get("peaks", {}).get("cpu")
    if cpu and cpu != "unknown":
        return cpu
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]  # the first processor
    except OSError:
        first = ""
    field = dict((k.strip(), v.strip()) for k, _, v in (l.partition(":") for l in first.splitlines()))
    name = field.get("model name") or platform.processor() or "unknown"
    if field.get("cpu family") and field.get("model"):
        # A virtual machine may name only the vendor's line; the numbers tell the generation.
        name += f" (family {field['cpu family']}, model {field['model']})"
    return name


def main():
    isa_switch.apply_before_torch()
    args = parse_args()
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        sys.exit("compare_torch.py needs PyTorch: pip install torch (in a virtual environment outside the repo)")
    torch.set_num_threads(args.threads)
    cmd = [args.bin, "bench", "--suite", "--list"]
    cases = [json.loads(x) for x in subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()]
    # rounds × cases: (maskattn row, PyTorch ms); the machine's practical peak per call.
    ours, theirs, peaks, head = [[] for _ in cases], [[] for _ in cases], [], None
    limits = {}  # limit name -> GFLOP/s measured at each call
    for rnd in range(args.rounds):
        for n, case in enumerate(cases):
            print(f"round {rnd + 1}/{args.rounds}, case {n + 1}/{len(cases)}", end="\r", file=sys.stderr)
            head, row = maskattn_case(args, case)
            peaks.append(head["practical_peak_gflops"])
            if row.get("limit"):
                limits.setdefault(row["limit"], []).append(row["limit_gflops"])
            ours[n].append(row)
            theirs[n].append(torch_case(torch, F, row, args.reps))
    took = time.monotonic() - t0
    print(file=sys.stderr)
    paths = head.get("peaks", {}).get("paths", {})
    lim = "; ".join(
        f"{name} {statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})" for name, v in sorted(limits.items())
    )
    # The header: what a figure below holds for (docs/design.md section 5: the CPU model, the
    # thread count, the peer's version) and when it was taken. In Markdown a list, so that
    # each line stays a line.
    header = [
        f"maskattn against PyTorch scaled_dot_product_attention, {started:%Y-%m-%d %H:%M} UTC "
        f"({len(cases)} cells, {args.rounds} round(s) of {args.reps} reps each side, medians; took {took:.0f} s)",
        f"CPU: {cpu_model(head)}; AMX: {'yes' if paths.get('amx_bf16') else 'absent'}",
        f"threads: maskattn {head.get('threads', args.threads)}, PyTorch {torch.get_num_threads()}",
        f"maskattn kernels on {head['isa']}, matrix products on {head.get('products', 'gemm')} (MASKATTN_ISA={os.environ.get('MASKATTN_ISA', 'unset')}; bf16 {'on vdpbf16ps' if paths.get('bf16_dot') else 'widened to f32'}); "
        f"limits GFLOP/s (median, range over the calls): {lim}; "
        f"2048^3 f32 product {statistics.median(peaks):.0f} GFLOP/s ({min(peaks):.0f}-{max(peaks):.0f})",
        isa_switch.torch_side(torch),
    ]
    for line in header:
        print(f"- {line}" if args.markdown else line)
    print()
    sep = " | " if args.markdown else "  "
    cols = ["B,H/Hkv,Lq,Lk,d", "mask", "dtype", "pass", "maskattn ms", "PyTorch ms", "ratio", "useful GF/s", "% limit", "% gemm", "tiles skipped"]
    widths = [20, 14, 5, 7, 11, 10, 6, 11, 7, 6, 13]
    if args.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join(" --- " for _ in cols) + "|")
    else:
        print(sep.join(c.ljust(w) for c, w in zip(cols, widths)))
    for rows, times in zip(ours, theirs):
        r = rows[0]
        ms = statistics.median(x["median_ms"] for x in rows)
        t = statistics.median(times)
        useful = r["useful_gflops"] * r["median_ms"] / ms
        cells = [
            f"{r['batch']},{r['heads']}/{r['kv_heads']},{r['lq']},{r['lk']},{r['d']}",
            r["mask"],
            r["dtype"],
            r["pass"],
            f"{ms:.2f}",
            f"{t:.2f}",
            f"{t / ms:.2f}",
            f"{useful:.0f}",
            # Each call's own fraction (its time against the limit and the product timed in
            # the same process, moments apart), median over the rounds: on a shared machine a
            # limit from another moment can put a cell above 100%.
            f"{100 * statistics.median(x['limit_fraction'] for x in rows):.0f}%" if r.get("limit") else "-",
            f"{100 * statistics.median(x['peak_fraction'] for x in rows):.0f}%",
            f"{100 * r['tiles_skipped']:.0f}%",
        ]
        if args.markdown:
            print("| " + " | ".join(cells) + " |")
        else:
            print(sep.join(c.ljust(w) for c, w in zip(cells, widths)))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
