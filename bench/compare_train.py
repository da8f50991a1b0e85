#!/usr/bin/env python3
"""A training step and `generate` of `maskattn train`'s default model against the same
model written in PyTorch, same sizes and threads, side by side.

The twin: token embedding (vocabulary 259), rotary positions (theta 10 000, rotate-half) on
queries and keys, 3 pre-norm blocks of 4-head attention (biased q/k/v/o projections) and a
GELU (tanh form) MLP of 4 x d_model, residuals, a final layer norm, an LM head tied to the
embedding, cross-entropy, global-norm clipping at 1.0 and AdamW (lr 3e-3, weight decay
0.1). Attention is PyTorch's best available way for a documents mask: SDPA with the boolean
mask (`true` = attend), rows packed with documents of random lengths, causal within each.

Ours: `maskattn train --steps N --eval-every N` (its own data, the same shapes), the
"ms/step training" it prints; `generate` from the checkpoint that run wrote, the tokens/s it
prints. Theirs: the median step after warm-up steps; greedy decoding with a KV cache.
Rounds alternate ours and theirs.

    pip install torch numpy   # in a virtual environment outside the repo
    cargo build --release
    python bench/compare_train.py --threads 2 --steps 30 --rounds 3
    python bench/compare_train.py --threads 2 --isa avx2   # both sides as on an AVX2 server

PyTorch is never a dependency of the project or its tests; this script is run by hand.
"""

import argparse
import math
import os
import re
import statistics
import subprocess
import tempfile
import time

import isa_switch

VOCAB, D, LAYERS, HEADS = 259, 128, 3, 4


def build(torch):
    nn, F = torch.nn, torch.nn.functional

    class Rope:
        def __init__(self, hd, theta=10_000.0):
            self.inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)

        def tables(self, offset, n):
            a = torch.arange(offset, offset + n, dtype=torch.float32)[:, None] * self.inv
            a = torch.cat([a, a], -1)
            return a.cos(), a.sin()

        def apply(self, x, cos, sin):
            h = x.shape[-1] // 2
            rot = torch.cat([-x[..., h:], x[..., :h]], -1)
            return x * cos + rot * sin

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

        def attn(self, x, rope, offset, mask, cache):
            b, l, _ = x.shape
            hd = D // HEADS
            split = lambda t: t.view(b, l, HEADS, hd).transpose(1, 2)
            cos, sin = rope.tables(offset, l)
            q = rope.apply(split(self.q(x)), cos, sin)
            k = rope.apply(split(self.k(x)), cos, sin)
            v = split(self.v(x))
            if cache is not None:
                if cache:
                    k = torch.cat([cache[0], k], 2)
                    v = torch.cat([cache[1], v], 2)
                cache[:] = [k, v]
            if mask is None:
                # Decoding: one new query sees every cached key (bottom-right causal).
                y = F.scaled_dot_product_attention(q, k, v, is_causal=l > 1)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.o(y.transpose(1, 2).reshape(b, l, D))

        def forward(self, x, rope, offset=0, mask=None, cache=None):
            x = x + self.attn(self.ln1(x), rope, offset, mask, cache)
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(VOCAB, D)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.ln_f = nn.LayerNorm(D)
            self.rope = Rope(D // HEADS)

        def forward(self, ids, mask=None, offset=0, caches=None):
            x = self.tok(ids)
            for i, b in enumerate(self.blocks):
                x = b(x, self.rope, offset, mask, None if caches is None else caches[i])
            return self.ln_f(x) @ self.tok.weight.t()

    return Twin()


def documents_mask(torch, b, l, gen):
    """[B, 1, L, L] boolean: same document and causal; documents of 5-40 tokens."""
    ids = torch.empty(b, l, dtype=torch.long)
    for r in range(b):
        pos, doc = 0, 0
        while pos < l:
            n = int(torch.randint(5, 41, (1,), generator=gen))
            ids[r, pos : pos + n] = doc
            pos, doc = pos + n, doc + 1
    same = ids[:, :, None] == ids[:, None, :]
    causal = torch.ones(l, l, dtype=torch.bool).tril()
    return (same & causal)[:, None]


def torch_step_ms(torch, batch, seq, steps, warmup=3):
    F = torch.nn.functional
    torch.manual_seed(0)
    model = build(torch)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=3e-3
    )
    gen = torch.Generator().manual_seed(1)
    times = []
    for s in range(warmup + steps):
        ids = torch.randint(0, VOCAB, (batch, seq + 1), generator=gen)
        mask = documents_mask(torch, batch, seq, gen)
        t = time.perf_counter()
        logits = model(ids[:, :-1], mask=mask)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if s >= warmup:
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def torch_generate_tps(torch, prompt_len, tokens):
    torch.manual_seed(0)
    model = build(torch).eval()
    with torch.no_grad():
        caches = [[] for _ in range(LAYERS)]
        ids = torch.randint(0, VOCAB, (1, prompt_len))
        t = time.perf_counter()
        logits = model(ids, caches=caches)
        pos = prompt_len
        for _ in range(tokens):
            nxt = logits[0, -1].argmax().view(1, 1)
            logits = model(nxt, offset=pos, caches=caches)
            pos += 1
        return tokens / (time.perf_counter() - t)


def ours_step_ms(binary, threads, batch, seq, steps, out):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    r = subprocess.run(
        [binary, "train", "--steps", str(steps), "--eval-every", str(10 * steps),
         "--batch", str(batch), "--seq-len", str(seq), "--out", out],
        env=env, check=True, capture_output=True, text=True,
    )
    m = re.search(r"([\d.]+) ms/step training", r.stderr)
    if not m:
        raise SystemExit(f"no step time in:\n{r.stderr}")
    return float(m.group(1))


def ours_generate_tps(binary, threads, checkpoint, prompt, tokens):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    r = subprocess.run(
        [binary, "generate", "--checkpoint", checkpoint, "--prompt", prompt,
         "--max-tokens", str(tokens)],
        env=env, check=True, capture_output=True, text=True,
    )
    m = re.search(r"(\d+) tokens in [\d.]+ s \((\d+) tokens/s", r.stderr)
    if not m:
        raise SystemExit(f"no tokens/s in:\n{r.stderr}")
    return int(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--maskattn", default="target/release/maskattn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    isa_switch.add_argument(ap)
    isa_switch.apply_before_torch()
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}, {a.steps} steps per run, {a.rounds} rounds; torch {torch.__version__}")
    print(isa_switch.ours_from_binary(a.maskattn))
    print(isa_switch.torch_side(torch))
    tmp = tempfile.mkdtemp(prefix="maskattn-compare-train-")
    for batch, seq in [(16, 128), (4, 512)]:
        mine, theirs = [], []
        for _ in range(a.rounds):
            mine.append(ours_step_ms(a.maskattn, a.threads, batch, seq, a.steps, os.path.join(tmp, f"r{seq}")))
            theirs.append(torch_step_ms(torch, batch, seq, a.steps))
        m, t = statistics.median(mine), statistics.median(theirs)
        print(f"step {batch:>2} x {seq:<4}: maskattn {m:7.1f} ms, PyTorch {t:7.1f} ms  ({t / m:.2f}x)")
    # A prompt of the built-in task's letters, no answer separator, so decoding runs on.
    prompt = "abcdbcadcbda" * 2
    mine, theirs, made = [], [], []
    for _ in range(a.rounds):
        n, tps = ours_generate_tps(a.maskattn, a.threads, os.path.join(tmp, "r128"), prompt, a.tokens)
        made.append(n)
        mine.append(tps)
        theirs.append(torch_generate_tps(torch, len(prompt), max(n, 1)))
    m, t = statistics.median(mine), statistics.median(theirs)
    print(f"generate ({min(made)}-{max(made)} tokens after {len(prompt)}): maskattn {m:.0f} tokens/s, "
          f"PyTorch {t:.0f} tokens/s  ({m / t:.2f}x)")


if __name__ == "__main__":
    main()
