#!/usr/bin/env python3
"""`maskattn embed` against sentence-transformers (PyTorch) on the same model, sentences and
threads, side by side.

Two sentence-length mixes (4-40 and 40-200 words, seeded), alternating runs (ours, theirs,
ours, ...) so that both see the same state of a shared machine. Ours is timed as the whole
process (start, model load, tokenizer, output included); sentence-transformers as its
`encode` call only, with the model loaded beforehand - the comparison leans their way. The
embeddings must agree: the least cosine between ours and theirs is printed and must be at
least 0.9999.

    pip install sentence-transformers   # in a virtual environment outside the repo
    MODEL=$(bash scripts/fetch-minilm.sh)
    cargo build --release
    python bench/compare_embed.py --model "$MODEL" --threads 2 --rounds 3
    python bench/compare_embed.py --model "$MODEL" --threads 2 --isa avx2   # as on an AVX2 server

PyTorch is never a dependency of the project or its tests; this script is run by hand.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import isa_switch

WORDS = (
    "the a man woman child dog cat is was eating running playing with in on under over "
    "food ball park city river bright dark quickly slowly happy sad old new red blue green "
    "house car tree bread guitar music book table window train station morning evening "
    "scientists discovered ancient language spoken across mountains valleys"
).split()


def sentences(n, lo, hi, seed):
    r = random.Random(seed)
    return [
        " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi))).capitalize() + "."
        for _ in range(n)
    ]


def ours(binary, model, path, threads, batch):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    t = time.perf_counter()
    out = subprocess.run(
        [binary, "embed", "--model", model, "--input", path, "--batch-size", str(batch)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    secs = time.perf_counter() - t
    embs = [json.loads(line)["embedding"] for line in out.stdout.splitlines()]
    return secs, embs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="sentence-transformers model folder")
    ap.add_argument("--maskattn", default="target/release/maskattn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mixes", default="4-40,40-200", help="word-count ranges")
    isa_switch.add_argument(ap)
    isa_switch.apply_before_torch()
    a = ap.parse_args()
    # The folder that holds the model's config.json (what scripts/fetch-minilm.sh prints);
    # its parent, holding it as `model/`, is taken too, where transformers would fail with
    # "Unrecognized model".
    if not os.path.isfile(os.path.join(a.model, "config.json")) and os.path.isfile(os.path.join(a.model, "model", "config.json")):
        a.model = os.path.join(a.model, "model")
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        ap.error(f"--model {a.model}: no config.json there; give the folder scripts/fetch-minilm.sh prints")

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(a.threads)
    st = SentenceTransformer(a.model, device="cpu")
    print(
        f"threads {a.threads}, {a.sentences} sentences per mix, batch {a.batch_size}, "
        f"{a.rounds} rounds; torch {torch.__version__}; CPU: {cpu_name()}"
    )
    print(isa_switch.ours_from_binary(a.maskattn))
    print(isa_switch.torch_side(torch))
    print(f"{'words':>8}  {'maskattn s':>10}  {'s-t s':>8}  {'maskattn/s':>10}  {'s-t/s':>8}  ratio  min cosine")
    ok = True
    for i, mix in enumerate(a.mixes.split(",")):
        lo, hi = map(int, mix.split("-"))
        texts = sentences(a.sentences, lo, hi, seed=i + 1)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(texts) + "\n")
            path = f.name
        st.encode(texts[:64], batch_size=a.batch_size)  # warm-up
        mine, theirs, cos = [], [], 1.0
        for _ in range(a.rounds):
            s, embs = ours(a.maskattn, a.model, path, a.threads, a.batch_size)
            mine.append(s)
            t = time.perf_counter()
            ref = st.encode(texts, batch_size=a.batch_size, convert_to_numpy=True)
            theirs.append(time.perf_counter() - t)
            x = np.asarray(embs, dtype=np.float64)
            y = ref.astype(np.float64)
            c = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            cos = min(cos, float(c.min()))
        os.unlink(path)
        m, t = statistics.median(mine), statistics.median(theirs)
        n = len(texts)
        print(
            f"{mix:>8}  {m:>10.2f}  {t:>8.2f}  {n / m:>10.1f}  {n / t:>8.1f}  "
            f"{t / m:>4.2f}x  {cos:.6f}"
        )
        ok &= cos >= 0.9999
    if not ok:
        print("embeddings disagree (cosine < 0.9999)", file=sys.stderr)
        sys.exit(1)


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
