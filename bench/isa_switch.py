"""`--isa` for the compare scripts: both sides on one instruction set, and a header line
saying what each side actually ran on.

On a machine with AVX-512, `--isa avx2` measures as an AVX2-only server (AMD Zen 2/3, Intel
without AVX-512) runs both sides:

- maskattn reads `MASKATTN_ISA` (its attention kernels, the candle model's fused ops and its
  f32 matrix products: one switch); where the system has OpenBLAS, the AVX2 products take
  its AVX2 kernels, which OpenBLAS picks when it loads: `OPENBLAS_CORETYPE=Haswell` makes it
  pick them on a CPU with AVX-512 too (else maskattn takes gemm's AVX2 kernels);
- PyTorch has three: `ATEN_CPU_CAPABILITY` for its own vectorised kernels (SDPA's flash
  kernel, element-wise ops), `MKL_ENABLE_INSTRUCTIONS` for MKL, which does its matrix products
  (`nn.Linear`, `@`, and the blocks of SDPA's kernel), and `ONEDNN_MAX_CPU_ISA` for oneDNN.
  ATen's switch alone leaves MKL free to pick AVX-512 (it does on an Intel Xeon): until
  2026-12-06 14:10 UTC the `--isa avx2` figures did not force PyTorch's products. All three are read when the libraries load, so
  the script re-executes itself with them set before it imports torch (child processes
  inherit them).

What ran is read back, not assumed: `torch.backends.cpu.get_cpu_capability()` for ATen,
MKL's own banner (`MKL_VERBOSE=1` on one small product, in a child process) for MKL, and
for maskattn the instruction set its kernels report (`maskattn bench --json` for the
binary, `maskattn._maskattn.kernel_path()` for the Python package). A CPU without the asked
set runs its own (PyTorch falls back silently, maskattn's detection ignores a set it lacks):
the header then shows the difference.

Imported by the scripts next to it (Python puts a script's folder on the path).
"""

import json
import os
import subprocess
import sys

# --isa value -> the variables that force it on each side
SETS = {
    "avx2": {
        "MASKATTN_ISA": "avx2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OPENBLAS_CORETYPE": "Haswell",
    },
    "avx512": {
        "MASKATTN_ISA": "avx512",
        "ATEN_CPU_CAPABILITY": "avx512",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
    },
}


def add_argument(parser):
    parser.add_argument(
        "--isa",
        choices=sorted(SETS),
        help="run both sides on this instruction set (MASKATTN_ISA for maskattn's kernels and "
        "matrix products; ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA for "
        "PyTorch's kernels and products); default: each side's own choice",
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
    process runs with all the variables set, re-executing the script once if they were not."""
    isa = _asked(sys.argv[1:])
    if isa not in SETS:
        return  # absent, or invalid: argparse reports it later
    want = SETS[isa]
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    os.environ.update(want)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable] + sys.argv)


def _env(name):
    return os.environ.get(name, "unset")


def mkl_isa():
    """The instruction set MKL's banner names for a product in a child process with this
    process's environment ("unknown" where torch is not built with MKL or prints none)."""
    code = "import torch; a = torch.ones(64, 64); a @ a"
    env = dict(os.environ, MKL_VERBOSE="1")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    for line in out.splitlines():
        if line.startswith("MKL_VERBOSE") and "(Intel(R) " in line:
            # "... Intel(R) Advanced Vector Extensions 2 (Intel(R) AVX2) enabled processors ..."
            return line.split("(Intel(R) ", 1)[1].split(")", 1)[0]
    return "unknown (no MKL banner)"


def torch_side(torch):
    """PyTorch's kernels (ATen) and matrix products (MKL) as they report them."""
    return (
        f"PyTorch {torch.__version__} on {torch.backends.cpu.get_cpu_capability()} "
        f"(ATEN_CPU_CAPABILITY={_env('ATEN_CPU_CAPABILITY')}), its MKL products on {mkl_isa()} "
        f"(MKL_ENABLE_INSTRUCTIONS={_env('MKL_ENABLE_INSTRUCTIONS')})"
    )


def ours_from_binary(binary):
    """The instruction set `maskattn bench` reports its kernels (and matrix products) on."""
    cmd = [binary, "--threads", "1", "bench", "--json", "--reps", "1", "--shape", "1,1,64,16", "--mask", "full", "--pass", "fwd"]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        head = json.loads(out.splitlines()[0])
        isa = f"{head['isa']}, matrix products on {head.get('products', 'gemm')}"
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError, IndexError) as e:
        isa = f"unknown ({e})"
    return f"maskattn kernels on {isa} (MASKATTN_ISA={_env('MASKATTN_ISA')}, OPENBLAS_CORETYPE={_env('OPENBLAS_CORETYPE')})"


def ours_from_package(native):
    """The kernel path the Python package reports."""
    return f"maskattn {native.kernel_path()} (MASKATTN_ISA={_env('MASKATTN_ISA')})"
