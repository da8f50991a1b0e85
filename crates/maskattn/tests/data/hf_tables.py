"""Writes hf_tables.txt: Hugging Face T5's `_relative_position_bucket` over a range of
relative positions for several (bidirectional, num_buckets, max_distance) settings, and
BLOOM's ALiBi slopes for 1..=40 heads, as `tests/hf_tables.rs` pins them.

Run from this directory with a Python that has torch and transformers:
    python hf_tables.py > hf_tables.txt
"""

import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.t5.modeling_t5 import T5Attention

CONFIGS = [
    (True, 32, 128),  # T5's default
    (False, 32, 128),  # T5 decoder
    (True, 64, 256),
    (False, 16, 64),
    (True, 8, 20),
    (False, 10, 37),
    (True, 6, 7),
    (False, 128, 1024),
    # Settings where computing the log branch in f64 instead of torch's f32 moves a
    # boundary (found by comparing the two over many settings).
    (True, 18, 128),
    (True, 40, 320),
    (False, 108, 128),
]
REL = torch.arange(-1100, 1101, dtype=torch.long)



def runs(xs):
    """Run-length form: `bucket*count` for each run, in order."""
    out, prev, n = [], None, 0
    for x in xs:
        if x == prev:
            n += 1
            continue
        if prev is not None:
            out.append(f"{prev}*{n}")
        prev, n = x, 1
    out.append(f"{prev}*{n}")
    return " ".join(out)


print("# t5 bidirectional num_buckets max_distance: runs bucket*count over rel = -1100..=1100")
for bidir, n, m in CONFIGS:
    # A [L_q, L_k]-shaped tensor, as T5's compute_bias passes it (contiguous: torch's
    # vectorised log runs on it as in the model).
    b = T5Attention._relative_position_bucket(REL[None, :], bidirectional=bidir, num_buckets=n, max_distance=m)
    print("t5", int(bidir), n, m, runs(int(x) for x in b[0]))
print("# heads: ALiBi slopes as f32 bit patterns (BLOOM's build_alibi_tensor)")
for heads in range(1, 41):
    mask = torch.ones(1, 2)
    # alibi = slopes * positions; position 1 holds the slopes themselves.
    a = build_alibi_tensor(mask, heads, torch.float32)[:, 0, 1]
    print("alibi", heads, " ".join(str(int(x)) for x in a.view(torch.int32)))
