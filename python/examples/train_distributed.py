#!/usr/bin/env python3
"""Train a small language model on packed documents with context and data parallelism.

    torchrun --nproc_per_node 4 python/examples/train_distributed.py --cp 2   # 2 x 2
    torchrun --nproc_per_node 2 python/examples/train_distributed.py          # context parallel, 2 ranks
    torchrun --nproc_per_node 2 python/examples/train_distributed.py --cp 1   # data parallel, 2 ranks

The ranks form ``dp`` replicas of ``cp`` ranks each (``world = cp × dp``). A replica's ranks
share a batch of packed rows and each holds a zigzag shard of every row's sequence: the
attention runs as ``maskattn.distributed.context_parallel_attention`` with the global
documents-and-causal mask (document boundaries fall anywhere, across shards too), so the
pairs of shards the mask hides are neither computed nor sent. Everything else in the model
(embeddings, projections, MLP, loss) is per token and needs no communication. Replicas get
different batches; ``DistributedDataParallel`` over the whole world averages the gradients
(each rank's loss is scaled by ``cp`` so that the average over ``cp × dp`` ranks is the
replicas' mean of their whole-sequence losses).

Gloo on the CPU, one kernel thread per rank by default (``--threads``). The tokens come from
a random bigram language, so the loss has something to fall to.
"""

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import maskattn
from maskattn.distributed import context_parallel_attention, shard


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, default=None, help="ranks per replica (default: 2 when the world size is even, else 1)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=2, help="rows per replica")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1, help="kernel and torch threads per rank")
    return p.parse_args()


class Block(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x, attend):
        b, l, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, l, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = attend(q, k, v)  # [B, H, L_shard, hd]
        x = x + self.proj(a.transpose(1, 2).reshape(b, l, -1))
        return x + self.mlp(self.norm2(x))


class TinyLm(torch.nn.Module):
    def __init__(self, vocab, dim, heads, layers, max_len):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(max_len, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, positions, attend):
        x = self.emb(tokens) + self.pos(positions)
        for blk in self.blocks:
            x = blk(x, attend)
        return self.head(x)


def bigram_batch(g, succ, rows, length, vocab):
    """Packed rows of documents from a bigram language; ``(tokens [rows, L+1], doc ids
    [rows, L+1], positions within each document [rows, L+1])``."""
    tokens = torch.empty(rows, length + 1, dtype=torch.long)
    ids = torch.empty_like(tokens)
    pos = torch.empty_like(tokens)
    for r in range(rows):
        at, doc = 0, 0
        while at < length + 1:
            n = min(int(torch.randint(32, max(33, length // 3), (1,), generator=g)), length + 1 - at)
            t = [int(torch.randint(vocab, (1,), generator=g))]
            for _ in range(n - 1):
                nxt = succ[t[-1], int(torch.randint(succ.shape[1], (1,), generator=g))]
                t.append(int(nxt))
            tokens[r, at : at + n] = torch.tensor(t)
            ids[r, at : at + n] = doc
            pos[r, at : at + n] = torch.arange(n)
            at, doc = at + n, doc + 1
    return tokens, ids, pos


def main():
    args = parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    world, rank = dist.get_world_size(), dist.get_rank()
    cp = args.cp or (2 if world % 2 == 0 else 1)
    if world % cp:
        raise SystemExit(f"--cp {cp} does not divide the world size {world}")
    dp = world // cp
    replica, cp_rank = divmod(rank, cp)
    # Every rank creates every group, in the same order (torch.distributed's rule).
    cp_groups = [dist.new_group(list(range(d * cp, (d + 1) * cp))) for d in range(dp)]
    cp_group = cp_groups[replica]
    torch.set_num_threads(args.threads)
    maskattn.set_num_threads(args.threads)

    torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    model = torch.nn.parallel.DistributedDataParallel(TinyLm(args.vocab, args.dim, args.heads, args.layers, args.seq))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    succ = torch.randint(args.vocab, (args.vocab, 3), generator=torch.Generator().manual_seed(1))
    # One data stream per replica: its cp ranks draw the same batches.
    g = torch.Generator().manual_seed(100 + replica)
    if rank == 0:
        print(f"world {world} = {dp} data-parallel replicas x {cp} context-parallel ranks; "
              f"{args.batch} x {args.seq} tokens per replica and step, {args.threads} thread(s) per rank")
    for step in range(args.steps):
        tokens, ids, pos = bigram_batch(g, succ, args.batch, args.seq, args.vocab)
        inp, tgt = tokens[:, :-1], tokens[:, 1:].clone()
        tgt[ids[:, 1:] != ids[:, :-1]] = -100  # a document's first token is not predicted
        mask = maskattn.documents(ids[:, :-1]) & maskattn.causal()  # the global mask

        def attend(q, k, v):
            return context_parallel_attention(q, k, v, mask, group=cp_group)

        t0 = time.perf_counter()
        sh = lambda t: shard(t, 1, group=cp_group)  # noqa: E731
        logits = model(sh(inp), sh(pos[:, :-1]), attend)
        counted = (tgt != -100).sum()
        loss_sum = F.cross_entropy(logits.reshape(-1, args.vocab), sh(tgt).reshape(-1), ignore_index=-100, reduction="sum")
        (loss_sum * cp / counted).backward()  # DDP averages over cp x dp ranks
        opt.step()
        opt.zero_grad()
        seconds = time.perf_counter() - t0
        report = torch.tensor([loss_sum.item(), float(counted) / cp, seconds])
        dist.all_reduce(report)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            tok_s = dp * args.batch * args.seq / (report[2].item() / world)
            print(f"step {step:3d}  loss {report[0].item() / report[1].item():.4f}  {report[2].item() / world:.2f} s/step  {tok_s:,.0f} tokens/s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
