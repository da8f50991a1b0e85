#!/usr/bin/env python3
"""Train a small Llama-style model on packed documents with attn_implementation="maskattn".

    pip install "./python[transformers]"
    python python/examples/finetune_packed.py                      # 20 steps of 1 x 2048 tokens
    python python/examples/finetune_packed.py --steps 100 --seq 4096 --threads 2

The documents come from a random bigram language (each token has a few likely successors),
so the loss has something to fall to. They are packed into rows: position_ids restart at
every document and each document's first token is not predicted (label -100). maskattn keeps
the documents apart from the position_ids alone, in training mode with the config's default
use_cache=True. The same run then repeats on SDPA from the same initial weights, with
use_cache=False — the only setting in which transformers builds SDPA a documents mask (with a
cache object it silently lets packed documents see each other) — and the two step times and
losses are printed side by side.
"""

import argparse
import statistics
import time

import torch

import maskattn
import maskattn.transformers


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq", type=int, default=2048, help="tokens per packed row")
    p.add_argument("--rows", type=int, default=1, help="packed rows per step")
    p.add_argument("--mean-doc", type=int, default=256, help="mean document length")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--no-compare", action="store_true", help="skip the SDPA run")
    return p.parse_args()


VOCAB = 512


def bigram_language(g, successors=4):
    """Each token's next token is one of a few, with fixed probabilities."""
    nxt = torch.randint(1, VOCAB, (VOCAB, successors), generator=g)
    probs = torch.softmax(torch.randn(VOCAB, successors, generator=g) * 2, dim=-1)
    return nxt, probs


def document(g, language, length):
    nxt, probs = language
    tokens = [int(torch.randint(1, VOCAB, (1,), generator=g))]
    choices = torch.multinomial(probs, length, replacement=True, generator=g)  # [VOCAB, length]
    for t in range(1, length):
        tokens.append(int(nxt[tokens[-1], choices[tokens[-1], t]]))
    return tokens


def packed_batch(g, language, rows, seq, mean_doc):
    """``rows`` rows of ``seq`` tokens, documents packed end to end (the last one cut)."""
    ids, pos, labels = [], [], []
    for _ in range(rows):
        r_ids, r_pos, r_lab = [], [], []
        while len(r_ids) < seq:
            n = min(max(8, int(torch.empty(1).exponential_(1 / mean_doc, generator=g))), seq - len(r_ids))
            doc = document(g, language, n)
            r_ids += doc
            r_pos += range(n)
            r_lab += [-100] + doc[1:]
        ids.append(r_ids)
        pos.append(r_pos)
        labels.append(r_lab)
    return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos), "labels": torch.tensor(labels)}


def make_model(impl):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).train()


def train(impl, batches, args, use_cache=None):
    from tqdm import tqdm

    model = make_model(impl)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    times, losses = [], []
    bar = tqdm(batches, desc=f"{impl:8s}", unit="step")
    for batch in bar:
        t = time.perf_counter()
        loss = model(**batch, use_cache=use_cache).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", step_s=f"{times[-1]:.2f}")
    return times, losses


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    maskattn.set_num_threads(args.threads)
    maskattn.transformers.register()

    g = torch.Generator().manual_seed(0)
    language = bigram_language(g)
    batches = [packed_batch(g, language, args.rows, args.seq, args.mean_doc) for _ in range(args.steps)]
    docs = int((batches[0]["position_ids"] == 0).sum())
    print(f"{args.steps} steps of {args.rows} x {args.seq} tokens ({docs} documents in the first batch), {args.threads} threads")

    runs = {"maskattn": train("maskattn", batches, args)}
    if not args.no_compare:
        runs["sdpa"] = train("sdpa", batches, args, use_cache=False)

    # The first step also warms up (allocations, thread pools): the median is of the rest.
    print(f"\n{'':8s} {'median step':>12s} {'first loss':>11s} {'last loss':>10s}")
    for impl, (times, losses) in runs.items():
        print(f"{impl:8s} {statistics.median(times[1:] or times):11.3f}s {losses[0]:11.4f} {losses[-1]:10.4f}")
    if "sdpa" in runs:
        ours, theirs = runs["maskattn"], runs["sdpa"]
        speed = statistics.median(theirs[0][1:] or theirs[0]) / statistics.median(ours[0][1:] or ours[0])
        drift = max(abs(a - b) for a, b in zip(ours[1], theirs[1]))
        print(f"maskattn's step is {speed:.2f}x as fast as SDPA's; the losses differ by at most {drift:.2e}")


if __name__ == "__main__":
    main()
