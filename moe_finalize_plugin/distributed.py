"""MoE finalize across an expert- or tensor-parallel process group (torch.distributed).

Both kinds of parallelism reduce to the same two steps:

1. every rank finalizes what it holds into a partial ``[T, H]``:
   * **EP** -- the rank holds a slice of the experts; slots whose expert lives on
     another rank get ``-1`` in its map (:func:`ep_local_row_map`), so they are
     skipped and their rows are never read;
   * **TP** -- the rank holds a partial sum of every expert's output (row-parallel
     down projection); it finalizes with the full map;
2. the partials are summed across the group: ``all_reduce`` (every rank gets all
   ``T`` tokens, :func:`finalize_all_reduce`) or ``reduce_scatter`` (rank ``r``
   keeps its token shard, :func:`finalize_reduce_scatter`).

Decisions (the README's "Expert and tensor parallelism" section explains them):

* **Residual exactly once, on group rank 0.** Rank 0 passes ``residual`` to its
  local finalize, where the op adds it for free; the others finalize without it.
  Adding it after the reduce would cost another pass over ``[T, H]`` and another
  launch, and the symmetric-memory all-reduce has no epilogue to fuse it into.
  Other ranks' ``residual`` arguments are ignored (they may pass ``None``).
* **Partials and the reduction are in the input dtype.** The op's ``out`` has the
  dtype of ``input``, so a bf16 partial is rounded once before the reduction, and
  the reduction of ``W`` partials rounds up to ``W - 1`` more times. Against the
  single-process finalize over all experts (one rounding) the difference is at
  most ``(W + 1) * u * S`` per element, where ``u`` is the dtype's unit roundoff
  (bf16 ``2**-8``, fp16 ``2**-11``, fp32 ``2**-24``) and
  ``S = |residual| + |scale| * sum_k |w_k * x_k|`` -- what vLLM, SGLang and
  TensorRT-LLM do today (bf16 partials, bf16 all-reduce). Reducing fp32 partials
  would need an fp32 copy of the expert outputs (the op writes the input dtype)
  and twice the bytes on the wire, at the sizes where the wire is the cost.
  With two ranks the result is ``cast(p0 + p1)``, bitwise the same on the NCCL
  and the symmetric-memory paths.
* **No host syncs** on the GPU path: no ``.item()``, no data-dependent shapes;
  the collectives are enqueued on the current stream.

:class:`FusedFinalizeAllReduce` is the decode-size fast path: each rank finalizes
straight into its slice of a symmetric-memory buffer and
``torch.ops.symm_mem.one_shot_all_reduce_out`` reads the peers' rows over NVLink
P2P (no multicast / NVLS). Where that is unavailable (CPU, gloo, fp16, no peer
access, more tokens than the buffer holds) it falls back to
:func:`finalize_all_reduce`, bitwise the same result with two ranks.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

import moe_finalize_plugin as _pkg

__all__ = [
    "FusedFinalizeAllReduce",
    "ep_local_row_map",
    "expert_partition",
    "finalize_all_reduce",
    "finalize_reduce_scatter",
    "reduce_scatter_sizes",
]

# The symmetric-memory one-shot kernel is instantiated for these dtypes only.
_SYMM_MEM_DTYPES = (torch.bfloat16, torch.float32)

# Backends found to lack reduce_scatter (gloo before torch 2.12 or so): those reduce
# with all_reduce and keep their shard, which is correct at twice the traffic.
_NO_REDUCE_SCATTER: set[str] = set()

# `reduce_scatter_tensor` is deprecated from torch 2.14 on; 2.11 lacks the new name.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def expert_partition(
    num_experts: int, world_size: int, sizes: Sequence[int] | None = None
) -> list[range]:
    """Contiguous expert ranges, one per EP rank.

    Without ``sizes`` the first ``num_experts % world_size`` ranks get one expert more
    than the rest (vLLM's convention), so uneven counts are fine. ``sizes`` gives
    each rank's count explicitly; zero is allowed (a rank with no experts).
    """
    if num_experts < 0 or world_size < 1:
        raise ValueError(
            f"expert_partition: need num_experts >= 0 and world_size >= 1, "
            f"got num_experts={num_experts}, world_size={world_size}"
        )
    if sizes is None:
        base, extra = divmod(num_experts, world_size)
        sizes = [base + (1 if r < extra else 0) for r in range(world_size)]
    else:
        sizes = list(sizes)
        if len(sizes) != world_size or any(s < 0 for s in sizes) or sum(sizes) != num_experts:
            raise ValueError(
                f"expert_partition: sizes must be {world_size} non-negative counts summing to "
                f"num_experts={num_experts}, got {sizes}"
            )
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges


def ep_local_row_map(
    topk_ids: Tensor,
    experts: range | Tensor,
    row_map: Tensor | None = None,
    *,
    row_offset: int | Tensor = 0,
) -> Tensor:
    """This EP rank's ``row_map``: ``row_map[t, k] - row_offset`` where slot (t, k)'s
    expert is local, ``-1`` everywhere else.

    Args:
        topk_ids: ``[T, K]`` global expert id of each slot; negative = dropped slot.
        experts: the local experts, a contiguous ``range`` (see
            :func:`expert_partition`) or a ``[E]`` bool mask on ``topk_ids``' device
            for any placement (round-robin, EPLB). Ids outside ``[0, E)`` are not local.
        row_map: ``[T, K]`` global map, int32 or int64, any strides; ``None`` means the
            token-major layout (slot (t, k) in row ``t * K + k``), as in
            :func:`moe_finalize_plugin.finalize`.
        row_offset: subtracted from local entries, for a rank whose buffer is the
            slice of an expert-sorted buffer starting at its first expert (may be a
            0-d device tensor, e.g. from a cumsum of expert counts: no host sync).

    Returns:
        A contiguous ``[T, K]`` map of ``row_map``'s dtype (int32 when ``None``).
        Pure tensor ops, so it is capturable in CUDA graphs and never syncs.
    """
    if topk_ids.dim() != 2 or topk_ids.is_floating_point() or topk_ids.is_complex():
        raise ValueError(
            f"ep_local_row_map: topk_ids must be a [T, K] integer tensor, got "
            f"{topk_ids.dim()}-D {topk_ids.dtype}"
        )
    num_tokens, top_k = topk_ids.shape
    if row_map is None:
        row_map = torch.arange(num_tokens * top_k, dtype=torch.int32, device=topk_ids.device)
        row_map = row_map.view(num_tokens, top_k)
    elif row_map.shape != topk_ids.shape or row_map.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"ep_local_row_map: row_map must be int32/int64 of topk_ids' shape "
            f"{tuple(topk_ids.shape)}, got {row_map.dtype} {tuple(row_map.shape)}"
        )
    if row_map.device != topk_ids.device:
        raise ValueError(
            f"ep_local_row_map: row_map is on {row_map.device}, topk_ids on {topk_ids.device}"
        )
    if isinstance(experts, range):
        if experts.step != 1:
            raise ValueError(f"ep_local_row_map: experts range must have step 1, got {experts}")
        local = (topk_ids >= experts.start) & (topk_ids < experts.stop)
    elif isinstance(experts, Tensor):
        if experts.dim() != 1 or experts.dtype != torch.bool or experts.device != topk_ids.device:
            raise ValueError(
                f"ep_local_row_map: experts mask must be a 1-D bool tensor on {topk_ids.device}, "
                f"got {experts.dim()}-D {experts.dtype} on {experts.device}"
            )
        num_experts = experts.shape[0]
        in_range = (topk_ids >= 0) & (topk_ids < num_experts)
        # clamp only keeps the gather in bounds; in_range already rejects those ids
        local = in_range & experts[topk_ids.clamp(0, max(num_experts - 1, 0))]
    else:
        raise TypeError(
            f"ep_local_row_map: experts must be a range or a bool mask tensor, got {type(experts)}"
        )
    local = local & (row_map >= 0)
    return torch.where(local, row_map - row_offset, -1).to(row_map.dtype).contiguous()


def reduce_scatter_sizes(num_tokens: int, world_size: int) -> list[int]:
    """Default token shard sizes of :func:`finalize_reduce_scatter`: the first
    ``num_tokens % world_size`` ranks get one token more (``torch.tensor_split``)."""
    base, extra = divmod(num_tokens, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def _num_tokens(input: Tensor, row_map: Tensor | None, weights: Tensor | None, top_k: int | None) -> int:
    # Same rule as the op; bad combinations are left to the op's own checks.
    if row_map is not None:
        return row_map.shape[0]
    if weights is not None:
        return weights.shape[0]
    if top_k is None or top_k < 1:
        raise ValueError("finalize: top_k must be >= 1 when row_map and weights are both None")
    return input.shape[0] // top_k


def _local_partial(
    input: Tensor,
    row_map: Tensor | None,
    weights: Tensor | None,
    top_k: int | None,
    residual: Tensor | None,
    scale: float,
    out: Tensor | None,
    num_tokens: int,
) -> Tensor:
    """This rank's partial (its residual already added when given), in ``out`` if given."""
    if input.shape[0] == 0 and row_map is not None and num_tokens > 0:
        # An EP rank that received no rows: every slot is remote. The op rejects an
        # empty input with a non-empty map, and the partial is known without it.
        if out is None:
            out = input.new_empty(num_tokens, input.shape[1])
        return out.copy_(residual) if residual is not None else out.zero_()
    return _pkg.finalize(
        input, row_map, weights, top_k=top_k, residual=residual, scale=scale, out=out
    )


def _check_out(out: Tensor, rows: int, input: Tensor, fn: str) -> None:
    if out.dim() != 2 or out.shape[0] != rows or out.shape[1] != input.shape[1]:
        raise ValueError(
            f"{fn}: out must be [{rows}, {input.shape[1]}], got {tuple(out.shape)}"
        )
    if out.dtype != input.dtype or out.device != input.device:
        raise ValueError(
            f"{fn}: out must be {input.dtype} on {input.device} like input, "
            f"got {out.dtype} on {out.device}"
        )


def finalize_all_reduce(
    input: Tensor,
    row_map: Tensor | None = None,
    weights: Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    top_k: int | None = None,
    residual: Tensor | None = None,
    scale: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """Finalize this rank's partial, then ``all_reduce`` it: every rank gets ``[T, H]``.

    Arguments are those of :func:`moe_finalize_plugin.finalize`, plus ``group``
    (default: the world). EP ranks pass their local map (:func:`ep_local_row_map`),
    TP ranks the full map. ``residual`` is read on group rank 0 only; ``out`` may be
    ``residual`` itself (in-place residual update) and may have a row stride > H.
    A rank whose ``input`` has no rows (EP, nothing routed here) is fine.
    """
    num_tokens = _num_tokens(input, row_map, weights, top_k)
    if out is not None:
        _check_out(out, num_tokens, input, "finalize_all_reduce")
    if dist.get_rank(group) != 0:
        residual = None
    # c10d collectives need a dense tensor; a strided `out` goes through a temporary.
    direct = out is None or out.is_contiguous()
    partial = _local_partial(
        input, row_map, weights, top_k, residual, scale, out if direct else None, num_tokens
    )
    if num_tokens > 0:  # T is the same on every rank, so all of them skip together
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    if direct:
        return partial
    assert out is not None
    return out.copy_(partial)


def finalize_reduce_scatter(
    input: Tensor,
    row_map: Tensor | None = None,
    weights: Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    top_k: int | None = None,
    residual: Tensor | None = None,
    scale: float = 1.0,
    split_sizes: Sequence[int] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Finalize this rank's partial, then ``reduce_scatter`` it by token.

    Rank ``r`` returns tokens ``[sum(split_sizes[:r]), sum(split_sizes[:r + 1]))`` of the
    summed ``[T, H]`` (sequence parallelism, or EP with all-gathered tokens handing each
    DP rank back its own). ``split_sizes`` defaults to :func:`reduce_scatter_sizes`;
    uneven and zero sizes are allowed (python ints, so no host sync). ``residual`` is
    the full ``[T, H]`` residual, read on group rank 0 only; ``out`` is this rank's
    ``[split_sizes[r], H]`` shard buffer.
    """
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    num_tokens = _num_tokens(input, row_map, weights, top_k)
    if split_sizes is None:
        split_sizes = reduce_scatter_sizes(num_tokens, world_size)
    split_sizes = [int(s) for s in split_sizes]
    if len(split_sizes) != world_size or any(s < 0 for s in split_sizes) or sum(split_sizes) != num_tokens:
        raise ValueError(
            f"finalize_reduce_scatter: split_sizes must be {world_size} non-negative sizes "
            f"summing to T={num_tokens}, got {split_sizes}"
        )
    shard_rows = split_sizes[rank]
    if out is not None:
        _check_out(out, shard_rows, input, "finalize_reduce_scatter")
    if rank != 0:
        residual = None
    partial = _local_partial(input, row_map, weights, top_k, residual, scale, None, num_tokens)
    if num_tokens == 0:
        return out if out is not None else partial.new_empty(0, input.shape[1])
    direct = out is not None and out.is_contiguous()
    shard = out if direct else partial.new_empty(shard_rows, input.shape[1])
    backend = str(dist.get_backend(group))
    if backend not in _NO_REDUCE_SCATTER:
        try:
            if all(s == split_sizes[0] for s in split_sizes):
                _reduce_scatter_single(shard, partial, op=dist.ReduceOp.SUM, group=group)
            else:
                # Uneven shards: c10d's list form (NCCL runs it as coalesced reduces).
                dist.reduce_scatter(
                    shard, list(partial.split(split_sizes)), op=dist.ReduceOp.SUM, group=group
                )
        except RuntimeError as exc:
            # Older gloo has no reduce_scatter; it refuses before communicating, on
            # every rank alike, so all ranks switch to the fallback together.
            if "support" not in str(exc):
                raise
            _NO_REDUCE_SCATTER.add(backend)
    if backend in _NO_REDUCE_SCATTER:
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
        start = sum(split_sizes[:rank])
        shard.copy_(partial[start : start + shard_rows])
    if out is None or direct:
        return shard
    return out.copy_(shard)


class FusedFinalizeAllReduce:
    """Finalize + one-shot all-reduce through torch symmetric memory (decode sizes).

    Construct it once per layer shape on every rank of ``group`` (collective: it
    allocates and exchanges a ``[max_tokens, hidden]`` symmetric buffer, which is a
    host-synchronous, init-time step). Each call then:

    1. finalizes this rank's partial straight into ``buffer[:T]`` (rank 0 adds the
       residual there);
    2. runs ``torch.ops.symm_mem.one_shot_all_reduce_out``: one kernel that waits
       for all peers at a device-side barrier, reads the ``W`` partials of each
       element over NVLink P2P, sums them in rank order and writes ``out``; a second
       barrier at its end keeps any rank from overwriting its buffer while a peer
       still reads it, so the buffer is reused call after call.

    No multicast or NVLS object is used: run with ``NCCL_NVLS_ENABLE=0`` and
    ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` on machines where multicast must stay off.

    ``fused`` says whether the symmetric path is armed (``reason`` says why not);
    a call also falls back to :func:`finalize_all_reduce` when ``T > max_tokens``,
    when the dtype or hidden size differ from the buffer's, or when ``T * H`` would
    break the kernel's 4-byte alignment rule. With two ranks both paths give
    ``cast(p0 + p1)``, bitwise the same.
    """

    def __init__(
        self,
        hidden: int,
        dtype: torch.dtype,
        *,
        max_tokens: int = 128,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if hidden < 1 or max_tokens < 1:
            raise ValueError(
                f"FusedFinalizeAllReduce: hidden and max_tokens must be >= 1, "
                f"got hidden={hidden}, max_tokens={max_tokens}"
            )
        self.hidden = hidden
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.group = group
        self.device = torch.device(device) if device is not None else _default_device()
        self.fused = False
        self.reason = ""
        self.last_fused = False  # whether the latest call took the symmetric-memory path
        self._buffer: Tensor | None = None
        self._group_name = ""
        self._arm()

    @property
    def buffer(self) -> Tensor | None:
        """The ``[max_tokens, hidden]`` symmetric buffer (``None`` when not armed)."""
        return self._buffer

    @property
    def group_name(self) -> str:
        """Name of the group the buffer was exchanged in, as ``torch.ops.symm_mem`` takes it."""
        return self._group_name

    def _arm(self) -> None:
        reason = self._local_obstacle()
        # Every rank must take the same path, or the collectives below would not match.
        reasons = self._gather((reason, socket.gethostname()))
        by_reason: dict[str, list[int]] = {}
        for r, (why, _) in enumerate(reasons):
            if why:
                by_reason.setdefault(why, []).append(r)
        obstacles = [f"{why} (ranks {', '.join(map(str, ranks))})" for why, ranks in by_reason.items()]
        if not obstacles and len({host for _, host in reasons}) > 1:
            obstacles.append("ranks span several hosts (the CUDA symmetric-memory backend is intra-node)")
        if obstacles:
            self.reason = "; ".join(obstacles)
            return
        import torch.distributed._symmetric_memory as symm_mem

        error = ""
        try:
            buffer = symm_mem.empty(self.max_tokens, self.hidden, dtype=self.dtype, device=self.device)
            symm_mem.rendezvous(buffer, self._process_group())
        except (RuntimeError, ValueError) as exc:  # e.g. no P2P / IPC between the GPUs
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        errors = [why for why in self._gather(error) if why]
        if errors:
            self.reason = f"symmetric-memory rendezvous failed: {errors[0]}"
            return
        self._buffer = buffer
        self._group_name = self._process_group().group_name
        self.fused = True

    def _local_obstacle(self) -> str:
        if self.device.type != "cuda":
            return f"device is {self.device.type}, not cuda"
        if self.dtype not in _SYMM_MEM_DTYPES:
            return f"{self.dtype} has no one-shot symmetric-memory kernel (bf16, fp32 only)"
        backend = str(dist.get_backend(self.group))
        if "nccl" not in backend:  # "nccl", or "cpu:gloo,cuda:nccl" for a mixed group
            return f"the group's backend is {backend}, not NCCL"
        try:
            import torch.distributed._symmetric_memory  # noqa: F401  (registers the ops)

            torch.ops.symm_mem.one_shot_all_reduce_out.default  # noqa: B018
        except (ImportError, AttributeError, RuntimeError):
            return "this torch build has no symm_mem.one_shot_all_reduce_out"
        return ""

    def _process_group(self) -> dist.ProcessGroup:
        return self.group if self.group is not None else dist.group.WORLD

    def _gather(self, value: object) -> list:
        values: list = [None] * dist.get_world_size(self.group)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                dist.all_gather_object(values, value, group=self.group)
        else:
            dist.all_gather_object(values, value, group=self.group)
        return values

    def __call__(
        self,
        input: Tensor,
        row_map: Tensor | None = None,
        weights: Tensor | None = None,
        *,
        top_k: int | None = None,
        residual: Tensor | None = None,
        scale: float = 1.0,
        out: Tensor | None = None,
    ) -> Tensor:
        """Same arguments and result as :func:`finalize_all_reduce` on this object's group."""
        num_tokens = _num_tokens(input, row_map, weights, top_k)
        fits = (
            self.fused
            and 0 < num_tokens <= self.max_tokens
            and input.dtype == self.dtype
            and input.shape[1] == self.hidden
            and input.device == self.device
            and (num_tokens * self.hidden * input.element_size()) % 4 == 0
        )
        self.last_fused = fits
        if not fits:
            return finalize_all_reduce(
                input, row_map, weights, group=self.group, top_k=top_k,
                residual=residual, scale=scale, out=out,
            )
        assert self._buffer is not None
        if out is not None:
            _check_out(out, num_tokens, input, "FusedFinalizeAllReduce")
        if dist.get_rank(self.group) != 0:
            residual = None
        partial = self._buffer[:num_tokens]  # contiguous rows, storage offset 0
        _local_partial(input, row_map, weights, top_k, residual, scale, partial, num_tokens)
        # The kernel writes a dense output; a strided `out` goes through a temporary.
        result = out if out is not None and out.is_contiguous() else torch.empty_like(partial)
        torch.ops.symm_mem.one_shot_all_reduce_out(partial, "sum", self._group_name, result)
        if out is None or result is out:
            return result
        return out.copy_(result)


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
