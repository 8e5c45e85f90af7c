"""Fork-join multi-subnet DDP: ranks train different subnets of a step's plan at once, then join once.

Training several subnets on shared weights in parallel has a write-after-write hazard: if each worker stepped the
shared weights with its own subnet's gradient, the last writer would win. Here the world of ``W`` ranks is a grid of
``W / k`` data groups × ``k`` subnet ranks (``k = subnet_parallel``). Ranks of one data group see the same batch
(the sampler shards data over data groups only); each trains its share of the plan (assigned to balance MACs);
then one bucketed all-reduce over all gradients joins them — summed within a data group (the plan's gradients add
up, as in the sequential sandwich), averaged across data groups — and every rank takes the same optimizer step.
Gradients of parameters a rank's subnets did not touch (skipped blocks) count as zeros, so nothing relies on DDP's
reducer: depth-elastic subnets never hit "unused parameters" or "marked ready twice".

In-place distillation: a rank whose share has students but not the teacher computes the teacher's soft targets
with a no-grad forward of the largest subnet on its own batch (no communication, and no slower than waiting for
the teacher rank to broadcast them, since that forward must happen before any student can start anyway).

Multi-node: it is a ``DDPStrategy``, so the usual launchers work: ``torchrun --nnodes N --nproc-per-node P``
(``Trainer(num_nodes=N, devices=P, strategy=ForkJoinDDPStrategy(subnet_parallel=k))``) or SLURM (``srun`` with
``--ntasks-per-node=P``); ``k`` must divide ``N × P``.

Example:
    >>> import lightning as L
    >>> strategy = ForkJoinDDPStrategy(subnet_parallel=2, process_group_backend="gloo")
    >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from typing_extensions import override

from lightning_supernet.errors import ArgumentError, InvalidArgumentError

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_supernet.module import SupernetModule
    from lightning_supernet.training import PlanItem

__all__ = ["ForkJoinDDPStrategy"]


class ForkJoinDDPStrategy(DDPStrategy):
    """DDP where ranks train different subnets of each step's plan and join their gradients once per step.

    Args:
        subnet_parallel: ranks per data group (``k``), each training a share of the plan; ``None`` means all
            ranks form one data group. ``k = 1`` is plain data parallelism with one all-reduce per sandwich step.
        bucket_mb: size of the all-reduce buckets, in MiB.
        teacher_outputs: how ranks without the teacher get in-place distillation targets: ``"recompute"`` (a
            no-grad forward of the largest subnet; the default, faster in our measurements) or ``"broadcast"``
            (the teacher's rank sends its detached outputs to its data group).
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (``start_method``,
            ``process_group_backend``, ``timeout``...). DDP-wrapper options (``find_unused_parameters``,
            ``static_graph``, comm hooks) do not apply: no DDP wrapper is used.

    Raises:
        ValueError: ``subnet_parallel`` not a positive int, or (at setup) not dividing the world size.
        TypeError: (at setup) the module is not a ``SupernetModule``.

    Example:
        >>> ForkJoinDDPStrategy(subnet_parallel=2).subnet_parallel
        2
    """

    strategy_name = "fork_join_ddp"

    def __init__(self, subnet_parallel: int | None = None, bucket_mb: float = 25.0,
                 teacher_outputs: str = "recompute", **kwargs: Any) -> None:
        if subnet_parallel is not None and (not isinstance(subnet_parallel, int) or subnet_parallel < 1):
            raise InvalidArgumentError(f"`subnet_parallel` must be an int >= 1 or None, got {subnet_parallel!r}")
        if teacher_outputs not in ("recompute", "broadcast"):
            raise InvalidArgumentError(f"`teacher_outputs` must be 'recompute' or 'broadcast', got {teacher_outputs!r}")
        self.teacher_outputs = teacher_outputs
        self._group: Any = None
        if not bucket_mb > 0:
            raise InvalidArgumentError(f"`bucket_mb` must be > 0, got {bucket_mb!r}")
        super().__init__(**kwargs)
        self._subnet_parallel = subnet_parallel
        self.bucket_mb = bucket_mb
        self._macs: dict[Any, int] = {}

    # -- the grid ---------------------------------------------------------------------------------------------
    @property
    def subnet_parallel(self) -> int:
        """``k``: ranks per data group."""
        return self._subnet_parallel or self.world_size

    @property
    def num_data_groups(self) -> int:
        """``W / k``: groups of ranks that see different batches."""
        return self.world_size // self.subnet_parallel

    @property
    def subnet_rank(self) -> int:
        """This rank's position in its data group (which share of the plan it trains)."""
        return self.global_rank % self.subnet_parallel

    @property
    def data_group(self) -> int:
        """Which data group this rank belongs to."""
        return self.global_rank // self.subnet_parallel

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_data_groups, "rank": self.data_group}

    # -- set-up: no DDP wrapper -------------------------------------------------------------------------------
    def _check_grid(self, world: int) -> None:
        k = self._subnet_parallel
        if k is not None and world % k:
            raise InvalidArgumentError(
                f"`subnet_parallel={k}` must divide the world size {world} (devices × nodes); allowed: "
                f"{[d for d in range(1, world + 1) if world % d == 0]}"
            )

    @override
    def _configure_launcher(self) -> None:
        # runs in the launching process once devices and nodes are known: fail before any process starts
        self._check_grid(len(self.parallel_devices or ()) * self.num_nodes)
        super()._configure_launcher()

    @override
    def connect(self, model: pl.LightningModule) -> None:
        # before any process group exists: a wrong module must not leave one behind
        from lightning_supernet.module import SupernetModule

        if not isinstance(model, SupernetModule):
            raise ArgumentError(f"ForkJoinDDPStrategy trains a SupernetModule; got {type(model).__name__}. "
                                "HINT: wrap the model: `trainer.fit(SupernetModule(model))`")
        super().connect(model)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._check_grid(self.world_size)
        super().setup(trainer)

    @override
    def configure_ddp(self) -> None:
        # no DistributedDataParallel: start every rank from rank 0's weights, then join gradients by hand
        for tensor in self.lightning_module.state_dict().values():
            if isinstance(tensor, torch.Tensor):
                dist.broadcast(tensor.data, src=0)
        k = self.subnet_parallel
        for d in range(self.num_data_groups):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(d * k, (d + 1) * k)))
            if d == self.data_group:
                self._group = group

    def share_teacher(self, output: torch.Tensor | None, owner: int) -> torch.Tensor:
        """``teacher_outputs="broadcast"``: the subnet rank ``owner`` sends its teacher output to its group."""
        box = [output.detach().cpu() if output is not None else None]
        dist.broadcast_object_list(box, src=self.data_group * self.subnet_parallel + owner, group=self._group)
        return box[0].to(self.root_device)

    @override
    def _register_ddp_hooks(self) -> None:
        return None

    # -- fork: which subnets this rank trains -----------------------------------------------------------------
    def macs(self, supernet: SupernetModule, cfg: Any) -> int:
        """MACs of a subnet on the example input (cached by motif key)."""
        key = supernet.search_space.canonical(cfg)
        if key not in self._macs:
            self._macs[key] = supernet.cost(cfg)["macs"]
        return self._macs[key]

    def assign(self, supernet: SupernetModule, plan: list[PlanItem]) -> list[list[int]]:
        """Split the plan's indices over the ``k`` subnet ranks so the slowest rank finishes first.

        Cost model, in forward-pass MACs: a subnet trained costs 3× its MACs (forward + backward); a rank that
        trains students but not the teacher also pays one no-grad forward of the teacher (or waits as long for
        its broadcast). Greedy largest-first assignment, then single moves and swaps while they lower the
        maximum. Every rank computes the same assignment (same plan, same costs).
        """
        k = self.subnet_parallel
        if len(plan) < k:
            raise InvalidArgumentError(
                f"the step's plan has {len(plan)} subnets but `subnet_parallel={k}`: every subnet rank needs at "
                f"least one. HINT: use `SandwichSampling(num_random={max(k - 2, 0)})` or more, or a smaller "
                "`subnet_parallel`"
            )
        macs = [self.macs(supernet, p.config) for p in plan]
        teacher = next((i for i, p in enumerate(plan) if p.teacher), None)
        distilled = {i for i, p in enumerate(plan) if p.distill_weight}

        def load(share: list[int]) -> float:
            extra = teacher is not None and teacher not in share and any(i in distilled for i in share)
            return 3 * sum(macs[i] for i in share) + (macs[teacher] if extra else 0)

        shares: list[list[int]] = [[] for _ in range(k)]
        for i in sorted(range(len(plan)), key=lambda i: -macs[i]):
            if len(plan) - sum(map(len, shares)) <= sum(1 for s in shares if not s):
                target = next(r for r, s in enumerate(shares) if not s)  # every rank gets one
            else:
                target = min(range(k), key=lambda r: (load(shares[r] + [i]), r))
            shares[target].append(i)
        improved = True
        while improved:
            improved = False
            worst = max(map(load, shares))
            for a, b in ((a, b) for a in range(k) for b in range(k) if a != b):
                for i in list(shares[a]):
                    moves = [(shares[a][:], shares[b][:])]
                    moves[0][0].remove(i)
                    moves[0][1].append(i)
                    moves += [([x for x in shares[a] if x != i] + [j], [y for y in shares[b] if y != j] + [i])
                              for j in shares[b]]
                    for new_a, new_b in moves:
                        if not new_a or not new_b:
                            continue
                        trial = [new_a if r == a else new_b if r == b else s for r, s in enumerate(shares)]
                        if max(map(load, trial)) < worst - 1e-9:
                            shares, improved = trial, True
                            break
                    if improved:
                        break
                if improved:
                    break
        return [sorted(s) for s in shares]

    def my_share(self, supernet: SupernetModule, plan: list[PlanItem]) -> list[int]:
        """Indices of the plan items this rank trains."""
        return self.assign(supernet, plan)[self.subnet_rank]

    # -- logs -------------------------------------------------------------------------------------------------
    def gather_logs(self, recorded: list[Any], losses: dict[str, list[torch.Tensor]]
                    ) -> tuple[list[Any], dict[str, list[torch.Tensor]]]:
        """Share a step's logs within the data group (one ``all_gather_object``): the user's ``self.log`` calls
        recorded by the rank that trained plan item 0, and every rank's per-subnet losses.

        Every rank of the group gets the same list back, so replaying it makes every rank enter the same
        ``sync_dist`` collectives, and ``train/loss/<name>`` covers the subnets other ranks trained.
        """
        mine = {"logs": [(k, v.detach().cpu(), a, kw) for k, v, a, kw in recorded],
                "losses": {n: [float(v) for v in vs] for n, vs in losses.items()}}
        box: list[Any] = [None] * self.subnet_parallel
        dist.all_gather_object(box, mine, group=self._group)
        logs = next((b["logs"] for b in box if b["logs"]), [])
        merged: dict[str, list[torch.Tensor]] = {}
        for b in box:
            for name, values in b["losses"].items():
                merged.setdefault(name, []).extend(torch.tensor(v, device=self.root_device) for v in values)
        return [(k, v.to(self.root_device), a, kw) for k, v, a, kw in logs], merged

    # -- join -------------------------------------------------------------------------------------------------
    def join(self, module: torch.nn.Module) -> None:
        """One bucketed all-reduce of every gradient (missing ones as zeros): sum over the world / data groups.

        Floating-point buffers (BatchNorm statistics) are averaged over the world in the same pass.
        """
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        scale = 1.0 / self.num_data_groups
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        self._all_reduce([p.grad for p in params], scale)
        if buffers:
            self._all_reduce(buffers, 1.0 / self.world_size)

    def _all_reduce(self, tensors: list[torch.Tensor], scale: float) -> None:
        limit = int(self.bucket_mb * 2**20)
        bucket: list[torch.Tensor] = []
        size = 0
        pending = []
        for t in tensors + [None]:
            if t is not None and (not bucket or (size + t.numel() * t.element_size() <= limit
                                                 and t.dtype == bucket[0].dtype)):
                bucket.append(t)
                size += t.numel() * t.element_size()
                continue
            if bucket:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                pending.append((flat, bucket, dist.all_reduce(flat, async_op=True)))
            bucket, size = ([t], t.numel() * t.element_size()) if t is not None else ([], 0)
        for flat, members, work in pending:
            work.wait()
            flat.mul_(scale)
            offset = 0
            for m in members:
                m.copy_(flat[offset: offset + m.numel()].view_as(m))
                offset += m.numel()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "fork_join_ddp", cls, description="Fork-join multi-subnet DDP (lightning-supernet)",
            override=True,
        )


ForkJoinDDPStrategy.register_strategies(StrategyRegistry)
