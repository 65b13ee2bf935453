"""Search: every layout the flags leave open, what fits, what is fastest, and why.

Flags are constraints. A ``SearchSpace`` holds, per knob, either the user's value or every
value worth trying: dp x tp x pp factorizations (tp inside a node, dividing the heads),
ZeRO stage and offload, activation checkpointing, micro-batch (with gradient accumulation
making up the global batch), pipeline schedule. Each candidate is screened with the fast
paths of the memory and step-time models; only the shown ones are built in full.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from math import isqrt

from pydantic import BaseModel, ConfigDict

from planner.calibration import Calibration, default_calibration
from planner.configs import GPUSpec, ModelSpec, TrainConfig, check_layout
from planner.errors import ConfigError, LayoutError, TrainplanError
from planner.estimate import Estimate, estimate
from planner.memory import ModelSummary, memory_limits, screen_memory
from planner.params import active_params, total_params
from planner.step_time import Throughput, estimate_step

STRATEGY_CHOICES: tuple[tuple[int, str], ...] = (
    (0, "none"),
    (1, "none"),
    (2, "none"),
    (2, "optimizer"),
    (3, "none"),
    (3, "params"),
)
"""The strategies the seed notes rank: DDP, ZeRO-1, ZeRO-2, ZeRO-2+offload, ZeRO-3, ZeRO-3+offload."""

SORT_KEYS = ("throughput", "memory", "mfu")
GIB = 2**30


def strategy_label(train: TrainConfig) -> str:
    name = {0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}[train.zero_stage]
    if train.offload == "optimizer":
        # ZeRO-Offload moves optimizer state and gradients; with ZeRO-3 the seeds' "+offload"
        # means parameters too, so the optimizer-only variant is named explicitly there.
        name += "+opt-offload" if train.zero_stage == 3 else "+offload"
    elif train.offload == "params":
        name += "+offload"
    return name


def layout_label(train: TrainConfig) -> str:
    text = f"dp{train.dp}·tp{train.tp}·pp{train.pp}" + (f"·cp{train.cp}" if train.cp > 1 else "")
    text += f"·ep{train.ep}" if train.ep > 1 else ""
    if train.sequence_parallel:
        text += "+sp"
    if train.pp > 1:
        text += f" {train.schedule}" + (f"×{train.chunks}" if train.chunks > 1 else "")
    return text


LONG_SEQUENCE = 32768
"""From this many tokens per sequence the search also tries context parallelism."""

MAX_CANDIDATES = 10_000
"""A search evaluates at most this many layouts (about 10 s on one core for a 405B model); a
wider space is refused with what to fix instead of running for minutes."""


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


@dataclass
class SearchSpace:
    """Each list is the values to try (one element: a fixed choice; None: the default set)."""

    gpus: int
    gpus_per_node: int = 8
    tp: list[int] | None = None
    pp: list[int] | None = None
    cp: list[int] | None = None  # None: 1, and for long sequences every power of two that fits a node
    strategies: list[tuple[int, str]] | None = None  # (zero stage, offload)
    activation_checkpointing: list[str] | None = None
    micro_batch: list[int] | None = None
    schedules: list[tuple[str, int]] | None = None  # (schedule, chunks)
    ep: list[int] | None = None  # expert parallel (an MoE); None: every size that splits the experts evenly
    sequence_parallel: bool | None = None  # None: on whenever tp > 1
    global_batch: int | None = None  # None: see global_batch_for
    allow_cross_node_tp: bool = False
    fixed: dict = field(default_factory=dict)  # precision, optimizer, attention, seq_len, engine, ...

    @property
    def finetuning(self) -> bool:
        """LoRA/QLoRA are planned for data-parallel layouts only (TrainConfig says why)."""
        return self.fixed.get("finetune", "full") != "full"

    def tp_values(self, model: ModelSpec) -> list[int]:
        if self.finetuning and self.tp is None:
            return [1]
        if self.tp is not None:
            for t in self.tp:
                if self.gpus % t:
                    raise LayoutError(f"tp={t} does not divide the {self.gpus} GPU{'s' if self.gpus > 1 else ''}")
                if t > self.gpus_per_node and not self.allow_cross_node_tp:
                    raise LayoutError(
                        f"tp={t} spans nodes ({self.gpus_per_node} GPUs per node): tensor parallelism all-reduces "
                        f"every layer; use --tp {self.gpus_per_node} or less, or --allow-cross-node-tp"
                    )
            return self.tp
        # Tensor parallelism stays inside a node (its all-reduces are per layer).
        return [
            t for t in divisors(self.gpus)
            if (t <= self.gpus_per_node or self.allow_cross_node_tp)
            and model.num_heads % t == 0 and model.num_kv_heads % t == 0 and model.ffn_hidden_size % t == 0
        ]

    def pp_values(self, model: ModelSpec, tp: int) -> list[int]:
        if self.pp is not None:
            return self.pp
        if self.finetuning:
            return [1]
        if self.gpus % tp:
            return [1]  # an impossible fixed tp: let TrainConfig say what to change
        return [p for p in divisors(self.gpus // tp) if p <= model.total_layers]

    def cp_values(self, tp: int, pp: int) -> list[int]:
        """Context parallel sizes to try: the given ones; else 1, and from LONG_SEQUENCE tokens on
        every power of two whose ring stays inside a node (with tp) and splits the sequence into
        2 x cp chunks (load balancing)."""
        if self.cp is not None:
            return self.cp
        seq = self.fixed.get("seq_len", 4096)
        if self.finetuning or seq < LONG_SEQUENCE or self.fixed.get("attention", "flash") != "flash" or \
                self.fixed.get("engine", "pytorch") == "deepspeed":
            return [1]
        values, c = [], 1
        while tp * c <= self.gpus_per_node and (self.gpus // (tp * pp)) % c == 0 and seq % (2 * c) == 0:
            values.append(c)
            c *= 2
        return values or [1]

    def strategy_values(self, dp: int, engine: str) -> list[tuple[int, str]]:
        if self.strategies is not None:
            return self.strategies
        return [
            (z, o) for z, o in STRATEGY_CHOICES
            # ZeRO without offload over one data-parallel rank is plain DDP.
            if (dp > 1 or z == 0 or o != "none") and (engine != "megatron" or (z <= 1 and o == "none"))
            and (o == "none" or not self.finetuning)
        ]

    def ep_values(self, model: ModelSpec, dp: int, cp: int, tp: int, zero: int) -> list[int]:
        """Expert-parallel sizes to try on an MoE: the given ones; else, among the divisors of the
        experts that divide the ranks it can borrow (FSDP's shard group x cp x tp; DDP: cp x tp --
        torchtitan's ParallelDims), none, the largest inside a node and the largest; ZeRO-1 and
        fine-tunes without."""
        if not model.is_moe:
            return self.ep or [1]
        if self.ep is not None:
            return self.ep
        if zero == 1 or self.fixed.get("engine", "pytorch") != "pytorch" or self.finetuning:
            return [1]
        borrowable = (dp if zero >= 2 else 1) * cp * tp
        sizes = [d for d in divisors(borrowable) if model.num_experts % d == 0]
        # none, the largest whose all-to-all stays inside a node, the largest the ranks allow (the
        # fewest experts per rank): the search stays within MAX_CANDIDATES on DeepSeek-V3 at
        # 2,048 GPUs; --ep tries any other
        inside = [d for d in sizes if d <= self.gpus_per_node]
        return sorted({1, inside[-1], sizes[-1]})

    def checkpointing_values(self, model: ModelSpec | None = None) -> list[str]:
        if self.activation_checkpointing is not None:
            return self.activation_checkpointing
        if model is not None and model.is_moe:  # op-level checkpointing of an MoE is not modelled
            return ["none", "full", "layer:2"]
        # With flash attention, Megatron's selective recompute keeps what no recompute keeps.
        # torchtitan's op-level policy and checkpointing every second layer sit between none
        # and full in memory and time; Megatron's engine ships neither.
        if self.finetuning:  # what is modelled for a frozen base with adapters
            return ["none", "full", "layer:2"]
        eager = self.fixed.get("attention", "flash") == "eager"
        values = ["none", "selective", "full"] if eager else ["none", "full"]
        if self.fixed.get("engine", "pytorch") != "megatron":
            values += ["op", "layer:2"]
        return values

    def global_batch_for(self, dp: int) -> int:
        """The given global batch; else one micro-batch per replica when the micro-batch is
        fixed (no accumulation), else one sequence per GPU (the same for every layout)."""
        if self.global_batch is not None:
            return self.global_batch
        if self.micro_batch is not None and len(self.micro_batch) == 1:
            return self.micro_batch[0] * dp
        return self.gpus

    def micro_batch_values(self, per_replica: int) -> list[int]:
        if self.micro_batch is not None:
            return self.micro_batch
        values, mb = [], 1
        while mb <= min(per_replica, 64):
            if per_replica % mb == 0:
                values.append(mb)
            mb *= 2
        return values or [1]

    def schedule_values(self, model: ModelSpec, pp: int, microbatches: int) -> list[tuple[str, int]]:
        if pp == 1:
            return [("1f1b", 1)]
        if self.schedules is not None:
            return self.schedules
        # With fewer micro-batches than stages 1F1B is GPipe; PyTorch's Schedule1F1B refuses it.
        pytorch = self.fixed.get("engine", "pytorch") == "pytorch"
        values = [("gpipe" if pytorch and microbatches < pp else "1f1b", 1)]
        for chunks in (2, 4):
            # Megatron's interleaved schedule needs the micro-batches to be a multiple of pp.
            if model.total_layers % (pp * chunks) == 0 and microbatches % pp == 0:
                values.append(("interleaved", chunks))
        return values


def _enumerate_layout(model: ModelSpec, space: SearchSpace, engine: str, tp: int, pp: int, cp: int,
                      configs: list[TrainConfig], errors: list[TrainplanError]) -> None:
    dp = space.gpus // (tp * pp * cp) or 1
    sequence_parallel = space.sequence_parallel if space.sequence_parallel is not None else tp > 1
    global_batch = space.global_batch_for(dp)
    per_replica = global_batch // dp if global_batch % dp == 0 else 0
    micro_batches = space.micro_batch_values(per_replica) if per_replica else (space.micro_batch or [1])
    strategies = [(zero, offload, ep) for zero, offload in space.strategy_values(dp * cp, engine)
                  for ep in space.ep_values(model, dp, cp, tp, zero)]
    for zero, offload, ep in strategies:
        for checkpointing in space.checkpointing_values(model):
            for mb in micro_batches:
                microbatches = per_replica // mb if per_replica and per_replica % mb == 0 else 0
                for schedule, chunks in space.schedule_values(model, pp, microbatches):
                    try:
                        train = TrainConfig(
                            gpus=space.gpus, tp=tp, pp=pp, cp=cp, ep=ep, zero_stage=zero, offload=offload,
                            activation_checkpointing=checkpointing, micro_batch=mb,
                            global_batch=global_batch, schedule=schedule, chunks=chunks,
                            sequence_parallel=sequence_parallel and tp > 1, **space.fixed,
                        )
                        check_layout(model, train)
                    except (LayoutError, ConfigError) as exc:  # impossible, or not modelled (planner/capabilities.py)
                        errors.append(exc)
                        continue
                    configs.append(train)
                    if len(configs) > MAX_CANDIDATES:
                        raise LayoutError(
                            f"the flags leave more than {MAX_CANDIDATES:,} layouts to search; fix some of "
                            f"--tp, --pp, --cp, --strategy, --ac or --micro-batch")


def enumerate_configs(model: ModelSpec, space: SearchSpace) -> list[TrainConfig]:
    configs: list[TrainConfig] = []
    errors: list[TrainplanError] = []
    engine = space.fixed.get("engine", "pytorch")
    for tp in space.tp_values(model):
        for pp in space.pp_values(model, tp):
            for cp in space.cp_values(tp, pp):
                _enumerate_layout(model, space, engine, tp, pp, cp, configs, errors)
    first_error = errors[0] if errors else None
    if not configs:
        if first_error is not None:
            raise first_error
        raise LayoutError(f"no tensor/pipeline layout of {model.name} fits {space.gpus} GPUs with these constraints")
    return configs


# ---------------------------------------------------------------- results


class StrategySummary(BaseModel):
    """The best variant of one seed strategy, and why it is or is not the answer."""

    model_config = ConfigDict(frozen=True)

    strategy: str
    best: Estimate | None
    fits: bool
    note: str


class PlanResult(BaseModel):
    """Search mode's result: the candidates (best first), the recommendation and its reason."""

    model_config = ConfigDict(frozen=True)

    model: ModelSummary
    gpu: str
    gpu_memory_bytes: int
    gpus: int
    gpus_per_node: int
    calibration: str
    sort: str
    num_candidates: int
    num_fitting: int
    candidates: list[Estimate]
    strategies: list[StrategySummary]
    recommended: Estimate | None
    reason: str
    advice: list[str] = []


@dataclass
class _Screened:
    train: TrainConfig
    peak: int | None  # None: not computed (a smaller micro-batch of the same layout did not fit)
    host_per_node: int
    fits: bool
    throughput: Throughput | None  # only for a candidate that fits: nothing ranks the others by speed


def _without_micro_batch(train: TrainConfig) -> tuple:
    """A candidate's layout apart from its micro-batch (and the accumulation that follows from it)."""
    return tuple(getattr(train, name) for name in _LAYOUT_FIELDS)


_LAYOUT_FIELDS = tuple(name for name in TrainConfig.model_fields if name not in ("micro_batch", "grad_accum"))


PARALLEL_SCREEN_MIN = 1500
"""From this many candidates the screen runs on two processes where the machine has two cores."""


def _screen(model: ModelSpec, gpu: GPUSpec, configs: list[TrainConfig], cal: Calibration,
            gpus_per_node: int) -> list[_Screened]:
    """Memory (and, where it fits, step time) of every candidate, in ``configs``' order.

    Under 1F1B and the interleaved schedule (and without a pipeline) a layout's peak grows with
    its micro-batch -- min(pp, m) micro-batches are in flight, so fewer, larger ones hold no
    less -- and its host memory does not change: once a micro-batch does not fit, the larger
    ones of the same layout (enumerated after it) are not computed, they do not fit either
    (tests/test_search.py checks it against computing them all). GPipe holds all m
    micro-batches at once, a constant total whose per-micro-batch buffers shrink as they grow
    fewer: its peak can fall with the micro-batch, so every GPipe candidate is computed.

    A large search is split between this process and one forked child (``_screen_forked``) by
    tensor x pipeline x context layout (a layout's caches -- its stages, its activations per
    micro-batch -- are built in one process only), balanced by candidates times representative
    stages; the answer is the same as on one core."""
    workers = _screen_workers(len(configs))
    if workers < 2:
        return [c for _, c in _screen_share(model, gpu, configs, cal, gpus_per_node, list(range(len(configs))))]
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, train in enumerate(configs):
        groups.setdefault((train.tp, train.pp, train.cp), []).append(i)
    shares: tuple[list[int], list[int]] = ([], [])
    loads = [0, 0]
    for (_, pp, _), group in sorted(groups.items(), key=lambda item: -len(item[1]) * min(item[0][1], 3)):
        lighter = loads.index(min(loads))
        shares[lighter].extend(group)
        loads[lighter] += len(group) * min(pp, 3)
    own, other = shares if 0 in shares[0] else shares[::-1]  # the first candidate stays here: its step may raise
    done = _screen_forked(model, gpu, configs, cal, gpus_per_node, sorted(own), sorted(other))
    return [c for _, c in sorted(done, key=lambda pair: pair[0])]


def _screen_workers(candidates: int) -> int:
    """Processes for the screen: ``TRAINPLAN_SEARCH_WORKERS`` if set (1 turns the fork off), else
    two for a large search on a machine with two usable cores where ``fork`` exists."""
    setting = os.environ.get("TRAINPLAN_SEARCH_WORKERS")
    if setting is not None:
        return 2 if setting.strip() not in ("", "0", "1") else 1
    if candidates < PARALLEL_SCREEN_MIN or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 2 if cores >= 2 else 1


def _screen_share(model: ModelSpec, gpu: GPUSpec, configs: list[TrainConfig], cal: Calibration,
                  gpus_per_node: int, share: list[int]) -> list[tuple[int, _Screened]]:
    """``_screen`` over the candidates ``share`` names (whole layouts, micro-batches in order)."""
    screened: list[tuple[int, _Screened]] = []
    too_big: dict[tuple, int] = {}  # layout -> the smallest micro-batch seen not to fit
    for i in share:
        train = configs[i]
        key = _without_micro_batch(train)
        if train.micro_batch > too_big.get(key, train.micro_batch):
            screened.append((i, _Screened(train, None, 0, False, None)))
            continue
        peak, host_per_rank = screen_memory(model, train, cal.overheads)
        host = host_per_rank * min(gpus_per_node, train.gpus)
        fits = all(limit.fits for limit in memory_limits(gpu, peak, host))
        if not fits and train.schedule != "gpipe":
            too_big[key] = min(too_big.get(key, train.micro_batch), train.micro_batch)
        # the first candidate's step is estimated even if it does not fit: what the GPU cannot run at
        # all (fp8 without fp8 tensor cores) is refused, whatever fits
        throughput = estimate_step(model, gpu, train, cal, gpus_per_node, check=False) if (
            fits or i == 0) else None
        screened.append((i, _Screened(train, peak, host, fits, throughput)))
    return screened


def _screen_child(conn, model: ModelSpec, gpu: GPUSpec, configs: list[TrainConfig], cal: Calibration,
                  gpus_per_node: int, share: list[int]) -> None:
    """The forked child's half: (index, peak, host, fits, throughput) per candidate, or None if
    anything failed (the parent then computes the half itself, and raises what it raises)."""
    try:
        rows = [(i, c.peak, c.host_per_node, c.fits, c.throughput)
                for i, c in _screen_share(model, gpu, configs, cal, gpus_per_node, share)]
    except Exception:  # noqa: BLE001 -- reported by the parent's own computation
        rows = None
    conn.send(rows)
    conn.close()


def _screen_forked(model: ModelSpec, gpu: GPUSpec, configs: list[TrainConfig], cal: Calibration,
                   gpus_per_node: int, own: list[int], other: list[int]) -> list[tuple[int, _Screened]]:
    """``own`` here while a forked child screens ``other`` (it inherits every argument, nothing is
    pickled on the way in; its rows come back through a pipe)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_screen_child, args=(send, model, gpu, configs, cal, gpus_per_node, other),
                            daemon=True)
    try:
        child.start()
    except OSError:  # no process to spare: one core it is
        return _screen_share(model, gpu, configs, cal, gpus_per_node, own + other)
    send.close()
    try:
        done = _screen_share(model, gpu, configs, cal, gpus_per_node, own)
        try:
            rows = receive.recv()
        except (EOFError, OSError):
            rows = None
    except BaseException:  # an error here, or Ctrl-C: the child would wait on a pipe nobody reads
        child.terminate()
        raise
    finally:
        child.join()
        receive.close()
    if rows is None:
        return done + _screen_share(model, gpu, configs, cal, gpus_per_node, other)
    return done + [(i, _Screened(configs[i], peak, host, fits, throughput))
                   for i, peak, host, fits, throughput in rows]


def _measure_skipped(model: ModelSpec, screened: list[_Screened], cal: Calibration, gpus_per_node: int) -> None:
    """Compute the peaks ``_screen`` skipped (when nothing fits, the closest layouts are shown)."""
    for c in screened:
        if c.peak is None:
            peak, host_per_rank = screen_memory(model, c.train, cal.overheads)
            c.peak, c.host_per_node = peak, host_per_rank * min(gpus_per_node, c.train.gpus)


def _sort_key(sort: str):
    if sort == "memory":
        return lambda c: (c.peak, -c.throughput.tokens_per_s)
    if sort == "mfu":
        return lambda c: (-c.throughput.mfu, c.peak)
    return lambda c: (-c.throughput.tokens_per_s, c.peak)


def search(model: ModelSpec, gpu: GPUSpec, space: SearchSpace, calibration: Calibration | None = None,
           top: int = 10, sort: str = "throughput", configs: list[TrainConfig] | None = None) -> PlanResult:
    """``configs``: ``enumerate_configs(model, space)`` when the caller has it already."""
    if sort not in SORT_KEYS:
        raise ConfigError(f"unknown sort key {sort!r}; use one of {', '.join(SORT_KEYS)}")
    cal = calibration or default_calibration()
    screened = _screen(model, gpu, configs or enumerate_configs(model, space), cal, space.gpus_per_node)
    fitting = sorted((c for c in screened if c.fits), key=_sort_key(sort))
    build_cache: dict[int, Estimate] = {}

    def build(c: _Screened) -> Estimate:
        if id(c) not in build_cache:
            build_cache[id(c)] = estimate(model, gpu, c.train, cal, space.gpus_per_node)
        return build_cache[id(c)]

    shown = fitting[:top] if top else fitting
    by_speed = sorted(fitting, key=_sort_key("throughput"))
    recommended = build(by_speed[0]) if by_speed else None
    strategies = _strategy_summaries(screened, gpu, build, by_speed[0] if by_speed else None)
    advice: list[str] = []
    if recommended is None:
        _measure_skipped(model, screened, cal, space.gpus_per_node)

        def overcommit(c: _Screened) -> float:
            return max(c.peak / gpu.memory_bytes, c.host_per_node / gpu.host_memory_per_node_bytes)

        closest = sorted(screened, key=overcommit)[: (top or 10)]
        candidates = [build(c) for c in closest]
        advice = _advice(gpu, closest[0], overcommit(closest[0]))
        c = closest[0]
        reason = (f"the closest layout ({strategy_label(c.train)}, {layout_label(c.train)}) needs "
                  f"{c.peak / GIB:.1f} GiB per GPU (of {gpu.memory_bytes / GIB:.1f})"
                  + (f" and {c.host_per_node / GIB:,.0f} GiB of host memory per node "
                     f"(of {gpu.host_memory_per_node_bytes / GIB:,.0f})" if c.host_per_node else ""))
    else:
        candidates = [build(c) for c in shown]
        reason = _reason(recommended, strategies, gpu)
    return PlanResult(
        model=ModelSummary(name=model.name, num_params=total_params(model), active_params=active_params(model)),
        gpu=gpu.name,
        gpu_memory_bytes=gpu.memory_bytes,
        gpus=space.gpus,
        gpus_per_node=space.gpus_per_node,
        calibration=cal.label,
        sort=sort,
        num_candidates=len(screened),
        num_fitting=len(fitting),
        candidates=candidates,
        strategies=strategies,
        recommended=recommended,
        reason=reason,
        advice=advice,
    )


def _strategy_summaries(screened: list[_Screened], gpu: GPUSpec, build, best: _Screened | None
                        ) -> list[StrategySummary]:
    """For each seed strategy: its fastest fitting variant over every searched layout, or the
    variant with the smallest peak when none fits."""
    pool = screened
    summaries = []
    labels = list(dict.fromkeys(strategy_label(c.train) for c in sorted(pool, key=lambda c: (
        c.train.zero_stage, ("none", "optimizer", "params").index(c.train.offload)))))
    for label in labels:
        group = [c for c in pool if strategy_label(c.train) == label]
        fits = [c for c in group if c.fits]
        if fits:
            top = min(fits, key=_sort_key("throughput"))
            note = _compare(top, best) if best is not None and top is not best else "recommended"
            summaries.append(StrategySummary(strategy=label, best=build(top), fits=True, note=note))
        else:  # the skipped candidates' peaks are above their layout's smaller micro-batch's
            smallest = min((c for c in group if c.peak is not None), key=lambda c: c.peak)
            if smallest.peak <= gpu.memory_bytes:
                note = (f"does not fit the host: {smallest.host_per_node / GIB:,.0f} GiB of offloaded state per node > "
                        f"{gpu.host_memory_per_node_bytes / GIB:,.0f} GiB")
            else:
                note = f"does not fit ({smallest.peak / GIB:.1f} GiB > {gpu.memory_bytes / GIB:.1f} GiB at best)"
            summaries.append(StrategySummary(strategy=label, best=build(smallest), fits=False, note=note))
    return summaries


_CAUSES = {
    "compute_s": "compute",
    "recompute_s": "activation recomputation",
    "tp_communication_s": "tensor-parallel all-reduces",
    "cp_communication_s": "ring attention exchanges (context parallel)",
    "pp_communication_s": "pipeline transfers",
    "dp_communication_exposed_s": "exposed data-parallel communication",
    "bubble_s": "pipeline bubble",
    "offload_s": "CPU optimizer and PCIe copies",
    "optimizer_s": "optimizer step",
}


def _compare(candidate: _Screened, best: _Screened) -> str:
    """Why ``candidate`` is slower: the breakdown term that grew most per token (layouts may
    train different global batches when the micro-batch is fixed), in ms per candidate step."""
    slower = best.throughput.tokens_per_s / candidate.throughput.tokens_per_s - 1
    if slower <= 0.005:
        return "is as fast as the recommendation"
    tokens_a, tokens_b = candidate.train.tokens_per_step, best.train.tokens_per_step
    a, b = candidate.throughput.breakdown.model_dump(), best.throughput.breakdown.model_dump()
    cause = max(_CAUSES, key=lambda k: a[k] / tokens_a - b[k] / tokens_b)
    delta_ms = (a[cause] - b[cause] * tokens_a / tokens_b) * 1e3
    return (f"is {slower:.0%} slower at its best ({layout_label(candidate.train)}, micro-batch "
            f"{candidate.train.micro_batch}): +{delta_ms:,.0f} ms of {_CAUSES[cause]} per step")


def _reason(best: Estimate, strategies: list[StrategySummary], gpu: GPUSpec) -> str:
    t, th = best.train, best.throughput
    head = (
        f"{strategy_label(t)}, {layout_label(t)}, micro-batch {t.micro_batch}, accumulation {t.grad_accum}, "
        f"checkpointing {t.activation_checkpointing}: {th.tokens_per_s_per_gpu:,.0f} tokens/s per GPU "
        f"(MFU {th.mfu:.0%}), fits with {best.headroom_bytes / GIB:.1f} GiB headroom."
    )
    others = [f"{s.strategy} {s.note}" for s in strategies if s.note != "recommended"]
    return head + (" " + "; ".join(others) + "." if others else "")


def _advice(gpu: GPUSpec, closest: _Screened, overcommit: float) -> list[str]:
    t = closest.train
    advice = [f"about {overcommit:.1f}x the GPUs: ZeRO-3 and offload shard model states over data parallelism"]
    if t.micro_batch > 1:
        advice.append("a smaller --micro-batch (with more gradient accumulation)")
    if t.activation_checkpointing != "full":
        advice.append("--ac full (keeps only each layer's input)")
    if t.offload != "params" and closest.peak > gpu.memory_bytes:
        advice.append("--offload params with ZeRO-3 (optimizer state and parameters in host memory)")
    advice.append(f"a shorter --seq-len than {t.seq_len}, or a GPU with more memory than {gpu.memory_bytes / GIB:.0f} GiB")
    return advice
