"""Context parallelism on one machine: the ring against one process, time and memory.

    python bench/distributed_ring.py                      # the issue's targets (L = 32,768)
    python bench/distributed_ring.py --length 8192 --reps 1   # a quicker look

Each measurement runs in fresh processes (so peak memory is the run's own):

* ``single``: one process, the kernels on ``--ranks`` threads, ``maskattn.attention``
  forward + backward on the whole sequence;
* ``ring``: ``--ranks`` processes (gloo on 127.0.0.1) of one kernel thread each,
  ``maskattn.distributed.context_parallel_attention`` forward + backward on zigzag shards.

Time is the forward + backward of one call (the slowest rank's, after a barrier), the
best of ``--reps``; memory is each process's peak resident set during the runs (``VmHWM``, reset after the
setup) less its resident set before the inputs were made: its inputs (the whole sequence, or
its shards: each rank makes only its own) and all the attention took.
For the documents mask the script also counts the work each rank does against the full
mask: the pairs of tiles (64 × 64 query × key) the kernels visit, from the block masks.
Prints the CPU and the machine's load beside the figures (other work on the machine
slows both sides).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time


def status_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> None:
    """Starts ``VmHWM`` again from the resident set now (Linux: clear_refs 5), so that the
    peak is the measured call's, not the setup's (a rank makes the whole inputs once)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib(base_kib: int) -> float:
    return (status_kib("VmHWM") - base_kib) / 1024


def inputs(args):
    import torch

    g = torch.Generator().manual_seed(0)
    shape = (1, args.heads, args.length, args.dim)
    q, k, v, dout = (torch.randn(*shape, generator=g) for _ in range(4))
    return q, k, v, dout


def make_mask(args):
    import torch

    import maskattn

    if args.mask == "causal":
        return maskattn.causal()
    if args.mask == "full":
        return None
    # documents: --docs documents of equal length, causal inside each.
    L = args.length
    ids = (torch.arange(L) * args.docs // L).view(1, L)
    return maskattn.documents(ids) & maskattn.causal()


def run_single(args) -> dict:
    import torch

    import maskattn

    torch.set_num_threads(args.ranks)
    maskattn.set_num_threads(args.ranks)
    base = status_kib("VmRSS")
    q, k, v, dout = inputs(args)
    mask = make_mask(args)
    reset_peak()
    best = float("inf")
    for _ in range(args.reps):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        t0 = time.perf_counter()
        out = maskattn.attention(*leaves, mask)
        out.backward(dout)
        best = min(best, time.perf_counter() - t0)
        del out, leaves
    return {"seconds": best, "peak_mib": peak_mib(base)}


def run_rank(args) -> dict:
    import torch
    import torch.distributed as dist

    import maskattn
    from maskattn import distributed as md

    torch.set_num_threads(1)
    maskattn.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    base = status_kib("VmRSS")
    # Each rank makes only its shards (random values: the time does not depend on them),
    # what a model feeding the ring would hold.
    length = sum(b - a for a, b in md._pieces(args.length, world, "zigzag")[rank])
    g = torch.Generator().manual_seed(rank)
    q, k, v, dout = (torch.randn(1, args.heads, length, args.dim, generator=g) for _ in range(4))
    mask = make_mask(args)
    reset_peak()
    best = float("inf")
    for _ in range(args.reps):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        dist.barrier()
        md.reset_stats()
        t0 = time.perf_counter()
        out = md.context_parallel_attention(*leaves, mask)
        out.backward(dout)
        mine = time.perf_counter() - t0
        slowest = torch.tensor([mine])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        best = min(best, slowest.item())
        del out, leaves
    res = {"rank": rank, "seconds": best, "peak_mib": peak_mib(base), "stats": md.stats(),
           "work": tile_work(args, rank, world)}
    dist.destroy_process_group()
    return res


def tile_work(args, rank, world) -> dict:
    """Tile pairs the kernels visit on this rank, with this mask and with the full mask."""
    from maskattn import _maskattn as native
    from maskattn.distributed import _pieces
    from maskattn.masks import _build, _FULL_ID

    mask = make_mask(args)
    ours = _build(_FULL_ID, ()) if mask is None else _build(mask._id, mask._tensors)
    full = _build(_FULL_ID, ())
    L = args.length
    pieces = _pieces(L, world, "zigzag")
    visited = {"mask": 0.0, "full": 0.0}
    for qa, qb in pieces[rank]:
        for s in range(world):
            for ka, kb in pieces[s]:
                for name, m in (("mask", ours), ("full", full)):
                    blk = native.NativeBlockMask.block(m, 1, args.heads, L, L, (qa, qb), (ka, kb))
                    if not blk.all_empty:
                        visited[name] += (1 - blk.skipped_tile_fraction) * (qb - qa) * (kb - ka) / 4096
    return visited


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, role: str) -> list:
    """Runs this script as ``role`` in fresh processes; their JSON results."""
    base = [sys.executable, __file__, "--role", role, "--length", str(args.length), "--heads", str(args.heads),
            "--dim", str(args.dim), "--mask", args.mask, "--docs", str(args.docs), "--reps", str(args.reps),
            "--ranks", str(args.ranks)]
    # Large blocks straight from mmap and back on free (glibc's threshold otherwise grows
    # after the first free and keeps freed tensors resident): the resident set then follows
    # the live tensors, on both sides alike.
    env0 = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    if role == "single":
        out = subprocess.run(base, check=True, capture_output=True, text=True, env=env0).stdout
        return [json.loads(out.strip().splitlines()[-1])]
    port = free_port()
    procs = []
    for r in range(args.ranks):
        env = dict(env0, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                   WORLD_SIZE=str(args.ranks), LOCAL_RANK=str(r))
        procs.append(subprocess.Popen(base, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=3600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed: {[p.returncode for p in procs]}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def machine() -> str:
    cpu = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        cpu = f"{fields.get('Model name', '?').strip()} (family {fields.get('CPU family', '?').strip()}, model {fields.get('Model', '?').strip()}), {os.cpu_count()} CPUs"
    except OSError:
        pass
    return cpu


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--mask", default=None, choices=["causal", "documents", "full"],
                   help="one measurement only (default: causal single and ring, documents and full ring)")
    p.add_argument("--role", default=None, choices=["single", "rank"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "single":
        print(json.dumps(run_single(args)))
        return
    if args.role == "rank":
        print(json.dumps(run_rank(args)))
        return
    print(f"CPU: {machine()}")
    print(f"load before: {os.getloadavg()}")
    shape = f"L={args.length}, H={args.heads}, d={args.dim}, B=1, float32, forward+backward, best of {args.reps}"
    print(shape)
    masks = [args.mask] if args.mask else ["causal", "documents", "full"]
    rows = {}
    for mask in masks:
        args.mask = mask
        if mask == "causal":
            single = spawn(args, "single")[0]
            print(f"causal  1 process x {args.ranks} threads: {single['seconds']:.2f} s, peak +{single['peak_mib']:.0f} MiB")
            rows["single"] = single
        ring = spawn(args, "rank")
        rows[mask] = ring
        t = max(r["seconds"] for r in ring)
        mem = ", ".join(f"+{r['peak_mib']:.0f}" for r in ring)
        print(f"{mask:8s}{args.ranks} ranks x 1 thread (zigzag): {t:.2f} s, peak per rank {mem} MiB; "
              f"tile pairs per rank {[round(r['work']['mask']) for r in ring]} (full mask: {[round(r['work']['full']) for r in ring]}); "
              f"pairs computed/skipped {[(r['stats']['pairs_computed'], r['stats']['pairs_skipped']) for r in ring]}, "
              f"shard hops sent/left out {[(r['stats']['kv_sent'], r['stats']['kv_not_sent']) for r in ring]} (forward + backward)")
        print(f"  load now: {os.getloadavg()}")
    if "single" in rows and "causal" in rows:
        ring = rows["causal"]
        print(f"causal ring / single time: {max(r['seconds'] for r in ring) / rows['single']['seconds']:.2f}x; "
              f"peak per rank / single: {max(r['peak_mib'] for r in ring) / rows['single']['peak_mib']:.2f}x")
    if "documents" in rows:
        docs = rows["documents"]
        for r in docs:
            print(f"documents rank {r['rank']}: {r['work']['mask'] / r['work']['full']:.3f} of full attention's tile pairs"
                  f" ({1 - r['work']['mask'] / r['work']['full']:.1%} less)")
        if "full" in rows:
            print(f"documents / full ring time: {max(r['seconds'] for r in docs) / max(r['seconds'] for r in rows['full']):.3f}x")


if __name__ == "__main__":
    main()
