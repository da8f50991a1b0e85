"""Small calls (at most 2^19 multiply-adds, e.g. a decode step) run the kernels on the
calling thread, larger ones on the pool: both give the same bits, from any Python thread."""

import threading

import torch

import maskattn


def _grads(shape, seed=0):
    b, h, lq, lk, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g).requires_grad_(True)
    k = torch.randn(b, h, lk, d, generator=g).requires_grad_(True)
    v = torch.randn(b, h, lk, d, generator=g).requires_grad_(True)
    out = maskattn.attention(q, k, v, maskattn.causal())
    out.backward(torch.randn(out.shape, generator=g))
    return [out.detach(), q.grad, k.grad, v.grad]


def test_inline_and_pool_paths_agree_bitwise():
    """1 thread: every call inline; 2 threads: this call (2^21 multiply-adds) on the pool."""
    shape = (1, 4, 128, 128, 32)
    before = maskattn.get_num_threads()
    try:
        maskattn.set_num_threads(1)
        inline = _grads(shape)
        maskattn.set_num_threads(2)
        pool = _grads(shape)
    finally:
        maskattn.set_num_threads(before)
    for a, b in zip(inline, pool):
        assert torch.equal(a, b)


def test_small_calls_from_many_threads():
    """Each Python thread gets its own inline pool: concurrent small calls all agree."""
    shape = (1, 2, 3, 40, 16)
    want = _grads(shape)
    got, errors = [], []

    def worker():
        try:
            for _ in range(5):
                got.append(_grads(shape))
        except Exception as e:  # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(got) == 20
    for res in got:
        for a, b in zip(res, want):
            assert torch.equal(a, b)


def test_fork_child_after_inline_calls():
    """The calling thread's inline pool has no thread of its own to lose in a fork: a
    forked child's small call runs and agrees with the parent's."""
    import os
    import time

    if not hasattr(os, "fork"):
        return
    shape = (1, 2, 3, 40, 16)
    want = _grads(shape)[0]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            code = 0 if torch.equal(_grads(shape)[0], want) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child hung on its first small call")
    assert os.waitstatus_to_exitcode(status) == 0
