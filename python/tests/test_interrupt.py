"""Ctrl-C stops a long kernel call: the SIGINT's KeyboardInterrupt is raised from inside the
native call (the kernels stop between tiles), not after minutes of work, and the package
works normally afterwards. Each case runs in a child process that the test interrupts;
every wait is bounded, and a child that does not answer is killed and fails the test."""

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# L = 2^16 keys and queries, 16 heads, d = 64: 17.6 TFLOP for the forward — minutes on a
# small machine, seconds on the largest — so the signal, sent 1.5 s after the call began,
# lands while the kernels run.
CHILD = textwrap.dedent(
    """
    import sys, traceback
    import torch
    import maskattn
    from maskattn.functional import _FULL
    from maskattn.masks import _resolve
    from maskattn.ops import _NO_MODS, _backward_native

    which, threads = sys.argv[1], int(sys.argv[2])
    maskattn.set_num_threads(threads)
    H, L = 16, 1 << 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, L, 64, generator=g) for _ in range(3))
    _resolve(_FULL, [], (1, H, L, L))  # the block mask, compiled (and cached) before the call
    print("started", flush=True)
    try:
        if which == "forward":
            maskattn.attention(q, k, v)
        else:  # the backward kernel alone, on a made-up forward (its values do not matter)
            out, lse = torch.zeros_like(q), torch.zeros(1, H, L)
            _backward_native(q, k, v, out, lse, q, None, _FULL, [], 0.125, _NO_MODS, None)
        print("finished", flush=True)
    except KeyboardInterrupt as e:
        print("interrupted in:", traceback.extract_tb(e.__traceback__)[-1].line, flush=True)
    # Afterwards the package still gives right answers.
    a, b, c = (torch.randn(2, 3, 200, 32, generator=g) for _ in range(3))
    got = maskattn.attention(a, b, c, maskattn.causal())
    want = torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True)
    print("after:", "ok" if torch.allclose(got, want, atol=1e-5, rtol=1e-4) else "WRONG", flush=True)
    """
)

TIMEOUT = 90  # s, for each wait; a kernel that ignores the signal runs far longer


def run_and_interrupt(which, threads):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, which, str(threads)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], TIMEOUT)
        assert ready, "the child did not start"
        line = child.stdout.readline()
        assert line.strip() == "started", (line, child.stderr.read() if child.poll() is not None else "")
        time.sleep(1.5)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail(f"the {which} kernel did not stop within {TIMEOUT} s of SIGINT")
    assert child.returncode == 0, err
    return out


@pytest.mark.parametrize(
    "which,threads",
    [("forward", 0), ("forward", 1), ("backward", 0)],
    ids=["forward-pool", "forward-one-thread", "backward-pool"],
)
def test_sigint_stops_a_long_kernel_call(which, threads):
    out = run_and_interrupt(which, threads)
    assert "finished" not in out, out
    # Raised by the native call itself (its line in ops.py), not by Python code around it.
    assert f"interrupted in: _native.{which}(" in out, out
    assert "after: ok" in out, out
