"""`--isa` for the compare scripts: both sides on one instruction set, and a header line
saying what each side actually ran on.

On a machine with AVX-512, `--isa avx2` measures as an AVX2-only server (AMD Zen 2/3, Intel
without AVX-512) runs both sides:

- maskattn reads `MASKATTN_ISA` (its attention kernels, the candle model's fused ops and its
  f32 matrix products: one switch);
- PyTorch reads `ATEN_CPU_CAPABILITY` once, when torch is imported, so the script re-executes
  itself with both variables set before it imports torch (child processes inherit them).

What ran is read back, not assumed: `torch.backends.cpu.get_cpu_capability()` for PyTorch,
and for maskattn the instruction set its kernels report (`maskattn bench --json` for the
binary, `maskattn._maskattn.kernel_path()` for the Python package). A CPU without the asked
set runs its own (PyTorch falls back silently, maskattn's detection ignores a set it lacks):
the header then shows the difference.

Imported by the scripts next to it (Python puts a script's folder on the path).
"""

import json
import os
import subprocess
import sys

# --isa value -> (MASKATTN_ISA, ATEN_CPU_CAPABILITY)
SETS = {"avx2": ("avx2", "avx2"), "avx512": ("avx512", "avx512")}


def add_argument(parser):
    parser.add_argument(
        "--isa",
        choices=sorted(SETS),
        help="run both sides on this instruction set (MASKATTN_ISA for maskattn's kernels and "
        "matrix products, ATEN_CPU_CAPABILITY for PyTorch); default: each side's own choice",
    )


def _asked(argv):
    for i, a in enumerate(argv):
        if a == "--isa" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--isa="):
            return a.split("=", 1)[1]
    return None


def apply_before_torch():
    """Call before importing torch: with `--isa X` on the command line, makes sure this
    process runs with both variables set, re-executing the script once if they were not."""
    isa = _asked(sys.argv[1:])
    if isa not in SETS:
        return  # absent, or invalid: argparse reports it later
    ours, aten = SETS[isa]
    want = {"MASKATTN_ISA": ours, "ATEN_CPU_CAPABILITY": aten}
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    os.environ.update(want)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable] + sys.argv)


def _env(name):
    return os.environ.get(name, "unset")


def torch_side(torch):
    """PyTorch's kernels as it reports them."""
    return f"PyTorch {torch.__version__} on {torch.backends.cpu.get_cpu_capability()} (ATEN_CPU_CAPABILITY={_env('ATEN_CPU_CAPABILITY')})"


def ours_from_binary(binary):
    """The instruction set `maskattn bench` reports its kernels (and matrix products) on."""
    cmd = [binary, "--threads", "1", "bench", "--json", "--reps", "1", "--shape", "1,1,64,16", "--mask", "full", "--pass", "fwd"]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        isa = json.loads(out.splitlines()[0])["isa"]
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError, IndexError) as e:
        isa = f"unknown ({e})"
    return f"maskattn kernels and matrix products on {isa} (MASKATTN_ISA={_env('MASKATTN_ISA')})"


def ours_from_package(native):
    """The kernel path the Python package reports."""
    return f"maskattn {native.kernel_path()} (MASKATTN_ISA={_env('MASKATTN_ISA')})"
