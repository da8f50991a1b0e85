#!/usr/bin/env python3
"""The innermost loops of a binary that do vector FMAs on one register width, as llvm-mca
input: `objdump -d` the binary, take each backward jump's body, keep those with at least
`--min-fma` FMAs on `--reg` registers (ymm: the AVX2 kernels, zmm: AVX-512) and none on
wider ones, and write each body to `OUT/loop-N.s` with a summary line on stdout.

    cargo build --release -p maskattn --example dense_cpu_time
    python3 bench/fma_loops.py target/release/examples/dense_cpu_time --reg ymm --min-fma 12 --out /tmp/loops
    llvm-mca -mcpu=haswell -iterations=300 /tmp/loops/loop-0.s

(docs/kernels.md, "The AVX2 path", has what the figures were.)
"""
import argparse, collections, os, re, subprocess

ap = argparse.ArgumentParser()
ap.add_argument("binary")
ap.add_argument("--reg", default="ymm", choices=["xmm", "ymm", "zmm"])
ap.add_argument("--min-fma", type=int, default=8)
ap.add_argument("--out", default="/tmp/fma-loops")
a = ap.parse_args()

dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", a.binary],
                     capture_output=True, text=True, check=True).stdout
insns = []  # (address, text, function)
func = "?"
for line in dis.splitlines():
    m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
    if m:
        func = m.group(1)
        continue
    m = re.match(r"^\s+([0-9a-f]+):\s+(.*)$", line)
    if m:
        insns.append((int(m.group(1), 16), m.group(2).split("#")[0].strip(), func))
index = {addr: i for i, (addr, _, _) in enumerate(insns)}
wider = {"xmm": ("%ymm", "%zmm"), "ymm": ("%zmm",), "zmm": ()}[a.reg]
os.makedirs(a.out, exist_ok=True)
seen, n = set(), 0
for i, (addr, text, func) in enumerate(insns):
    m = re.match(r"^j\w+\s+([0-9a-f]+)\b", text)
    if not m or int(m.group(1), 16) >= addr or int(m.group(1), 16) not in index:
        continue
    body = [t for _, t, _ in insns[index[int(m.group(1), 16)]: i + 1]]
    if any("j" == t[0] and t is not body[-1] for t in body):
        continue  # innermost, straight-line bodies only
    fma = [t for t in body if re.match(r"vf(n?)m(add|sub)\w*ps", t) and f"%{a.reg}" in t]
    if len(fma) < a.min_fma or any(w in t for t in body for w in wider):
        continue
    key = tuple(body)
    if key in seen:
        continue
    seen.add(key)
    kinds = collections.Counter(t.split()[0] for t in body)
    path = os.path.join(a.out, f"loop-{n}.s")
    with open(path, "w") as f:
        f.write("\n".join(re.sub(r"\s+[0-9a-f]+ <.*>$", "", t) for t in body[:-1]) + "\n")
    print(f"{path}: {len(body) - 1} insns, {len(fma)} FMAs, "
          f"{kinds.get('vbroadcastss', 0)} broadcasts, in {func[:110]}")
    n += 1
