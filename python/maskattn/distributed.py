"""Context parallelism (ring attention) over ``torch.distributed``, any block mask.

``context_parallel_attention(q, k, v, mask)`` takes this rank's shards of the sequence
dimension (dim 2 of ``[B, H, L, d]``) and returns this rank's shard of the attention over
the whole sequence, with autograd. Each rank's keys and values travel around the ring of
the process group (point-to-point ``isend``/``irecv``, gloo on the CPU) while the kernels
work on the block in hand; partial results are merged by their LSE (the kernel crate's
``merge_partials``), and the backward sends keys and values round again with their
gradients travelling beside them back to the rank that owns them.

The mask is the *global* mask (the whole sequence): each pair of shards gets the mask
compiled for its block of the whole problem (the kernel crate's ``BlockMask::new_block``),
so documents ids, padding lengths, windows and the positional score modifiers (ALiBi, T5
buckets) are evaluated at global positions. A block pair the mask hides entirely is
neither computed nor, where no later rank needs it, sent; :func:`stats` counts both.

Layouts: ``"contiguous"`` (rank ``r`` holds the ``r``-th of ``W`` consecutive pieces) and
the load-balancing ``"zigzag"`` (the sequence in ``2W`` pieces, rank ``r`` holds pieces
``r`` and ``2W − 1 − r``: under a causal mask every rank does the same work). Pieces are
``torch.tensor_split``'s: any length splits, the first pieces one longer.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import _maskattn as _native
from .masks import BlockMask, Mask, _band_indices, _build, _checked, _FULL_ID, dense
from .ops import (
    _DTYPES,
    RelativeBias,
    _check,
    _check_mods,
    _f32,
    _native_mods,
    _plain,
    _raw,
    _raw_opt,
    _raw_out,
)

__all__ = [
    "context_parallel_attention",
    "shard",
    "unshard",
    "stats",
    "reset_stats",
    "LAYOUTS",
    "NotInitializedError",
    "ShardMismatchError",
    "PeerError",
]

LAYOUTS = ("zigzag", "contiguous")


class NotInitializedError(RuntimeError):
    """``torch.distributed`` has no process group to run on (``group`` argument)."""


class ShardMismatchError(ValueError):
    """The ranks' shards do not fit together (lengths, batch, heads, head dim or dtype)."""


class PeerError(RuntimeError):
    """A peer rank died or did not answer within the process group's timeout."""


# Counts since the last reset_stats(), per process: what the mask let the ring skip.
_STATS_KEYS = ("pairs_computed", "pairs_skipped", "kv_sent", "kv_not_sent")
_stats = dict.fromkeys(_STATS_KEYS, 0)


def stats() -> dict:
    """This process's counts since :func:`reset_stats`, forward and backward together:
    ``pairs_computed`` / ``pairs_skipped`` (pairs of a query piece and a key piece whose
    kernels ran / that the mask hides entirely, so none ran), ``kv_sent`` / ``kv_not_sent``
    (hops of a key/value shard to the next rank made / left out because no rank further
    round the ring needs that shard)."""
    return dict(_stats)


def reset_stats() -> None:
    for key in _STATS_KEYS:
        _stats[key] = 0


# ---- layouts ---------------------------------------------------------------------------


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")


def _sizes(n: int, parts: int) -> List[int]:
    """``torch.tensor_split``'s piece lengths: the first ``n % parts`` one longer."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _pieces(total: int, world: int, layout: str) -> List[List[Tuple[int, int]]]:
    """For each rank, the global ranges ``[a, b)`` of the sequence it holds, in the order
    its shard holds them."""
    n = 2 * world if layout == "zigzag" else world
    sizes = _sizes(total, n)
    starts = [sum(sizes[:i]) for i in range(n + 1)]
    rng = lambda i: (starts[i], starts[i + 1])  # noqa: E731
    if layout == "zigzag":
        return [[rng(r), rng(n - 1 - r)] for r in range(world)]
    return [[rng(r)] for r in range(world)]


def _group_info(group, name: str = "group") -> Tuple[object, int, int]:
    """``(group, world size, this rank in it)``; a clear error when there is none."""
    if not dist.is_available() or not dist.is_initialized():
        raise NotInitializedError(
            f"{name}: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group('gloo') first (torchrun sets its environment)"
        )
    if group is None:
        group = dist.group.WORLD
    try:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
    except (RuntimeError, ValueError) as e:
        raise NotInitializedError(f"{name}: not a usable process group ({e})") from e
    if rank < 0:
        raise ValueError(f"{name}: this process is not a member of the group")
    return group, world, rank


def _check_dim(x, dim: int, fn: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, not {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{fn}: dim {dim!r} is not a dimension of a {x.dim()}-d tensor")
    return dim % x.dim()


def shard(x: torch.Tensor, dim: int, group=None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of the whole ``x`` along ``dim``: the pieces the layout gives it,
    concatenated (a view for ``"contiguous"``). Every rank calls it with the same ``x``;
    it needs no communication."""
    dim = _check_dim(x, dim, "shard")
    _check_layout(layout)
    _, world, rank = _group_info(group)
    ranges = _pieces(x.shape[dim], world, layout)[rank]
    parts = [x.narrow(dim, a, b - a) for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard(x: torch.Tensor, dim: int, group=None, layout: str = "zigzag") -> torch.Tensor:
    """The whole tensor from every rank's shard along ``dim`` (an all-gather; not
    differentiable). With ``"contiguous"`` the shards may have any lengths; with
    ``"zigzag"`` they must be :func:`shard`'s of their total."""
    dim = _check_dim(x, dim, "unshard")
    _check_layout(layout)
    group, world, rank = _group_info(group)
    lens = _gather_ints([x.shape[dim]], group, "unshard")
    total = sum(row[0] for row in lens)
    moved = x.detach().movedim(dim, 0).contiguous()
    longest = max(row[0] for row in lens)
    padded = moved.new_zeros((longest, *moved.shape[1:]))
    padded[: moved.shape[0]] = moved
    got = [torch.empty_like(padded) for _ in range(world)]
    _collective(lambda: dist.all_gather(got, padded, group=group), "unshard: all_gather of the shards", rank)
    if layout == "zigzag":
        _check_zigzag([row[0] for row in lens], total, world, "x")
        where = _pieces(total, world, layout)
    else:
        where = _contiguous(lens)
    out = moved.new_empty((total, *moved.shape[1:]))
    for s, ranges in enumerate(where):
        at = 0
        for a, b in ranges:
            out[a:b] = got[s][at : at + b - a]
            at += b - a
    return out.movedim(0, dim)


def _contiguous(lens) -> List[List[Tuple[int, int]]]:
    starts = [0]
    for row in lens:
        starts.append(starts[-1] + row[0])
    return [[(starts[s], starts[s + 1])] for s in range(len(lens))]


def _check_zigzag(lens: Sequence[int], total: int, world: int, name: str) -> None:
    want = [sum(b - a for a, b in ranges) for ranges in _pieces(total, world, "zigzag")]
    if list(lens) != want:
        raise ShardMismatchError(
            f"{name}: the ranks' shard lengths {list(lens)} along the sequence are not the zigzag "
            f"split of their total {total} over {world} ranks ({want}); shard with "
            "maskattn.distributed.shard(x, dim, layout='zigzag'), or use layout='contiguous' "
            "for shards of any lengths"
        )


# ---- communication with bounded waits --------------------------------------------------


def _collective(fn: Callable[[], object], what: str, rank: int):
    try:
        return fn()
    except RuntimeError as e:
        raise PeerError(
            f"rank {rank}: {what} failed: a peer died or did not answer within the process "
            f"group's timeout (init_process_group(timeout=...)): {e}"
        ) from e


def _gather_ints(values: Sequence[int], group, what: str) -> List[List[int]]:
    """Every rank's ``values`` (same count on every rank), by rank."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor(list(values), dtype=torch.int64)
    got = [torch.empty_like(mine) for _ in range(world)]
    _collective(lambda: dist.all_gather(got, mine, group=group), f"{what}: all_gather of the shapes", rank)
    return [t.tolist() for t in got]


class _Comms:
    """Point-to-point messages of one ring pass, waited on with a clear error."""

    def __init__(self, group, rank: int, what: str):
        self.group, self.rank, self.what = group, rank, what

    def _peer(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not dist.group.WORLD else r

    def send(self, t: torch.Tensor, to: int, tag: int):
        return self._post(dist.isend, t, to, tag, "send to")

    def recv(self, t: torch.Tensor, frm: int, tag: int):
        return self._post(dist.irecv, t, frm, tag, "receive from")

    def _post(self, fn, t, peer, tag, verb):
        try:
            work = fn(t, self._peer(peer), group=self.group, tag=tag)
        except RuntimeError as e:
            raise self._error(verb, peer, e) from e
        return (work, verb, peer)

    def wait(self, posted) -> None:
        if posted is None:
            return
        work, verb, peer = posted
        try:
            work.wait()
        except RuntimeError as e:
            raise self._error(verb, peer, e) from e

    def _error(self, verb, peer, e) -> PeerError:
        return PeerError(
            f"{self.what}: rank {self.rank} could not {verb} rank {peer}: the peer died or did not "
            f"answer within the process group's timeout (init_process_group(timeout=...)): {e}"
        )


# Message tags: one per kind and ring step, so no two messages of one pass are confused.
_TAG_FWD_KV, _TAG_BWD_KV, _TAG_BWD_DKV, _TAG_BWD_HOME = 1 << 12, 2 << 12, 3 << 12, 4 << 12


# ---- the plan of one call --------------------------------------------------------------


class _Plan:
    """Geometry of one call: who holds which ranges, the block mask of every pair of a
    local query piece and a key piece, which rank needs which shard (``need[r][s]``), and
    how far round the ring each shard must travel (``reach[s]``)."""

    def __init__(self, group, world, rank, pieces, native_mask, B, H, total):
        self.group, self.world, self.rank, self.pieces = group, world, rank, pieces
        self.lens = [sum(b - a for a, b in p) for p in pieces]
        # blocks[s][(qi, ki)]: the block mask of my query piece qi and rank s's key piece ki,
        # or None where the mask hides every pair of it.
        self.blocks = []
        for s in range(world):
            row = {}
            for qi, (qa, qb) in enumerate(pieces[rank]):
                for ki, (ka, kb) in enumerate(pieces[s]):
                    if qa == qb or ka == kb:
                        continue
                    blk = _native.NativeBlockMask.block(native_mask, B, H, total, total, (qa, qb), (ka, kb))
                    row[(qi, ki)] = None if blk.all_empty else blk
            self.blocks.append(row)
        mine = [int(any(b is not None for b in self.blocks[s].values())) for s in range(world)]
        self.need = _gather_ints(mine, group, "context_parallel_attention")
        # Shard s travels rank s → s+1 → … → s+reach[s], the furthest rank that needs it.
        self.reach = [
            max([t for t in range(1, world) if self.need[(s + t) % world][s]], default=0)
            for s in range(world)
        ]

    def local(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """Piece ``i`` of this rank's shard ``t`` (dim 2), a view."""
        a = sum(b - a for a, b in self.pieces[self.rank][:i])
        (pa, pb) = self.pieces[self.rank][i]
        return t.narrow(2, a, pb - pa)

    def piece_of(self, s: int, t: torch.Tensor, i: int) -> torch.Tensor:
        """Piece ``i`` of rank ``s``'s shard ``t`` (the sequence at dim −2), a view."""
        a = sum(b - a for a, b in self.pieces[s][:i])
        (pa, pb) = self.pieces[s][i]
        return t.narrow(-2, a, pb - pa)


def _native_mask(mask, B, H, total):
    """The Rust mask of the global ``mask`` argument."""
    if mask is None:
        return _build(_FULL_ID, ())
    if isinstance(mask, BlockMask):
        mask_mod = getattr(mask, "_mask_mod", None)
        if mask._mask is None and mask_mod is None:
            raise TypeError("mask: this BlockMask was made without a maskattn.Mask; pass the Mask itself")
        if mask.shape != (B, H, total, total):
            raise ValueError(
                f"mask: the BlockMask was compiled for {mask.shape}, but the whole problem is "
                f"(B, H_q, L, L) = {(B, H, total, total)}; pass the global mask"
            )
        mask = mask._mask if mask._mask is not None else mask_mod
    if callable(mask) and not isinstance(mask, Mask):
        # A mask_mod: evaluated over the whole L × L once, so every block of it can be
        # compiled at its global positions.
        name = getattr(mask, "__name__", type(mask).__name__)
        allowed = _checked(mask, name, _band_indices(B, H, total, total), (B, H, total, total))
        mask = dense(allowed.expand(allowed.shape[0], allowed.shape[1], total, total).contiguous())
    if not isinstance(mask, Mask):
        raise TypeError(
            f"mask must be None, a maskattn.Mask, a BlockMask of the whole problem or a mask_mod, "
            f"not {type(mask).__name__}"
        )
    return _build(mask._id, mask._tensors)


# ---- the ring ---------------------------------------------------------------------------


def _forward_piece(q, k, v, blk, scale, mods):
    B, H, L, _ = q.shape
    out = torch.empty((B, H, L, v.shape[3]), dtype=torch.float32)
    lse = torch.empty((B, H, L), dtype=torch.float32)
    _native.forward((_raw(q), _raw(k), _raw(v)), blk, scale, mods, (_raw_out(out), _raw_out(lse)))
    return out, lse


def _next_hop(comms, plan, cur, k, t, tag):
    """Step ``t``'s hop of the key/value shards, in both rings: ``cur`` (shard ``rank − t``)
    sent on where a rank further on still needs it, and step ``t + 1``'s shard received where
    this rank or one after it needs it. ``(send, recv, buffer)``, None where nothing travels."""
    world, rank = plan.world, plan.rank
    sent = posted = nxt = None
    if t + 1 < world:
        if t + 1 <= plan.reach[(rank - t) % world]:
            sent = comms.send(cur, (rank + 1) % world, tag + t + 1)
            _stats["kv_sent"] += 1
        else:
            _stats["kv_not_sent"] += 1
        s_in = (rank - t - 1) % world
        if t + 1 <= plan.reach[s_in]:
            nxt = k.new_empty((2, *k.shape[:2], plan.lens[s_in], k.shape[3]))
            posted = comms.recv(nxt, (rank - 1) % world, tag + t + 1)
    return sent, posted, nxt


def _ring_forward(plan: _Plan, q, k, v, scale, mods, sinks):
    """``(out f32, lse f32)`` of this rank's queries against every key, merged by LSE."""
    world, rank = plan.world, plan.rank
    comms = _Comms(plan.group, rank, "context_parallel_attention (forward)")
    nq = len(plan.pieces[rank])
    acc: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * nq
    cur = torch.stack([k, v])  # one message per hop: [2, B, H_kv, L_s, d]
    for t in range(world):
        s = (rank - t) % world
        # Post the next hop before computing on this one: the transfer overlaps the kernels.
        sent, posted, nxt = _next_hop(comms, plan, cur, k, t, _TAG_FWD_KV)
        if t == 0 or t <= plan.reach[s]:
            for (qi, ki), blk in plan.blocks[s].items():
                if blk is None:
                    _stats["pairs_skipped"] += 1
                    continue
                _stats["pairs_computed"] += 1
                part = _forward_piece(plan.local(q, qi), plan.piece_of(s, cur[0], ki), plan.piece_of(s, cur[1], ki), blk, scale, mods)
                if acc[qi] is None:
                    acc[qi] = part
                else:
                    o, l = acc[qi]
                    _native.merge_partials(_raw_out(o), _raw_out(l), _raw_out(part[0]), _raw_out(part[1]), o.shape[3])
        else:
            _stats["pairs_skipped"] += len(plan.blocks[s])
        comms.wait(sent)
        comms.wait(posted)
        cur = nxt
    B, H, _, d = q.shape
    outs, lses = [], []
    for qi, (a, b) in enumerate(plan.pieces[rank]):
        if acc[qi] is None:  # every key hidden from these rows (or an empty piece)
            acc[qi] = (q.new_zeros((B, H, b - a, d), dtype=torch.float32), q.new_full((B, H, b - a), -math.inf, dtype=torch.float32))
        outs.append(acc[qi][0])
        lses.append(acc[qi][1])
    out = outs[0] if nq == 1 else torch.cat(outs, 2)
    lse = lses[0] if nq == 1 else torch.cat(lses, 2)
    if sinks is not None:
        # The sink joins each row's softmax once, as a part with no value: (O = 0, LSE = sink).
        sink = sinks.view(1, -1, 1).to(torch.float32)
        merged = torch.logaddexp(lse, sink.expand_as(lse))
        out = out * torch.exp(lse - merged).unsqueeze(-1)
        lse = merged
    return out.contiguous(), lse.contiguous()


def _ring_backward(plan: _Plan, q, k, v, out, lse, dout, dlse, scale, mods, want_alibi, want_rel):
    """``(dq, dk, dv, dalibi, drel)`` float32 of this rank's shards. Shard ``s``'s keys and
    values go round as in the forward; the gradient of them travels beside them, each rank
    adding its part, and goes home to ``s`` from the last rank that needs the shard."""
    world, rank = plan.world, plan.rank
    comms = _Comms(plan.group, rank, "context_parallel_attention (backward)")
    softcap, alibi, rel = mods
    dq = torch.zeros(q.shape, dtype=torch.float32)
    dalibi = torch.zeros_like(alibi) if want_alibi else None
    drel = torch.zeros_like(rel[0]) if want_rel else None
    home_kv = torch.zeros((2, *k.shape), dtype=torch.float32)
    native_mods = _native_mods(softcap, alibi, None, None, None if rel is None else rel[0], None if rel is None else rel[1:])
    cur = torch.stack([k, v])
    pending_sends: list = []
    # Sent home, received after the owner's ring: waited on only at the end.
    home_sends: list = []
    for t in range(world):
        # Sends to the next rank of two steps ago are done with (it is past that step).
        for p in pending_sends[:-2]:
            comms.wait(p)
        pending_sends = pending_sends[-2:]
        s = (rank - t) % world
        sent, posted, nxt = _next_hop(comms, plan, cur, k, t, _TAG_BWD_KV)
        if sent is not None:
            pending_sends.append(sent)
        # Shard s's gradient so far, from the ranks before this one on its way (sent as
        # they finished the step before, while this rank worked on it), is received into
        # the buffer this rank then adds its own part to: one buffer, not two.
        acc = None
        if t == 0:
            acc = home_kv
        elif t <= plan.reach[s]:
            if t >= 2:
                acc = torch.empty((2, *k.shape[:2], plan.lens[s], k.shape[3]), dtype=torch.float32)
                comms.wait(comms.recv(acc, (rank - 1) % world, _TAG_BWD_DKV + t))
            else:
                acc = torch.zeros((2, *k.shape[:2], plan.lens[s], k.shape[3]), dtype=torch.float32)
        if acc is None:
            _stats["pairs_skipped"] += len(plan.blocks[s])
        else:
            for (qi, ki), blk in plan.blocks[s].items():
                if blk is None:
                    _stats["pairs_skipped"] += 1
                    continue
                _stats["pairs_computed"] += 1
                g = _backward_piece(
                    plan.local(q, qi), plan.piece_of(s, cur[0], ki), plan.piece_of(s, cur[1], ki),
                    plan.local(out, qi), _rows(plan, lse, qi), plan.local(dout, qi),
                    None if dlse is None else _rows(plan, dlse, qi),
                    blk, scale, native_mods, alibi if dalibi is not None else None, rel[0] if drel is not None else None,
                )
                plan.local(dq, qi).add_(g[0])
                plan.piece_of(s, acc[0], ki).add_(g[1])
                plan.piece_of(s, acc[1], ki).add_(g[2])
                if dalibi is not None:
                    dalibi.add_(g[3])
                if drel is not None:
                    drel.add_(g[4])
            if t >= 1:
                if t < plan.reach[s]:
                    pending_sends.append(comms.send(acc, (rank + 1) % world, _TAG_BWD_DKV + t + 1))
                else:  # the last rank that needs shard s: its gradient goes home
                    home_sends.append(comms.send(acc, s, _TAG_BWD_HOME))
        comms.wait(posted)
        cur = nxt
    if plan.reach[rank] >= 1:
        # This shard's gradient from the other ranks comes home from the last one that needs
        # it; received last, once the ring's buffers are freed (its sender does not wait on it).
        home_buf = torch.empty_like(home_kv)
        comms.wait(comms.recv(home_buf, (rank + plan.reach[rank]) % world, _TAG_BWD_HOME))
        home_kv.add_(home_buf)
    for p in pending_sends + home_sends:
        comms.wait(p)
    return dq, home_kv[0], home_kv[1], dalibi, drel


def _rows(plan: _Plan, t: torch.Tensor, i: int) -> torch.Tensor:
    """Piece ``i`` of a per-row tensor ``[B, H, L_r]`` of this rank, contiguous."""
    return plan.local(t.unsqueeze(-1), i).squeeze(-1).contiguous()


def _backward_piece(q, k, v, out, lse, dout, dlse, blk, scale, native_mods, alibi, table):
    """The fused backward of one block pair, given the merged ``out`` and ``lse`` of its
    rows; ``alibi`` / ``table`` given where their gradients are wanted."""
    dq = torch.empty(q.shape, dtype=torch.float32)
    dk = torch.empty(k.shape, dtype=torch.float32)
    dv = torch.empty(v.shape, dtype=torch.float32)
    da = None if alibi is None else torch.empty_like(alibi)
    dr = None if table is None else torch.empty_like(table)
    _native.backward(
        (_raw(q), _raw(k), _raw(v)),
        (_raw(out), _raw_out(lse), _raw(dout)),
        blk,
        scale,
        native_mods,
        (_raw_out(dq), _raw_out(dk), _raw_out(dv)),
        (None, _raw_opt(da), None, _raw_opt(dr)),
        None if dlse is None else _raw_out(dlse),
    )
    return dq, dk, dv, da, dr


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alibi, sinks, table, plan, scale, softcap, rel_cfg):
        q, k, v = _plain(q), _plain(k), _plain(v)
        alibi32, sinks32, table32 = _f32(alibi), _f32(sinks), _f32(table)
        mods = _native_mods(softcap, alibi32, None, None, table32, rel_cfg)
        out, lse = _ring_forward(plan, q, k, v, scale, mods, sinks32)
        ctx.save_for_backward(q, k, v, out, lse, alibi, sinks, table)
        ctx.plan, ctx.scale, ctx.softcap, ctx.rel_cfg = plan, scale, softcap, rel_cfg
        ctx.set_materialize_grads(False)
        return (out if out.dtype == q.dtype else out.to(q.dtype)), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, alibi, sinks, table = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dout = _plain(dout).to(torch.float32)
        if dlse is not None:
            # Rows that see nothing have LSE −∞ and take no gradient through it.
            dlse = torch.where(torch.isfinite(lse), _plain(dlse).to(torch.float32), torch.zeros(())).contiguous()
        alibi32, table32 = _f32(alibi), _f32(table)
        rel = None if table32 is None else (table32, *ctx.rel_cfg)
        want_alibi = alibi is not None and ctx.needs_input_grad[3]
        want_rel = table is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dalibi, drel = _ring_backward(
            ctx.plan, q, k, v, out, lse, dout, dlse, ctx.scale, (ctx.softcap, alibi32, rel), want_alibi, want_rel
        )
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[4]:
            # The sink's share of each row, P = e^(sink − LSE), times dS = 0 − D + dLSE; the
            # sink is in no block's kernel, so its gradient is taken here, once per row.
            D = (dout * out).sum(-1)
            p = torch.exp(_f32(sinks).view(1, -1, 1) - lse)
            up = -D if dlse is None else dlse - D
            dsinks = (p * up).sum((0, 2)).to(sinks.dtype)
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            None if dalibi is None else dalibi.to(alibi.dtype),
            dsinks,
            None if drel is None else drel.to(table.dtype),
            None, None, None, None,
        )


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Union[None, Mask, BlockMask, Callable] = None,
    *,
    group=None,
    layout: str = "zigzag",
    scale: Optional[float] = None,
    return_lse: bool = False,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    relative_bias: Optional[RelativeBias] = None,
):
    """This rank's shard of ``maskattn.attention`` over the whole sequence (ring attention).

    ``q [B, H_q, L_r, d]``, ``k, v [B, H_kv, L_r, d]``: this rank's shards of the sequence
    dimension (dim 2) in ``layout`` (``"zigzag"``, the default, or ``"contiguous"``), as
    :func:`shard` cuts them; every rank of ``group`` (default: the whole world) calls
    this together. ``mask``: ``None`` (full), the global :class:`~maskattn.Mask`, a
    :class:`~maskattn.BlockMask` compiled for the whole ``(B, H_q, L, L)`` or a
    FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)`` over global positions. Score
    modifiers as in :func:`maskattn.attention`, at global positions: ``softcap``,
    ``alibi_slopes [H_q]``, ``sinks [H_q]`` (joined once per row, after the ring), a
    :class:`~maskattn.RelativeBias`; a parameter's gradient on each rank is this rank's
    rows' share (sum it across the group, as for any replicated parameter).

    Returns this rank's ``out [B, H_q, L_r, d]`` (q's dtype) and, with ``return_lse``,
    ``lse [B, H_q, L_r]`` (float32, differentiable). Waits are bounded by the process
    group's timeout: a dead or silent peer raises :class:`PeerError`.
    """
    _check_layout(layout)
    group, world, rank = _group_info(group)
    _check(q, k, v)
    if k.shape[2] != v.shape[2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same [B, H_kv, L]")
    if k.shape[2] != q.shape[2]:
        raise ValueError(
            f"k: this rank's key shard has {k.shape[2]} positions but its query shard {q.shape[2]}; "
            "context parallelism shards one sequence (self-attention)"
        )
    if k.shape[0] != q.shape[0] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: same B, H_q a multiple of H_kv")
    B, H, Lr, d = q.shape
    meta = _gather_ints([Lr, B, H, k.shape[1], d, _DTYPES[q.dtype]], group, "context_parallel_attention")
    for i, what in ((1, "batch B"), (2, "query heads H_q"), (3, "key heads H_kv"), (4, "head dim d"), (5, "dtype")):
        if len({row[i] for row in meta}) != 1:
            raise ShardMismatchError(f"q: the ranks' {what} differ: {[row[i] for row in meta]}")
    lens = [row[0] for row in meta]
    total = sum(lens)
    if layout == "zigzag":
        _check_zigzag(lens, total, world, "q")
        pieces = _pieces(total, world, layout)
    else:
        pieces = _contiguous([[n] for n in lens])
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    # The modifiers checked as maskattn.attention checks them (a whole-sequence-shaped q
    # and k stand in: the checks read only B and H).
    softcap, alibi, sinks, _, table, rel_cfg = _check_mods(q, k, softcap, alibi_slopes, sinks, None, relative_bias)
    native_mask = _native_mask(mask, B, H, total)
    plan = _Plan(group, world, rank, pieces, native_mask, B, H, total)
    out, lse = _RingAttention.apply(q, k, v, alibi, sinks, table, plan, scale, softcap, rel_cfg)
    return (out, lse) if return_lse else out
