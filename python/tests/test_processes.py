"""The package in other processes: a child forked after the parent ran the kernels (the
thread pool's workers do not survive fork: the pool is rebuilt in the child), the
"fork" and "spawn" start methods of multiprocessing, and DataLoader workers (which fork on
Linux). Every wait is bounded; a child that does not answer in time is killed and fails the
test instead of hanging it."""

import io
import multiprocessing as mp
import os
import queue as queue_module
import sys
import time

import pytest
import torch

import maskattn

# Big enough to split across the pool's threads (many tiles), small enough to be quick.
SHAPE = (2, 4, 384, 32)
TIMEOUT = 120  # s: generous on a loaded 2-core machine; a hang never ends.

fork_only = pytest.mark.skipif(sys.platform != "linux", reason="fork start method: Linux")


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*SHAPE, generator=g) for _ in range(3)]


def attend(seed):
    q, k, v = inputs(seed)
    return maskattn.attention(q, k, v, maskattn.causal())


def wait_or_kill(pid):
    """The child's exit code, or None after killing a child that did not end in time."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


@fork_only
@pytest.mark.parametrize("threads", [0, 2], ids=["default_pool", "set_num_threads_2"])
def test_os_fork_child_after_the_parent_used_the_kernels(threads):
    maskattn.set_num_threads(threads)
    try:
        want = attend(0)  # the parent's pool now has live workers
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            # As DataLoader workers do: torch's own OpenMP pool is not fork-safe either
            # (torch.equal hung here once the parent had run a parallel region).
            torch.set_num_threads(1)
            try:
                code = 0 if torch.equal(attend(0), want) else 2
            finally:
                os._exit(code)
        code = wait_or_kill(pid)
        assert code is not None, "the forked child hung on its first kernel call"
        assert code == 0, f"the forked child's result differs from the parent's (exit {code})"
        assert torch.equal(attend(0), want), "the parent's pool broke after the fork"
    finally:
        maskattn.set_num_threads(0)


def child_attend(seed, queue):
    torch.set_num_threads(1)  # as in the os.fork test
    # As bytes: a tensor sent as itself lives in shared memory that its sender must
    # outlive, and this child exits at once.
    buf = io.BytesIO()
    torch.save(attend(seed), buf)
    queue.put(buf.getvalue())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_child(method):
    if method not in mp.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    want = attend(1)
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    p = ctx.Process(target=child_attend, args=(1, queue))
    p.start()
    try:
        got = torch.load(io.BytesIO(queue.get(timeout=TIMEOUT)))
    except queue_module.Empty:  # the child hung or died
        got = None
    finally:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    assert got is not None, f"a {method} child gave no result in {TIMEOUT} s"
    assert torch.equal(got, want)


class AttendDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return attend(10 + i)


@fork_only
def test_dataloader_workers_fork():
    attend(0)  # the parent used the kernels first, as a training loop would
    loader = torch.utils.data.DataLoader(
        AttendDataset(), batch_size=None, num_workers=2,
        multiprocessing_context="fork", timeout=TIMEOUT,
    )
    got = list(loader)
    assert len(got) == 4
    for i, out in enumerate(got):
        assert torch.equal(out, attend(10 + i))
