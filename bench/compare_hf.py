#!/usr/bin/env python3
"""A Llama-style model through Hugging Face transformers: attn_implementation "maskattn"
against "sdpa" and "eager", on the same threads, in one run.

1. training step (forward + backward of the causal-LM loss) on
   - packed: one row of --packed tokens holding --docs documents (position_ids restart per
     document). maskattn runs with the config's default use_cache=True (it reads the
     documents from position_ids itself); sdpa and eager run with use_cache=False, the only
     setting in which transformers builds them a documents mask (with a cache object they
     let documents see each other), so all three compute the same thing;
   - causal: --batch rows of --seq tokens, no padding;
   - padded: the same rows right-padded to random lengths (at least half of --seq);
2. greedy generate: --batch prompts of --prompt tokens, --new tokens each; tokens/s.

    python bench/compare_hf.py --threads 2
    python bench/compare_hf.py --threads 2 --only packed --impls maskattn,sdpa

Needs transformers (pip install "./python[transformers]"). Medians of --reps after one
warm-up; within a case the implementations run back to back. Ratios are the peer's time over
maskattn's, or maskattn's tokens/s over the peer's (above 1: maskattn is faster). Benchmarks report, never assert.
"""

import argparse
import statistics
import time

import torch

import maskattn
import maskattn.transformers

CASES = ("packed", "causal", "padded", "generate")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--impls", default="maskattn,sdpa,eager")
    p.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--packed", type=int, default=4096)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    return p.parse_args()


def model_for(args, impl):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=4 * args.d_model,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.packed, args.seq, args.prompt + args.new),
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)


def median_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def packed_batch(args, g):
    cuts = torch.randperm(args.packed - 1, generator=g)[: args.docs - 1].add(1).sort().values
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([args.packed])])).tolist()
    ids = torch.randint(1, args.vocab, (1, args.packed), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = ids.clone()
    labels[0, torch.tensor([0] + cuts.tolist())] = -100  # no prediction across a document boundary
    return {"input_ids": ids, "position_ids": pos, "labels": labels}, f"1 x {args.packed}, {args.docs} documents {lengths}"


def causal_batch(args, g, padded):
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g)
    am = torch.ones_like(ids)
    what = f"{args.batch} x {args.seq} causal"
    if padded:
        lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=g)
        am = (torch.arange(args.seq) < lengths[:, None]).long()
        what += f", right-padded to {lengths.tolist()}"
    labels = ids.masked_fill(am == 0, -100)
    return {"input_ids": ids * am, "attention_mask": am, "labels": labels}, what


def train_step(model, batch, use_cache):
    def step():
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=use_cache).loss.backward()

    return step


def report(title, times, unit, better_low=True):
    print(f"\n{title}")
    base = times.get("maskattn")
    for impl, t in times.items():
        ratio = ""
        if base is not None and impl != "maskattn":
            ratio = f"   maskattn {t / base if better_low else base / t:.2f}x as fast"
        print(f"  {impl:9s} {t:10.3f} {unit}{ratio}")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    maskattn.set_num_threads(args.threads)
    maskattn.transformers.register()
    impls = args.impls.split(",")
    only = set(args.only.split(","))
    print(
        f"transformers Llama-style: {args.layers} layers, d_model {args.d_model}, {args.heads} heads "
        f"({args.kv_heads} kv), vocab {args.vocab}; {args.threads} threads (torch and maskattn); "
        f"torch {torch.__version__}"
    )
    models = {impl: model_for(args, impl).train() for impl in impls}
    g = torch.Generator().manual_seed(0)
    cases = []
    if "packed" in only:
        cases.append(packed_batch(args, g) + (True,))
    if "causal" in only:
        cases.append(causal_batch(args, g, padded=False) + (False,))
    if "padded" in only:
        cases.append(causal_batch(args, g, padded=True) + (False,))
    for batch, what, packed in cases:
        times = {}
        for impl in impls:
            # Packed documents: SDPA and eager see them only without a cache object.
            use_cache = None if impl == "maskattn" or not packed else False
            times[impl] = median_time(train_step(models[impl], batch, use_cache), args.reps)
        report(f"training step (forward + backward), {what}", times, "s")

    if "generate" in only:
        prompts = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=g)
        times = {}
        for impl in impls:
            model = models[impl].eval()

            def gen(model=model):
                with torch.no_grad():
                    model.generate(
                        prompts,
                        attention_mask=torch.ones_like(prompts),
                        max_new_tokens=args.new,
                        min_new_tokens=args.new,
                        do_sample=False,
                    )

            times[impl] = args.batch * args.new / median_time(gen, args.reps)
        report(f"greedy generate, {args.batch} x {args.prompt} prompt, {args.new} new tokens", times, "tokens/s", False)


if __name__ == "__main__":
    main()
