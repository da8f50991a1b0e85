"""maskattn.distributed: context-parallel (ring) attention over gloo, checked against the
float64 reference on the whole sequence under docs/design.md's accuracy rule.

Groups of 2 and 3 processes on 127.0.0.1 (spawned, gloo, a free port) run every case of a
list in one group (dist_worker.py) and save what they got; the checks run here. Every wait
is bounded: the group's timeout inside, a deadline on the processes outside (a process
still running then is killed and fails the test).

Cases: full, causal, sliding window, prefix, documents crossing the shard boundaries (with
causal), key padding, a ``mask_mod`` (as a callable and as a BlockMask of the whole
problem), both layouts, lengths that do not divide (and contiguous shards of any lengths),
score modifiers (ALiBi, softcap, sinks, T5 buckets) and an LSE gradient. Also: the pairs a
mask hides are skipped and counted, DDP and context-parallel training give the single
process's losses step for step, bad input is a typed error on every rank, and a peer that
dies or never answers ends the other rank with PeerError within the group's timeout.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import socket
import time

import pytest
import torch

import dist_worker
from reference import allowed_of, assert_rule, attend_mods, ulp_eps

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo",
)

DEADLINE = 240  # s for a whole group (spawn, imports, every case), on a loaded 2-core machine
GROUP_TIMEOUT = 60  # s: the process group's own timeout for the cases
FAIL_TIMEOUT = 6  # s: the group's timeout where a peer is meant to fail

B, HQ, HKV, D = 2, 4, 2, 16
LENGTHS = {2: 37, 3: 41}  # neither divides into 2W (nor W) equal pieces


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world, job, folder, timeout_s):
    """Spawns ``world`` ranks of ``job``; their saved results by rank. Bounded: a rank still
    alive at the deadline is killed and fails the test."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=dist_worker.main, args=(r, world, port, job, str(folder), timeout_s)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    assert not hung, f"{job}: ranks {hung} did not end within {DEADLINE} s"
    out = []
    for r in range(world):
        path = os.path.join(folder, f"rank{r}.pt")
        out.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
    return out


# ---- the cases and their references (masks from their written definitions) ----


def doc_ids(L):
    """Two rows of documents whose boundaries fall inside the shards and across them."""
    rows = []
    for lens in ([5, 12, 9], [17, 3, 8]):
        ids = []
        for n, length in enumerate(lens + [L]):
            ids += [n] * length
        rows.append(ids[:L])
    return torch.tensor(rows)


def reference_allowed(spec, L):
    """``[B|1, H|1, L, L]`` bool, by index arithmetic."""
    kind = spec["kind"]
    if kind in ("full", "causal", "window", "prefix"):
        kw = {k: v for k, v in spec.items() if k != "kind"}
        return allowed_of(kind, L, L, **kw).view(1, 1, L, L)
    i = torch.arange(L).view(L, 1)
    j = torch.arange(L).view(1, L)
    if kind == "documents":
        ids = spec["ids"]
        return (ids[:, :, None] == ids[:, None, :])[:, None] & (j <= i)
    if kind == "key_padding":
        return (j < spec["lengths"].view(-1, 1, 1)).view(-1, 1, 1, L).expand(-1, 1, L, L)
    if kind in ("mask_mod", "mask_mod_block"):
        h = torch.arange(HQ).view(1, HQ, 1, 1)
        return (j <= i) & ((i + j + h) % 4 != 0)
    raise ValueError(kind)


MASKS = {
    "full": {"kind": "full"},
    "causal": {"kind": "causal"},
    "window": {"kind": "window", "left": 6, "right": 2},
    "prefix": {"kind": "prefix", "p": 11},
    "documents": {"kind": "documents"},
    "key_padding": {"kind": "key_padding"},
    "mask_mod": {"kind": "mask_mod"},
}


def make_cases(world):
    L = LENGTHS[world]
    g = torch.Generator().manual_seed(world)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = []

    def case(name, layout, mask, **extra):
        spec = dict(mask)
        if spec["kind"] == "documents":
            spec["ids"] = doc_ids(L)
            if spec.pop("apart", False):
                # One document in the first and last thirds, another between: under
                # contiguous shards of 3 ranks the last rank needs the first's keys and
                # the middle rank needs neither other shard, so shard 0 passes through a
                # rank that holds no shard at that step.
                a, b, _ = (len(x) for x in torch.arange(L).tensor_split(3))
                spec["ids"] = torch.tensor([[0] * a + [1] * b + [0] * (L - a - b)] * B)
        if spec["kind"] == "key_padding":
            spec["lengths"] = torch.tensor([L - 6, 19])
        c = {"name": name, "layout": layout, "mask": spec, "q": r(B, HQ, L, D), "k": r(B, HKV, L, D), "v": r(B, HKV, L, D),
             "dout": r(B, HQ, L, D), "dlse": r(B, HQ, L)}
        c.update(extra)
        cases.append(c)

    for layout in ("zigzag", "contiguous"):
        for name, mask in MASKS.items():
            case(f"{name}-{layout}", layout, mask)
    case("mask_mod_block-zigzag", "zigzag", {"kind": "mask_mod_block"})
    case("documents-apart-contiguous", "contiguous", {"kind": "documents", "apart": True})
    lengths = [L - 7 * (world - 1)] + [7] * (world - 1)
    case("causal-contiguous-own-lengths", "contiguous", MASKS["causal"], lengths=lengths)
    case("documents-contiguous-own-lengths", "contiguous", MASKS["documents"], lengths=lengths[::-1])
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    case("alibi-softcap-causal-zigzag", "zigzag", MASKS["causal"], alibi_slopes=slopes, softcap=3.0)
    case("sinks-window-zigzag", "zigzag", MASKS["window"], sinks=r(HQ))
    case("sinks-contiguous", "contiguous", MASKS["full"], sinks=r(HQ))
    case("t5-full-zigzag", "zigzag", MASKS["full"], table=r(8, HQ), rel_cfg=(12, True))
    case("t5-causal-contiguous", "contiguous", MASKS["causal"], table=r(8, HQ), rel_cfg=(12, False))
    case("everything-documents-zigzag", "zigzag", MASKS["documents"], alibi_slopes=slopes, softcap=4.0, sinks=r(HQ),
         table=r(8, HQ), rel_cfg=(12, True))
    return cases


def pieces(case, world, rank):
    """The global ranges rank ``rank`` holds, in order, from the layouts' definitions
    (pieces of ``torch.tensor_split``: the first ``L mod n`` one longer)."""
    L = case["q"].shape[2]
    if case.get("lengths"):
        at = sum(case["lengths"][:rank])
        return [range(at, at + case["lengths"][rank])]
    n = 2 * world if case["layout"] == "zigzag" else world
    bounds = [0]
    for i in range(n):
        bounds.append(bounds[-1] + L // n + (1 if i < L % n else 0))
    chunks = [rank, n - 1 - rank] if case["layout"] == "zigzag" else [rank]
    return [range(bounds[c], bounds[c + 1]) for c in chunks]


def indices(case, world, rank):
    """The global positions rank ``rank`` holds, in the order of its shard."""
    return [x for p in pieces(case, world, rank) for x in p]


def reference(case, dtype):
    """``out, lse, dq, dk, dv`` and the parameter gradients on the whole sequence."""
    L = case["q"].shape[2]
    allowed = reference_allowed(case["mask"], L)
    leaves = [case[n].to(dtype).requires_grad_(True) for n in ("q", "k", "v")]
    params = {n: case[n].to(dtype).requires_grad_(True) for n in ("alibi_slopes", "sinks", "table") if n in case}
    rel = (params["table"], *case["rel_cfg"]) if "table" in params else None
    out, lse = attend_mods(*leaves, allowed, softcap=case.get("softcap"), alibi=params.get("alibi_slopes"),
                           sinks=params.get("sinks"), rel=rel)
    fin = torch.isfinite(lse)
    loss = (out * case["dout"].to(dtype)).sum() + torch.where(fin, lse * case["dlse"].to(dtype), torch.zeros((), dtype=dtype)).sum()
    names = list(params)
    grads = torch.autograd.grad(loss, leaves + [params[n] for n in names])
    got = {"out": out.detach(), "lse": lse.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    for n, gr in zip(names, grads[3:]):
        got["d" + n] = gr
    return got


def expected_skips(case, world, rank):
    """Pairs (this rank's query piece, any rank's key piece) the reference mask hides."""
    L = case["q"].shape[2]
    allowed = reference_allowed(case["mask"], L).expand(B, HQ, L, L)

    return sum(
        1
        for s in range(world)
        for qp in pieces(case, world, rank)
        for kp in pieces(case, world, s)
        if not allowed[:, :, list(qp)][:, :, :, list(kp)].any()
    )


# ---- the groups, run once per module ----


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def group(request, tmp_path_factory):
    world = request.param
    folder = tmp_path_factory.mktemp(f"cp{world}")
    cases = make_cases(world)
    torch.save(cases, os.path.join(folder, "cases.pt"))
    results = run_group(world, "cases", folder, GROUP_TIMEOUT)
    for r, got in enumerate(results):
        assert got is not None, f"rank {r} saved nothing"
        assert "crash" not in got, f"rank {r} crashed:\n{got['crash']}"
    return world, cases, results


CASE_NAMES = [c["name"] for c in make_cases(2)]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_each_rank_matches_the_whole_sequence(group, name):
    """out, LSE, dq/dk/dv of every rank's shard (and the modifiers' gradients summed over
    the ranks) under the accuracy rule against float64 attention on the whole sequence."""
    world, cases, results = group
    n = CASE_NAMES.index(name)
    case = cases[n]
    golden, naive = reference(case, torch.float64), reference(case, torch.float32)
    got = [results[r]["cases"][n] for r in range(world)]
    for r, g in enumerate(got):
        assert "error" not in g, f"rank {r}: {g['error']}\n{g['trace']}"
    for r, g in enumerate(got):
        idx = torch.tensor(indices(case, world, r))
        for key in ("out", "lse", "dq", "dk", "dv"):
            gd, nv = golden[key].index_select(2, idx), naive[key].index_select(2, idx)
            assert g[key].shape == gd.shape, f"rank {r} {key}: shape {tuple(g[key].shape)} != {tuple(gd.shape)}"
            assert_rule(f"{name} rank {r} {key}", g[key], nv, gd, ulp_eps(torch.float32, gd))
    for key in [k for k in golden if k not in ("out", "lse", "dq", "dk", "dv")]:
        total = sum(g[key] for g in got)
        gd = golden[key]
        # docs/design.md: parameter gradients sum over every pair, ε at their own scale.
        assert_rule(f"{name} {key}", total, naive[key], gd, 1e-5 * max(1.0, gd.abs().max().item()))


@pytest.mark.parametrize("name", [n for n in CASE_NAMES if n.split("-")[0] in ("causal", "documents", "window", "full")])
def test_hidden_pairs_are_skipped_and_counted(group, name):
    """The forward runs no kernel on a pair of pieces the mask hides: its count of skipped
    pairs is the reference's count of all-hidden pairs (none for the full mask)."""
    world, cases, results = group
    n = CASE_NAMES.index(name)
    case = cases[n]
    for r in range(world):
        st = results[r]["cases"][n]["fwd_stats"]
        want = expected_skips(case, world, r)
        assert st["pairs_skipped"] == want, f"rank {r}: skipped {st['pairs_skipped']} pairs, the mask hides {want}"
        per_rank = 4 if case["layout"] == "zigzag" else 1
        assert st["pairs_computed"] + st["pairs_skipped"] == world * per_rank
    if name.split("-")[0] in ("causal", "documents"):  # these hide pairs at every rank count
        assert sum(results[r]["cases"][n]["fwd_stats"]["pairs_skipped"] for r in range(world)) > 0


def test_causal_contiguous_sends_no_shard_nobody_needs(group):
    """Causal, contiguous: no rank before the last needs the last rank's keys, so that
    rank sends nothing in the forward, and the hops left out are counted."""
    world, cases, results = group
    n = CASE_NAMES.index("causal-contiguous")
    last = results[world - 1]["cases"][n]["fwd_stats"]
    assert last["kv_sent"] == 0 and last["kv_not_sent"] == world - 1, last
    first = results[0]["cases"][n]["fwd_stats"]
    assert first["kv_sent"] == 1, first  # rank 0's keys go on to every later rank


def test_bad_shards_are_typed_errors_on_every_rank(group):
    world, _, results = group
    for r in range(world):
        e = results[r]["errors"]
        assert e["mismatch"] is not None and e["mismatch"][0] == "ShardMismatchError", e["mismatch"]
        assert "q:" in e["mismatch"][1] and "zigzag" in e["mismatch"][1]
        assert e["heads"] is not None and e["heads"][0] == "ShardMismatchError" and "heads" in e["heads"][1], e["heads"]
        assert tuple(e["after"]) == (1, 2, 6, 8)


def test_ddp_training_matches_one_process(group):
    """A small model through maskattn.attention under DistributedDataParallel (2 ranks, half
    the batch each) gives the single process's losses step for step."""
    world, _, results = group
    if world != 2:
        pytest.skip("run in the 2-rank group")
    want = dist_worker.single_process_losses()
    for r in range(world):
        got = results[r]["ddp"]
        assert len(got) == len(want)
        for step, (a, b) in enumerate(zip(got, want)):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"rank {r} step {step}: {a} vs {b}"
    assert want[-1] < want[0]  # it learns: the comparison is not of constants


def test_context_parallel_training_matches_one_process(group):
    """The same model with its attention context-parallel (zigzag shards of every
    sequence, replicated parameters' gradients summed) gives the single process's losses."""
    world, _, results = group
    if world != 2:
        pytest.skip("run in the 2-rank group")
    want = dist_worker.single_process_losses()
    for r in range(world):
        for step, (a, b) in enumerate(zip(results[r]["cp_train"], want)):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"rank {r} step {step}: {a} vs {b}"


def test_transformers_plugin_under_ddp_matches_one_process(group):
    """A tiny Llama through the transformers plug-in (attn_implementation="maskattn") under
    DistributedDataParallel on 2 ranks gives the single process's losses step for step."""
    world, _, results = group
    if world != 2:
        pytest.skip("run in the 2-rank group")
    want = dist_worker.hf_losses()
    if want is None:
        pytest.skip("transformers is not installed (pip install 'maskattn[transformers]')")
    for r in range(world):
        got = results[r]["hf_ddp"]
        assert got is not None and len(got) == len(want)
        for step, (a, b) in enumerate(zip(got, want)):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"rank {r} step {step}: {a} vs {b}"
    assert abs(want[-1] - want[0]) > 1e-3  # the weights moved: the comparison is not of constants


@pytest.mark.parametrize("job", ["silent", "dies"])
def test_a_failed_peer_ends_the_other_rank_with_an_error(job, tmp_path):
    """Rank 1 never calls (silent) or exits at once (dies): rank 0's call raises
    PeerError, naming the cause, within the group's timeout — never a hang."""
    got = run_group(2, job, tmp_path, FAIL_TIMEOUT)[0]
    assert got is not None and "crash" not in got, got
    assert got.get("type") == "PeerError", got
    assert "rank 0" in got["error"] and "timeout" in got["error"]
    assert got["seconds"] < FAIL_TIMEOUT + 20, got


def test_bad_arguments_name_themselves():
    import maskattn
    from maskattn import distributed as md

    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="layout"):
        md.context_parallel_attention(x, x, x, layout="ring")
    with pytest.raises(ValueError, match="layout"):
        md.shard(x, 2, layout="striped")
    if not torch.distributed.is_initialized():
        with pytest.raises(md.NotInitializedError, match="group"):
            md.context_parallel_attention(x, x, x, maskattn.causal())
        with pytest.raises(md.NotInitializedError, match="init_process_group"):
            md.shard(x, 2)
    with pytest.raises(ValueError, match="dim"):
        md.shard(x, 7)


def test_import_maskattn_leaves_distributed_for_later():
    """``import maskattn`` does not import maskattn.distributed; the attribute does."""
    import subprocess
    import sys

    code = (
        "import sys, maskattn; a = 'maskattn.distributed' in sys.modules; "
        "maskattn.distributed.shard; print(a, 'maskattn.distributed' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stderr
