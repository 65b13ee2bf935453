"""Rendering results for a terminal. The only place bytes become GiB.

Every function takes a result object (the same one ``--json`` dumps) and a rich ``Console``.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from planner.memory import COMPONENTS, PHASES, MemoryEstimate
from planner.search import PlanResult, strategy_label

GIB = 2**30


def gib(n: int | float) -> str:
    return f"{n / GIB:,.2f}"


def params_text(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fit(fits: bool) -> Text:
    return Text("fits", style="bold green") if fits else Text("OOM", style="bold red")


def layout_text(est: MemoryEstimate, short: bool = False) -> str:
    t = est.train
    text = f"{t.dp}·{t.tp}·{t.pp}" if short else f"dp{t.dp}·tp{t.tp}·pp{t.pp}"
    if t.sequence_parallel:
        text += "+sp"
    return text


COMPONENT_HEADERS = {"params": "params", "grads": "grads", "optimizer": "optim", "activations": "activ",
                     "temporaries": "temps", "overhead": "overh"}
PHASE_SHORT = {"forward": "fwd", "backward": "bwd", "optimizer": "opt"}


def render_plan(result: PlanResult, console: Console, top: int = 0) -> None:
    console.print(
        f"[bold]{result.model.name}[/] ({params_text(result.model.num_params)} parameters) on "
        f"{result.gpus} × {result.gpu} ({gib(result.gpu_memory_bytes)} GiB each) — "
        f"{len(result.candidates)} layouts"
    )
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    table.add_column("strategy")
    table.add_column("dp·tp·pp")
    for name in COMPONENTS:
        table.add_column(f"{COMPONENT_HEADERS[name]}\nGiB", justify="right")
    table.add_column("peak\nGiB", justify="right", style="bold")
    table.add_column("at")
    table.add_column("host\nGiB", justify="right")
    table.add_column("fit")
    table.add_column("max\nmb", justify="right")
    shown = result.candidates[:top] if top else result.candidates
    for est in shown:
        mem = est.memory
        table.add_row(
            strategy_label(est.train),
            layout_text(est, short=True),
            *(gib(getattr(mem, name)) for name in COMPONENTS),
            gib(mem.peak),
            PHASE_SHORT[mem.peak_phase],
            gib(est.host.per_rank) if est.host.per_rank else "-",
            _fit(est.fits),
            str(est.max_micro_batch),
        )
    console.print(table)
    if len(shown) < len(result.candidates):
        console.print(f"[dim]… {len(result.candidates) - len(shown)} more layouts (--top 0 shows all)[/]")
    t = result.candidates[0].train if result.candidates else None
    if t is not None:
        console.print(
            f"[dim]micro-batch {t.micro_batch} × seq {t.seq_len}, {t.precision}, {t.optimizer} ({t.optimizer_impl}), "
            f"{t.attention} attention, checkpointing {t.activation_checkpointing}, engine {t.engine}. "
            f"Memory per GPU in GiB (2^30 bytes); peak = the largest total over forward (fwd) / backward (bwd) / "
            f"optimizer step (opt), worst pipeline stage; host = offloaded GiB per GPU; max mb = largest "
            f"micro-batch that fits.[/]"
        )


def render_estimate(est: MemoryEstimate, console: Console) -> None:
    t = est.train
    console.print(
        f"[bold]{est.model.name}[/] ({est.model.num_params:,} parameters) — {strategy_label(t)}, "
        f"{layout_text(est)} on {t.gpus} × {est.gpu} ({gib(est.gpu_memory_bytes)} GiB)"
    )
    console.print(
        f"[dim]micro-batch {t.micro_batch}, seq {t.seq_len}, global batch {t.global_batch} "
        f"(accumulation {t.grad_accum}), {t.precision}, {t.optimizer} ({t.optimizer_impl}), {t.attention} attention, "
        f"checkpointing {t.activation_checkpointing}"
        + (f", {t.schedule} schedule" + (f" × {t.chunks} chunks" if t.chunks > 1 else "") if t.pp > 1 else "")
        + f", engine {t.engine}[/]"
    )
    for stage in est.stages:
        title = f"stage {stage.stage}" if t.pp > 1 else "per GPU"
        title += f" — layers {stage.first_layer}–{stage.last_layer - 1}" if stage.last_layer > stage.first_layer else ""
        if t.pp > 1:
            title += f", {stage.inflight_microbatches:g} micro-batches in flight"
        table = Table(title=title, title_justify="left", header_style="bold")
        table.add_column("component")
        for phase in PHASES:
            style = "bold" if phase == stage.peak_phase else None
            table.add_column(f"{phase}\nGiB", justify="right", style=style)
        for name in COMPONENTS:
            table.add_row(name, *(gib(getattr(stage.phases[p], name)) for p in PHASES))
        table.add_row(Text("total", style="bold"), *(gib(stage.phases[p].total) for p in PHASES))
        console.print(table)
        if stage.temporaries_detail:
            parts = ", ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in stage.temporaries_detail.items())
            console.print(f"  [dim]temporaries at the peak ({stage.peak_phase}): {parts} GiB[/]")
    mem = est.memory
    verdict = _fit(est.fits)
    line = Text.assemble(
        "peak ", (f"{gib(mem.peak)} GiB", "bold"), f" at {mem.peak_phase}",
        f" (stage {max(est.stages, key=lambda s: s.peak).stage})" if t.pp > 1 else "",
        f" of {gib(est.gpu_memory_bytes)} GiB: ", verdict,
        f", headroom {gib(est.headroom_bytes)} GiB; largest micro-batch that fits: {est.max_micro_batch}",
    )
    console.print(line)
    if est.host.per_rank:
        h = est.host
        console.print(
            f"host memory (offload): {gib(h.per_rank)} GiB per GPU — params {gib(h.params)}, grads {gib(h.grads)}, "
            f"optimizer {gib(h.optimizer)} — {gib(h.per_node)} GiB per node"
        )
    o = est.overheads
    console.print(
        f"[dim]overhead: CUDA context {gib(o.cuda_context_bytes)} GiB + {gib(o.communicator_bytes)} GiB per "
        f"communicator + {o.fragmentation:.0%} fragmentation ({'calibrated' if o.calibrated else 'uncalibrated defaults'})[/]"
    )
    for note in est.notes:
        console.print(f"[yellow]note:[/] {note}")
