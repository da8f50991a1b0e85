"""What the native module reports about the kernel code it runs (the compare scripts print
it beside PyTorch's capability), and that `MASKATTN_ISA` moves it."""

import os
import subprocess
import sys

from maskattn import _maskattn as native

SETS = {"Avx512", "Avx2", "Neon", "Portable"}


def test_isa_is_named_in_the_kernel_path():
    isa = native.isa()
    assert isa in SETS
    assert native.kernel_path().startswith(f"f32 on {isa};")


def test_maskattn_isa_forces_a_narrower_set():
    # `portable` exists on every CPU; the choice is made once per process, so a new one.
    env = dict(os.environ, MASKATTN_ISA="portable")
    code = "from maskattn import _maskattn as n; print(n.isa()); print(n.kernel_path())"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    isa, path = out.stdout.splitlines()
    assert isa == "Portable"
    assert path.startswith("f32 on Portable;")
