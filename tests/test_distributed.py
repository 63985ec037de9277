"""moe_finalize_plugin.distributed on real process groups.

Every case is checked on every rank against the single-process finalize over all
experts (``moe_finalize_plugin.finalize``; for TP, over the fp32 sum of the ranks'
partial expert outputs, cast once).

Tolerance (stated, not tuned): partials are rounded to the input dtype before the
reduction and the reduction of W partials rounds up to W - 1 times more, while the
single-process result rounds once. Per element

    |got - ref| <= ((W + 1) * u + (2 K + W) * 2**-24) * S,
    S = |residual| + |scale| * sum_r sum_k |w_k| * |x_rk|

with u the unit roundoff of the dtype (bf16 2**-8, fp16 2**-11, fp32 2**-24); the
second term covers fp32 accumulation order. Stronger checks where the contract
allows them: with two ranks the result is bitwise cast(p0 + p1) of the two local
finalizes; tokens whose slots are all dropped get exactly the residual (so it is
added once); all_reduce leaves bitwise the same tensor on every rank; the fused
path equals the unfused one bitwise with two ranks.

Worlds: gloo on CPU with 2 and 4 processes always (CI); NCCL with 2 processes, one
GPU each, where >= 2 CUDA devices exist -- there the symmetric-memory fused path
must arm for bf16/fp32, and every distributed call runs under
``torch.cuda.set_sync_debug_mode("error")`` (no host syncs). Each world is spawned
once (all cases in one run, bounded by WORLD_TIMEOUT_S); only loopback is used.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moe_finalize_plugin as mfp
from moe_finalize_plugin import distributed as mfd
from moe_finalize_plugin import reference

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
FP32_ROUNDOFF = 2.0**-24
# NVLink multicast / NVLS stay off in every process these tests start.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
WORLD_TIMEOUT_S = 150.0
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


@dataclasses.dataclass(frozen=True)
class Case:
    """One distributed finalize problem; every world runs every case."""

    name: str
    parallel: str = "ep"  # "ep": experts split across ranks; "tp": partial sums on every rank
    mode: str = "all_reduce"  # "all_reduce" | "reduce_scatter" | "fused"
    dtype: torch.dtype = torch.bfloat16
    tokens: int = 33
    top_k: int = 4
    hidden: int = 72
    num_experts: int = 13
    partition: str = "default"  # "default" (uneven if E % W) | "empty_first"/"empty_last" | "round_robin"
    layout: str = "slice"  # "slice" of expert-sorted rows | "full" buffer | "token_major" (row_map=None)
    map_order: str = "token"  # "token" | "kmajor" (map.view(K, T).t())
    map_dtype: torch.dtype = torch.int32
    weights: torch.dtype | None = torch.float32
    residual: bool = True
    scale: float = 1.0
    drop: float = 0.1  # fraction of dropped slots (-1 in the global map)
    out: str = "new"  # "new" | "residual" (in-place) | "strided" (row stride > H)
    split: str = "default"  # reduce_scatter: "default" | "zero_first" (rank 0 keeps no token)
    offset_tensor: bool = False  # pass ep_local_row_map's row_offset as a 0-d tensor
    max_tokens: int = 64  # fused buffer capacity
    force_rs_fallback: bool = False  # take the all_reduce fallback of reduce_scatter


CASES = [
    Case("ep_ar_slice"),
    Case("ep_ar_kmajor_int64", layout="full", map_order="kmajor", map_dtype=torch.int64,
         weights=torch.bfloat16, scale=2.5),
    Case("ep_ar_empty_rank_inplace", partition="empty_last", out="residual", tokens=20),
    Case("ep_ar_empty_rank0_residual", partition="empty_first", tokens=17, scale=2.5),
    Case("ep_ar_round_robin_fp16_strided", partition="round_robin", layout="full",
         dtype=torch.float16, weights=None, residual=False, out="strided", num_experts=10),
    Case("ep_ar_token_major_fp32", layout="token_major", dtype=torch.float32, scale=0.5,
         weights=torch.float16),
    Case("ep_ar_decode_offset_tensor", tokens=1, top_k=8, num_experts=32, offset_tensor=True,
         drop=0.0),
    Case("ep_ar_mostly_dropped", tokens=9, drop=0.6, hidden=40),
    Case("ep_ar_no_tokens", tokens=0),
    Case("tp_ar", parallel="tp", tokens=48, hidden=64),
    Case("tp_ar_fp32_kmajor", parallel="tp", dtype=torch.float32, map_order="kmajor",
         residual=False, scale=2.5),
    Case("tp_ar_token_major", parallel="tp", layout="token_major", drop=0.0, out="strided"),
    Case("ep_rs_even", mode="reduce_scatter", tokens=32),
    Case("ep_rs_uneven", mode="reduce_scatter", tokens=35, partition="empty_last", layout="full"),
    Case("tp_rs_zero_first_strided", parallel="tp", mode="reduce_scatter", tokens=30,
         split="zero_first", out="strided"),
    Case("ep_rs_fallback", mode="reduce_scatter", tokens=34, force_rs_fallback=True),
    Case("ep_rs_no_tokens", mode="reduce_scatter", tokens=0),
    Case("tp_fused", parallel="tp", mode="fused", tokens=16),
    Case("ep_fused_decode_inplace", mode="fused", tokens=1, top_k=8, num_experts=32,
         out="residual", drop=0.0),
    Case("ep_fused_fp32_empty_rank", mode="fused", dtype=torch.float32, partition="empty_last",
         tokens=24),
    Case("ep_fused_empty_rank0_inplace", mode="fused", partition="empty_first", tokens=6,
         out="residual"),
    Case("ep_fused_over_capacity", mode="fused", tokens=40, max_tokens=32),
    Case("ep_fused_fp16_fallback", mode="fused", dtype=torch.float16, tokens=8),
    Case("tp_fused_strided_out", parallel="tp", mode="fused", tokens=12, out="strided",
         residual=False),
]
CASE_IDS = [c.name for c in CASES]


# ----------------------------------------------------------------------------- problems


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _partition(case: Case, world_size: int) -> list[range | torch.Tensor]:
    e = case.num_experts
    if case.partition == "round_robin":
        return [torch.arange(e) % world_size == r for r in range(world_size)]
    if case.partition in ("empty_first", "empty_last"):  # one rank owns no expert
        sizes = [len(r) for r in mfd.expert_partition(e, world_size - 1)]
        sizes = [0] + sizes if case.partition == "empty_first" else sizes + [0]
        return list(mfd.expert_partition(e, world_size, sizes))
    return list(mfd.expert_partition(e, world_size))


def _is_local(topk_ids: torch.Tensor, experts: range | torch.Tensor) -> torch.Tensor:
    # Written independently of ep_local_row_map, which is under test.
    if isinstance(experts, range):
        return torch.tensor(
            [[int(i) in experts for i in row] for row in topk_ids.tolist()], dtype=torch.bool
        ).view(topk_ids.shape)
    members = set(torch.nonzero(experts).flatten().tolist())
    return torch.tensor(
        [[int(i) in members for i in row] for row in topk_ids.tolist()], dtype=torch.bool
    ).view(topk_ids.shape)


def _kmajor(m: torch.Tensor) -> torch.Tensor:
    """The same [T, K] map stored k-major (strides (1, T)), as TRT-LLM/TE produce it."""
    return m.t().contiguous().t()


@dataclasses.dataclass
class Problem:
    """What one rank passes to the distributed call, plus what the checks need."""

    input: torch.Tensor  # this rank's input
    row_map: torch.Tensor | None  # this rank's map
    weights: torch.Tensor | None
    residual: torch.Tensor | None
    ref: torch.Tensor  # single-process finalize over all experts, [T, H]
    bound: torch.Tensor  # per-element tolerance, [T, H]
    partials: list[torch.Tensor]  # every rank's local finalize (rank 0's with residual)
    all_dropped: list[int]  # tokens with every slot dropped
    remote_only: bool  # some rank holds none of a routed token's experts


def _ep_problem(case: Case, world_size: int, rank: int, device: torch.device) -> Problem:
    g = torch.Generator().manual_seed(_seed(case.name))
    t, k, h, e, dtype = case.tokens, case.top_k, case.hidden, case.num_experts, case.dtype
    partition = _partition(case, world_size)
    topk_ids = torch.rand(t, e, generator=g).argsort(dim=1)[:, :k].contiguous()
    topk_ids[torch.rand(t, k, generator=g) < case.drop] = -1
    if t >= 2:
        topk_ids[1] = -1  # every slot dropped
        # token 0 routed to rank 0's experts only: the other ranks hold none of them
        first = partition[0]
        mine = list(first) if isinstance(first, range) else torch.nonzero(first).flatten().tolist()
        topk_ids[0] = -1
        topk_ids[0, : min(k, len(mine))] = torch.tensor(mine[:k], dtype=topk_ids.dtype)
    dropped = topk_ids < 0
    weights = None if case.weights is None else torch.randn(t, k, generator=g).to(case.weights)
    residual = torch.randn(t, h, generator=g).to(dtype) if case.residual else None
    flat = topk_ids.flatten().tolist()

    # Expert-sorted buffer; each expert's rows padded to a multiple of 4 with NaN rows
    # (tile padding) that must never be read.
    counts = [0] * e
    for x in flat:
        if x >= 0:
            counts[x] += 1
    padded = [(c + 3) // 4 * 4 for c in counts]
    starts = [sum(padded[:i]) for i in range(e)]
    fill = list(starts)
    rows = [-1] * len(flat)
    for s, x in enumerate(flat):
        if x >= 0:
            rows[s], fill[x] = fill[x], fill[x] + 1
    total = sum(padded)
    buffer = torch.full((total, h), float("nan"), dtype=dtype)
    used = [r for r in rows if r >= 0]
    buffer[used] = torch.randn(len(used), h, generator=g).to(dtype)
    global_map = torch.tensor(rows, dtype=torch.int64).view(t, k)
    local = [_is_local(topk_ids, experts) for experts in partition]

    # Built on the CPU (same bits on every rank), computed on the rank's device, so the
    # reference and the partials run the same kernels as the distributed call.
    buffer, global_map, dropped = buffer.to(device), global_map.to(device), dropped.to(device)
    topk_dev = topk_ids.to(device)
    weights = None if weights is None else weights.to(device)
    residual = None if residual is None else residual.to(device)

    def local_problem(r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        experts = partition[r]
        if case.layout == "token_major":
            # vLLM Triton layout: slot (t, k) in row t*K + k; remote slots hold garbage.
            inp = torch.full((t * k, h), float("nan"), dtype=dtype, device=device)
            mine = local[r].flatten().to(device)
            inp[mine] = buffer[global_map.flatten()[mine]]
            return inp, mfd.ep_local_row_map(topk_dev, _on(experts, device), None)
        gmap = global_map.to(case.map_dtype)
        gmap = _kmajor(gmap) if case.map_order == "kmajor" else gmap
        if case.layout == "full":
            inp = torch.full_like(buffer, float("nan"))
            mine = [rows[s] for s in range(len(flat)) if local[r].flatten()[s]]
            inp[mine] = buffer[mine]
            lmap = mfd.ep_local_row_map(topk_dev, _on(experts, device), gmap)
        else:  # "slice": this rank's experts are one contiguous run of rows
            assert isinstance(experts, range)
            first = starts[experts.start] if experts.start < e else total
            last = first + sum(padded[experts.start : experts.stop])
            inp = buffer[first:last].clone()
            offset = torch.tensor(first, device=device) if case.offset_tensor else first
            lmap = mfd.ep_local_row_map(topk_dev, experts, gmap, row_offset=offset)
        return inp, (_kmajor(lmap) if case.map_order == "kmajor" else lmap)

    inputs = [local_problem(r) for r in range(world_size)]
    ref_map = global_map.to(case.map_dtype)
    if case.layout == "token_major":
        ref_input = torch.full((t * k, h), float("nan"), dtype=dtype, device=device)
        ok = global_map.flatten() >= 0
        ref_input[ok] = buffer[global_map.flatten()[ok]]
        slots = torch.arange(t * k, device=device).view(t, k)
        ref_map = torch.where(dropped, -1, slots).to(case.map_dtype)
    else:
        ref_input = buffer
    ref = mfp.finalize(ref_input, ref_map, weights, residual=residual, scale=case.scale)
    abs_sum = reference.finalize(
        ref_input.float().abs(), ref_map, None if weights is None else weights.float().abs(),
        residual=None if residual is None else residual.float().abs(), scale=abs(case.scale),
    )
    valid = topk_ids >= 0
    remote_only = any(bool((valid.any(1) & ~(loc & valid).any(1)).any()) for loc in local)
    inp, lmap = inputs[rank]
    return Problem(
        input=inp, row_map=lmap, weights=weights, residual=residual, ref=ref,
        bound=_bound(case, world_size, abs_sum),
        partials=[_local_finalize(case, inputs[r][0], inputs[r][1], weights, residual, r, t)
                  for r in range(world_size)],
        all_dropped=[i for i in range(t) if bool(dropped[i].all())],
        remote_only=remote_only,
    )


def _tp_problem(case: Case, world_size: int, rank: int, device: torch.device) -> Problem:
    g = torch.Generator().manual_seed(_seed(case.name))
    t, k, h, dtype = case.tokens, case.top_k, case.hidden, case.dtype
    weights = None if case.weights is None else torch.randn(t, k, generator=g).to(case.weights)
    residual = torch.randn(t, h, generator=g).to(dtype) if case.residual else None
    if case.layout == "token_major":
        rows = t * k
        row_map: torch.Tensor | None = None
        ref_map = torch.arange(rows).view(t, k).to(case.map_dtype)
        dropped = torch.zeros(t, k, dtype=torch.bool)
    else:
        rows = t * k + 3  # 3 NaN padding rows nobody maps
        dropped = torch.rand(t, k, generator=g) < case.drop
        if t >= 2:
            dropped[1] = True
        perm = torch.randperm(t * k, generator=g).view(t, k)
        ref_map = torch.where(dropped, -1, perm).to(case.map_dtype)
        row_map = _kmajor(ref_map) if case.map_order == "kmajor" else ref_map
    # Row-parallel down projection: rank r holds partial r of every expert output.
    inputs = []
    for _ in range(world_size):
        x = torch.randn(rows, h, generator=g).to(dtype)
        x[t * k :] = float("nan")
        inputs.append(x.to(device))
    weights = None if weights is None else weights.to(device)
    residual = None if residual is None else residual.to(device)
    ref_map, dropped = ref_map.to(device), dropped.to(device)
    row_map = None if row_map is None else row_map.to(device)
    total = torch.stack([x.float() for x in inputs]).sum(0)
    ref = mfp.finalize(
        total, ref_map, weights, residual=None if residual is None else residual.float(),
        scale=case.scale,
    ).to(dtype)
    abs_sum = reference.finalize(
        torch.stack([x.float().abs() for x in inputs]).sum(0), ref_map,
        None if weights is None else weights.float().abs(),
        residual=None if residual is None else residual.float().abs(), scale=abs(case.scale),
    )
    return Problem(
        input=inputs[rank], row_map=row_map, weights=weights, residual=residual, ref=ref,
        bound=_bound(case, world_size, abs_sum),
        partials=[_local_finalize(case, inputs[r], row_map, weights, residual, r, t)
                  for r in range(world_size)],
        all_dropped=[i for i in range(t) if bool(dropped[i].all())],
        remote_only=False,
    )


def _local_finalize(
    case: Case, inp: torch.Tensor, row_map: torch.Tensor | None, weights: torch.Tensor | None,
    residual: torch.Tensor | None, rank: int, tokens: int,
) -> torch.Tensor:
    """Rank `rank`'s partial, as the contract defines it (residual on rank 0 only)."""
    res = residual if rank == 0 else None
    if inp.shape[0] == 0:  # no local rows: nothing but the residual
        if res is not None:
            return res.clone()
        return torch.zeros(tokens, case.hidden, dtype=case.dtype, device=inp.device)
    top_k = case.top_k if row_map is None and weights is None else None
    return mfp.finalize(inp, row_map, weights, top_k=top_k, residual=res, scale=case.scale)


def _bound(case: Case, world_size: int, abs_sum: torch.Tensor) -> torch.Tensor:
    u = UNIT_ROUNDOFF[case.dtype]
    return ((world_size + 1) * u + (2 * case.top_k + world_size) * FP32_ROUNDOFF) * abs_sum


# ----------------------------------------------------------------------------- one case


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _on(experts: range | torch.Tensor, device: torch.device) -> range | torch.Tensor:
    return experts.to(device) if isinstance(experts, torch.Tensor) else experts


class _NoHostSync:
    """On CUDA, turns any host sync inside the block into an error."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")


def _run_case(
    case: Case, rank: int, world_size: int, backend: str, device: torch.device
) -> tuple[list[str], str | None]:
    build = _tp_problem if case.parallel == "tp" else _ep_problem
    p = build(case, world_size, rank, device)
    t, h, dtype = case.tokens, case.hidden, case.dtype
    failures: list[str] = []

    if case.mode == "reduce_scatter":
        sizes = mfd.reduce_scatter_sizes(t, world_size)
        if case.split == "zero_first":
            sizes = [0] + mfd.reduce_scatter_sizes(t, world_size - 1)
        start, rows = sum(sizes[:rank]), sizes[rank]
    else:
        start, rows = 0, t
    residual_arg = p.residual
    out = None
    if case.out == "residual":
        assert p.residual is not None
        out = residual_arg = p.residual.clone()
    elif case.out == "strided":
        out = torch.full((rows, h + 8), float("nan"), dtype=dtype, device=device)[:, :h]
    top_k = case.top_k if p.row_map is None and p.weights is None else None
    kwargs: dict[str, Any] = dict(top_k=top_k, residual=residual_arg, scale=case.scale, out=out)

    fused_op = None
    if case.mode == "fused":  # host-synchronous init, outside the no-sync block
        fused_op = mfd.FusedFinalizeAllReduce(h, dtype, max_tokens=case.max_tokens, device=device)
        armed = backend == "nccl" and dtype in (torch.bfloat16, torch.float32)
        if fused_op.fused != armed:
            failures.append(f"fused={fused_op.fused}, expected {armed} (reason: {fused_op.reason!r})")
        if not fused_op.fused and not fused_op.reason:
            failures.append("fallback without a reason")

    if case.force_rs_fallback:
        mfd._NO_REDUCE_SCATTER.add(str(dist.get_backend()))
    try:
        with _NoHostSync(device):
            if case.mode == "all_reduce":
                got = mfd.finalize_all_reduce(p.input, p.row_map, p.weights, **kwargs)
            elif case.mode == "reduce_scatter":
                split = None if case.split == "default" else sizes
                got = mfd.finalize_reduce_scatter(
                    p.input, p.row_map, p.weights, split_sizes=split, **kwargs
                )
            else:
                assert fused_op is not None
                got = fused_op(p.input, p.row_map, p.weights, **kwargs)
                took_fused = fused_op.fused and 0 < t <= case.max_tokens
                if fused_op.last_fused != took_fused:
                    failures.append(f"last_fused={fused_op.last_fused}, expected {took_fused}")
                unfused = mfd.finalize_all_reduce(
                    p.input, p.row_map, p.weights, top_k=top_k,
                    residual=None if p.residual is None else p.residual.clone(), scale=case.scale,
                )
    finally:
        if case.force_rs_fallback:
            mfd._NO_REDUCE_SCATTER.discard(str(dist.get_backend()))

    if out is not None and got is not out:
        failures.append("did not return `out`")
    if tuple(got.shape) != (rows, h) or got.dtype != dtype:
        failures.append(f"got {tuple(got.shape)} {got.dtype}, expected ({rows}, {h}) {dtype}")
        return failures, None
    ref = p.ref[start : start + rows]
    err = (got.double() - ref.double()).abs()
    ok = err <= p.bound[start : start + rows].double()
    if not bool(ok.all()):
        i, j = (~ok).nonzero()[0].tolist()
        failures.append(
            f"token {start + i}, col {j}: got {got[i, j].item()}, single-process {ref[i, j].item()}, "
            f"allowed error {p.bound[start + i, j].item():.3g}; {int((~ok).sum())} elements off"
        )
    if world_size == 2 and rows:  # two ranks: exactly one rounding of p0 + p1
        exact = (p.partials[0].float() + p.partials[1].float()).to(dtype)[start : start + rows]
        if not torch.equal(got, exact):
            failures.append("2 ranks: result is not bitwise cast(p0 + p1)")
    for tok in p.all_dropped:  # every slot dropped: the residual, added once, bitwise
        if start <= tok < start + rows:
            want = p.residual[tok] if p.residual is not None else torch.zeros_like(got[0])
            if not torch.equal(got[tok - start], want):
                failures.append(f"token {tok} (all slots dropped) is not exactly the residual")
    if case.mode == "fused" and (world_size == 2 or fused_op is None or not fused_op.fused):
        if not torch.equal(got, unfused):
            failures.append("fused result differs from finalize_all_reduce")
    if case.parallel == "ep" and t > 1 and not p.remote_only:
        failures.append("case has no token whose experts all live on other ranks")
    digest = _digest(got) if case.mode != "reduce_scatter" else None
    return failures, digest


def _check_api(world_size: int, device: torch.device) -> list[str]:
    """Bad calls raise ValueError naming the argument, on every rank alike; on CUDA the
    EP map helper runs without host syncs."""
    failures = []
    ids = torch.tensor([[0, 5, -1], [7, 2, 9]], device=device)
    offset = torch.tensor(1, device=device)  # made outside: a host-to-device copy syncs
    odd = torch.arange(10, device=device) % 2 == 1
    with _NoHostSync(device):
        try:
            by_range = mfd.ep_local_row_map(ids, range(2, 8), row_offset=offset)
            by_mask = mfd.ep_local_row_map(ids, odd)
        except RuntimeError as exc:
            failures.append(f"ep_local_row_map: {exc}")
    if not failures:
        if by_range.tolist() != [[-1, 0, -1], [2, 3, -1]] or by_mask.tolist() != [[-1, 1, -1], [3, -1, 5]]:
            failures.append(f"ep_local_row_map gave {by_range.tolist()} and {by_mask.tolist()}")
    x = torch.randn(8, 16, device=device, dtype=torch.bfloat16)
    m = torch.arange(8, device=device, dtype=torch.int32).view(4, 2)
    calls = {
        "out must be": lambda: mfd.finalize_all_reduce(x, m, out=torch.empty(3, 16, device=device)),
        "split_sizes must be": lambda: mfd.finalize_reduce_scatter(x, m, split_sizes=[4] * (world_size + 1)),
        "out must be \\[": lambda: mfd.finalize_reduce_scatter(
            x, m, out=torch.empty(9, 16, dtype=torch.bfloat16, device=device)),
    }
    for expected, call in calls.items():
        try:
            call()
            failures.append(f"no error for a call that should raise {expected!r}")
        except ValueError as exc:
            if not re.search(expected, str(exc)):
                failures.append(f"error {exc!r} does not match {expected!r}")
    return failures


# ----------------------------------------------------------------------------- worlds


def _worker(
    rank: int, world_size: int, backend: str, port: int, cases: list[Case], result_dir: str
) -> None:
    os.environ.update(NO_MULTICAST_ENV)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)  # 4 ranks share 2 cores in CI
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT, device_id=device,
        )
    else:
        device = torch.device("cpu")
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        try:
            failures, digest = _run_case(case, rank, world_size, backend, device)
        except Exception as exc:  # report it against the case; later cases still run
            failures, digest = [f"raised {type(exc).__name__}: {exc}"], None
        results[case.name] = {"failures": failures, "digest": digest}
    results["api"] = {"failures": _check_api(world_size, device), "digest": None}
    dist.barrier()
    dist.destroy_process_group()
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def _world(backend: str, world_size: int) -> list[dict[str, dict[str, Any]]]:
    """Spawn the world once, run every case, return each rank's results."""
    os.environ.update(NO_MULTICAST_ENV)  # inherited by the spawned ranks
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _worker, args=(world_size, backend, _free_port(), CASES, tmp),
            nprocs=world_size, join=False, start_method="spawn",
        )
        deadline = time.monotonic() + WORLD_TIMEOUT_S
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                raise TimeoutError(f"{backend} world of {world_size} ran past {WORLD_TIMEOUT_S} s")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world_size)]


WORLDS = [("gloo", 2), ("gloo", 4)]
if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
    WORLDS.append(("nccl", 2))
WORLD_IDS = [f"{b}-{w}" for b, w in WORLDS]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend,world_size", WORLDS, ids=WORLD_IDS)
def test_distributed_finalize(backend: str, world_size: int, case: Case) -> None:
    ranks = _world(backend, world_size)
    problems = [f"rank {r}: {f}" for r, res in enumerate(ranks) for f in res[case.name]["failures"]]
    assert not problems, "\n".join(problems)
    if case.mode != "reduce_scatter":
        digests = {res[case.name]["digest"] for res in ranks}
        assert len(digests) == 1, "ranks hold different results after the all-reduce"


@pytest.mark.parametrize("backend,world_size", WORLDS, ids=WORLD_IDS)
def test_api_checks(backend: str, world_size: int) -> None:
    ranks = _world(backend, world_size)
    problems = [f"rank {r}: {f}" for r, res in enumerate(ranks) for f in res["api"]["failures"]]
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- helpers (1 process)


def test_expert_partition_uneven_and_explicit() -> None:
    assert mfd.expert_partition(13, 4) == [range(0, 4), range(4, 7), range(7, 10), range(10, 13)]
    assert mfd.expert_partition(3, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 3)]
    assert mfd.expert_partition(8, 3, [5, 0, 3]) == [range(0, 5), range(5, 5), range(5, 8)]
    with pytest.raises(ValueError, match="sizes must be 3 non-negative counts summing to num_experts=8"):
        mfd.expert_partition(8, 3, [4, 4])
    with pytest.raises(ValueError, match="world_size >= 1"):
        mfd.expert_partition(8, 0)


def test_reduce_scatter_sizes() -> None:
    assert mfd.reduce_scatter_sizes(10, 4) == [3, 3, 2, 2]
    assert mfd.reduce_scatter_sizes(1, 2) == [1, 0]
    assert [len(c) for c in torch.arange(10).tensor_split(4)] == mfd.reduce_scatter_sizes(10, 4)


@pytest.mark.parametrize("map_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("order", ["token", "kmajor", "none"])
@pytest.mark.parametrize("experts", ["range", "mask"])
def test_ep_local_row_map(map_dtype: torch.dtype, order: str, experts: str) -> None:
    g = torch.Generator().manual_seed(7)
    t, k, e = 11, 3, 9
    ids = torch.randint(-1, e + 2, (t, k), generator=g)  # includes dropped (-1) and ids >= E
    global_map = torch.randperm(t * k, generator=g).view(t, k).to(map_dtype)
    global_map[0, 0] = -1  # a dropped slot whose id still names a local expert
    ids[0, 0] = 3
    local: range | torch.Tensor = range(2, 6)
    if experts == "mask":
        local = torch.tensor([i % 3 == 1 for i in range(e)])
    members = set(local) if isinstance(local, range) else set(torch.nonzero(local).flatten().tolist())
    row_map = None if order == "none" else (_kmajor(global_map) if order == "kmajor" else global_map)
    rows = torch.arange(t * k).view(t, k) if row_map is None else global_map
    for offset in (0, 5, torch.tensor(5)):
        got = mfd.ep_local_row_map(ids, local, row_map, row_offset=offset)
        want = [
            [int(rows[i, j]) - int(offset) if int(ids[i, j]) in members and int(rows[i, j]) >= 0 else -1
             for j in range(k)]
            for i in range(t)
        ]
        assert got.tolist() == want
        assert got.dtype == (torch.int32 if row_map is None else map_dtype)
        assert got.is_contiguous()


def test_ep_local_row_map_bad_arguments() -> None:
    ids = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="topk_ids must be a \\[T, K\\] integer tensor"):
        mfd.ep_local_row_map(ids.float(), range(2))
    with pytest.raises(ValueError, match="row_map must be int32/int64 of topk_ids' shape"):
        mfd.ep_local_row_map(ids, range(2), torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="step 1"):
        mfd.ep_local_row_map(ids, range(0, 4, 2))
    with pytest.raises(ValueError, match="experts mask must be a 1-D bool tensor"):
        mfd.ep_local_row_map(ids, torch.ones(4))
    with pytest.raises(TypeError, match="experts must be a range or a bool mask"):
        mfd.ep_local_row_map(ids, [0, 1])  # type: ignore[arg-type]
