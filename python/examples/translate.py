#!/usr/bin/env python3
"""Train a small encoder-decoder translator with attn_implementation="maskattn".

    pip install "./python[transformers]"
    python python/examples/translate.py                     # 700 steps, then SDPA's run
    python python/examples/translate.py --steps 1000 --threads 2 --no-compare

The "language pair" is generated: a source sentence is a random run of word tokens, its
translation the same words in reverse order, each through a fixed substitution (a shift
cipher) — a task that needs the cross attention to find the right source word for every
target position. Sentences have different lengths, so every batch is right-padded: the
encoder's padding mask, the decoder's causal mask and the cross attention over the encoder's
padding all run through maskattn, and so does attention dropout (BART applies it while
training). The model is a BART built from a config (no download).

The same run then repeats on SDPA from the same initial weights, and the step times and
losses are printed side by side; last, a few sentences are translated with greedy
``generate`` by the maskattn-trained model.
"""

import argparse
import statistics
import time

import torch

import maskattn
import maskattn.transformers

PAD, BOS, EOS = 0, 1, 2
FIRST_WORD = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=32, help="sentence pairs per step")
    p.add_argument("--words", type=int, default=40, help="words in each language")
    p.add_argument("--min-len", type=int, default=4)
    p.add_argument("--max-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--no-compare", action="store_true", help="skip the SDPA run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def translate_words(src, words):
    """The reference translation: reversed, each word shifted by 7 in the vocabulary."""
    return [FIRST_WORD + (w - FIRST_WORD + 7) % words for w in reversed(src)]


def batch_of(g, args):
    """``args.batch`` sentence pairs, right-padded: encoder ids and mask, and labels
    (``-100`` on padding; BART makes the decoder's inputs by shifting them right)."""
    srcs, tgts = [], []
    for _ in range(args.batch):
        n = int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=g))
        src = torch.randint(FIRST_WORD, FIRST_WORD + args.words, (n,), generator=g).tolist()
        srcs.append(src + [EOS])
        tgts.append(translate_words(src, args.words) + [EOS])

    def pad(rows, value):
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    ids = pad(srcs, PAD)
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": pad(tgts, -100)}


def make_model(impl, args):
    from transformers import AutoModelForSeq2SeqLM, BartConfig

    maskattn.transformers.register()  # idempotent: "maskattn" for from_config
    cfg = BartConfig(
        vocab_size=FIRST_WORD + args.words,
        d_model=128,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        max_position_embeddings=64,
        dropout=0.1,
        attention_dropout=0.1,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation=impl).train()


def progress(items, desc, enabled):
    """tqdm's bar where tqdm is installed, else a line every tenth of the run."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(items, desc=desc, unit="step")
        except ImportError:
            pass
    return _Plain(items, desc, enabled)


class _Plain:
    def __init__(self, items, desc, enabled):
        self.items, self.desc, self.enabled, self.info = items, desc, enabled, ""

    def __iter__(self):
        every = max(1, len(self.items) // 10)
        for n, x in enumerate(self.items):
            yield x
            if self.enabled and ((n + 1) % every == 0 or n + 1 == len(self.items)):
                print(f"{self.desc}: {n + 1}/{len(self.items)} {self.info}", flush=True)

    def set_postfix(self, **kw):
        self.info = " ".join(f"{k}={v}" for k, v in kw.items())


def train(impl, batches, args):
    """Trains a fresh model on ``batches``; returns the model, step times and losses."""
    model = make_model(impl, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    times, losses = [], []
    torch.manual_seed(1)  # the same dropout draws order for every run
    bar = progress(batches, f"{impl:8s}", not args.no_progress)
    for batch in bar:
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", step_ms=f"{1e3 * times[-1]:.1f}")
    return model, times, losses


def show_translations(model, args, n=4):
    g = torch.Generator().manual_seed(123)
    batch = batch_of(g, argparse.Namespace(**{**vars(args), "batch": n}))
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=args.max_len + 2,
            num_beams=1,
            do_sample=False,
        )
    right = 0
    for src, hyp, ref in zip(batch["input_ids"], out, batch["labels"]):
        src = [w for w in src.tolist() if w >= FIRST_WORD]
        hyp = [w for w in hyp.tolist() if w >= FIRST_WORD]
        ref = [w for w in ref.tolist() if w >= FIRST_WORD]
        right += hyp == ref
        print(f"  {src} -> {hyp} {'ok' if hyp == ref else f'(want {ref})'}")
    print(f"{right} of {n} translated exactly")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    maskattn.set_num_threads(args.threads)
    maskattn.transformers.register()

    g = torch.Generator().manual_seed(0)
    batches = [batch_of(g, args) for _ in range(args.steps)]
    print(f"{args.steps} steps of {args.batch} sentence pairs ({args.min_len}-{args.max_len} words), {args.threads} threads")

    runs = {"maskattn": train("maskattn", batches, args)}
    if not args.no_compare:
        runs["sdpa"] = train("sdpa", batches, args)

    # The first step also warms up (allocations, thread pools): the median is of the rest.
    print(f"\n{'':8s} {'median step':>12s} {'first loss':>11s} {'last loss':>10s}")
    for impl, (_, times, losses) in runs.items():
        print(f"{impl:8s} {1e3 * statistics.median(times[1:] or times):10.1f}ms {losses[0]:11.4f} {losses[-1]:10.4f}")
    if "sdpa" in runs:
        ours, theirs = runs["maskattn"][1], runs["sdpa"][1]
        speed = statistics.median(theirs[1:] or theirs) / statistics.median(ours[1:] or ours)
        print(f"maskattn's step is {speed:.2f}x as fast as SDPA's (dropout draws differ, so the losses do too)")
    print("\ngreedy translations by the maskattn-trained model:")
    show_translations(runs["maskattn"][0], args)
    return runs


if __name__ == "__main__":
    main()
