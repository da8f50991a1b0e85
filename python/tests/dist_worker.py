"""The spawned side of test_distributed.py: one process of a gloo group on 127.0.0.1.

Each job runs every case of its list in one group (one spawn for many cases, to keep the
tests quick) and saves what it got to ``rank{r}.pt`` in the job's folder; the test process
checks it there against its own references. Nothing is asserted here: a worker that raises
saves the traceback instead, and the test reports it.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Two cores shared by every rank: one kernel thread and one torch thread each.
THREADS = 1


# ---- the masks of the cases, as the package under test builds them ----


def mask_mod(b, h, q_idx, kv_idx):
    """A head-dependent FlexAttention-style mask: causal, with every fourth diagonal per head
    hidden (row 0 of head 0 sees nothing: a row with LSE −∞ across the ring)."""
    return (kv_idx <= q_idx) & ((q_idx + kv_idx + h) % 4 != 0)


def build_mask(spec, B, H, L):
    import maskattn

    kind = spec["kind"]
    if kind == "full":
        return None
    if kind == "causal":
        return maskattn.causal()
    if kind == "window":
        return maskattn.window(spec["left"], spec["right"])
    if kind == "prefix":
        return maskattn.prefix(spec["p"])
    if kind == "documents":
        return maskattn.documents(spec["ids"]) & maskattn.causal()
    if kind == "key_padding":
        return maskattn.key_padding(spec["lengths"])
    if kind == "mask_mod":
        return mask_mod
    if kind == "mask_mod_block":
        return maskattn.from_mask_mod(mask_mod, B, H, L, L)
    raise ValueError(kind)


# ---- a small model, the same in the test process and under DDP ----


class TinyModel(torch.nn.Module):
    """Embedding, one attention layer through maskattn.attention (causal), an MLP, logits."""

    def __init__(self, vocab=11, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.GELU(), torch.nn.Linear(32, dim))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, attend=None):
        import maskattn

        b, l = tokens.shape
        x = self.emb(tokens)
        q, k, v = self.qkv(x).view(b, l, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = (attend or (lambda q, k, v: maskattn.attention(q, k, v, maskattn.causal())))(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, l, -1))
        x = x + self.mlp(x)
        return self.head(x)


def train_data(steps=4, batch=4, length=24, vocab=11):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (batch, length + 1), generator=g) for _ in range(steps)]


def single_process_losses():
    """The reference: the whole batch and sequence in one process."""
    torch.manual_seed(0)
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for tokens in train_data():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def ddp_losses(rank, world):
    """Data parallel: each rank its slice of the batch under DistributedDataParallel; the
    loss of a step is the ranks' mean (what the single process computes on the whole)."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TinyModel())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for tokens in train_data():
        mine = tokens.tensor_split(world)[rank]
        logits = model(mine[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mine[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def hf_losses(rank=None, world=None):
    """A tiny Llama with attn_implementation="maskattn" (the transformers plug-in), 3 SGD
    steps on the whole batch (``rank`` None) or under DDP on a slice of it; the ranks'
    mean loss per step. None where transformers is not installed."""
    try:
        import transformers

        import maskattn.transformers as mt
    except ImportError:
        return None
    mt.register()
    cfg = transformers.LlamaConfig(
        vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="maskattn")
    if rank is not None:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for tokens in train_data(steps=3):
        mine = tokens if rank is None else tokens.tensor_split(world)[rank]
        loss = model(input_ids=mine, labels=mine).loss  # equal slices: the mean of means is the mean
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        if rank is not None:
            dist.all_reduce(total)
            total /= world
        losses.append(total.item())
    return losses


def cp_losses(rank, world, layout="zigzag"):
    """Context parallel: each rank its shard of every sequence, the attention by
    context_parallel_attention; replicated parameters' gradients summed over the group."""
    import maskattn
    from maskattn.distributed import context_parallel_attention, shard

    torch.manual_seed(0)
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    attend = lambda q, k, v: context_parallel_attention(q, k, v, maskattn.causal(), layout=layout)  # noqa: E731
    for tokens in train_data():
        inp, tgt = shard(tokens[:, :-1], 1, layout=layout), shard(tokens[:, 1:], 1, layout=layout)
        logits = model(inp, attend)
        n = tokens[:, 1:].numel()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum") / n
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
    return losses


# ---- the jobs ----


def run_cases(rank, world, cases):
    import maskattn
    from maskattn import distributed as md

    results = []
    for case in cases:
        try:
            results.append(run_case(rank, world, case, maskattn, md))
        except Exception as e:  # saved and reported by the test
            results.append({"error": f"{type(e).__name__}: {e}", "type": type(e).__name__, "trace": traceback.format_exc()})
    return results


def run_case(rank, world, case, maskattn, md):
    layout = case["layout"]
    q, k, v = case["q"], case["k"], case["v"]
    B, H, L, _ = q.shape
    if case.get("lengths"):  # contiguous shards of lengths of the case's choice
        at = sum(case["lengths"][:rank])
        cut = lambda t: t.narrow(2, at, case["lengths"][rank])  # noqa: E731
    else:
        cut = lambda t: md.shard(t, 2, layout=layout)  # noqa: E731
    leaves = [cut(t).detach().clone().requires_grad_(True) for t in (q, k, v)]
    mods = {}
    params = {}
    for name in ("alibi_slopes", "sinks"):
        if name in case:
            params[name] = case[name].clone().requires_grad_(True)
            mods[name] = params[name]
    if "table" in case:
        params["table"] = case["table"].clone().requires_grad_(True)
        mods["relative_bias"] = maskattn.RelativeBias(params["table"], *case["rel_cfg"])
    if "softcap" in case:
        mods["softcap"] = case["softcap"]
    mask = build_mask(case["mask"], B, H, L)
    md.reset_stats()
    out, lse = md.context_parallel_attention(*leaves, mask, layout=layout, return_lse=True, **mods)
    fwd_stats = md.stats()
    dout, dlse = cut(case["dout"]), cut(case["dlse"].unsqueeze(-1)).squeeze(-1)
    fin = torch.isfinite(lse)
    loss = (out * dout).sum() + torch.where(fin, lse * dlse, torch.zeros(())).sum()
    loss.backward()
    got = {
        "out": out.detach(),
        "lse": lse.detach(),
        "dq": leaves[0].grad,
        "dk": leaves[1].grad,
        "dv": leaves[2].grad,
        "fwd_stats": fwd_stats,
        "stats": md.stats(),
    }
    for name, p in params.items():
        got["d" + name] = p.grad
    return got


def run_errors(rank, world, job):
    """Bad input that every rank sees the same way: each ends with its typed error."""
    import maskattn
    from maskattn import distributed as md

    got = {}
    x = torch.randn(1, 2, 5 + 10 * rank, 8)  # zigzag would split 20 positions 10 + 10
    try:
        md.context_parallel_attention(x, x, x, maskattn.causal(), layout="zigzag")
        got["mismatch"] = None
    except Exception as e:
        got["mismatch"] = (type(e).__name__, str(e))
    y = torch.randn(1, 2 + rank, 6, 8)
    try:
        md.context_parallel_attention(y, y, y)
        got["heads"] = None
    except Exception as e:
        got["heads"] = (type(e).__name__, str(e))
    # The group still works after the errors: a plain call succeeds on every rank.
    z = torch.randn(1, 2, 6, 8)
    got["after"] = md.context_parallel_attention(z, z, z, maskattn.causal()).shape
    return got


def run_peer_failure(rank, world, job, folder):
    """Rank 0 calls; rank 1 either never calls (silent until rank 0 is done) or dies."""
    import maskattn
    from maskattn import distributed as md

    x = torch.randn(1, 2, 8, 8)
    if rank == 0:
        t0 = time.monotonic()
        try:
            md.context_parallel_attention(x, x, x, maskattn.causal())
            return {"error": None, "seconds": time.monotonic() - t0}
        except Exception as e:
            return {"type": type(e).__name__, "error": str(e), "seconds": time.monotonic() - t0}
        finally:
            open(os.path.join(folder, "rank0.done"), "w").close()
    if job == "dies":
        os._exit(3)
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(folder, "rank0.done")) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {}


def main(rank, world, port, job, folder, timeout_s):
    import maskattn

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(THREADS)
    maskattn.set_num_threads(THREADS)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        if job == "cases":
            got = {"cases": run_cases(rank, world, torch.load(os.path.join(folder, "cases.pt"), weights_only=False))}
            got["errors"] = run_errors(rank, world, job)
            if world == 2:
                got["ddp"] = ddp_losses(rank, world)
                got["cp_train"] = cp_losses(rank, world)
                got["hf_ddp"] = hf_losses(rank, world)
        elif job in ("silent", "dies"):
            got = run_peer_failure(rank, world, job, folder)
        else:
            raise ValueError(job)
    except Exception:
        got = {"crash": traceback.format_exc()}
    torch.save(got, os.path.join(folder, f"rank{rank}.pt"))
    if job == "cases":
        dist.destroy_process_group()
    # After a peer failure the group cannot be shut down cleanly: leave without waiting.
    os._exit(0)
