"""Rendering results for a terminal. The only place bytes become GiB.

Every function takes a result object (the same one ``--json`` dumps) and a rich ``Console``.
"""

from __future__ import annotations

import io

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from planner.estimate import Estimate
from planner.memory import COMPONENTS, PHASES
from planner.precision import FLOAT8_RECIPES, TE_RECIPES
from planner.search import PlanResult, layout_label, strategy_label

GIB = 2**30
COMPONENT_HEADERS = {"params": "params", "grads": "grads", "optimizer": "optim", "activations": "activ",
                     "temporaries": "temps", "overhead": "overh"}
PHASE_SHORT = {"forward": "fwd", "backward": "bwd", "optimizer": "opt"}


def print_table(console: Console, table: Table) -> None:
    """A table at its natural width when the output is not a terminal (a pipe, a file), so
    that no number or header is cut to fit 120 columns; a terminal gets what fits it."""
    if console.is_terminal:
        console.print(table)
        return
    # rich's measurement of a table underestimates wrapped headers: render it unbounded instead
    probe = Console(file=io.StringIO(), width=100_000, color_system=None, highlight=False)
    probe.print(table)
    natural = max((cell_len(line) for line in probe.file.getvalue().splitlines()), default=0)
    width = console.width
    console.width = max(width, natural)  # print(width=...) cannot exceed the console's width
    try:
        console.print(table)
    finally:
        console.width = width


def gib(n: int | float, decimals: int = 2) -> str:
    return f"{n / GIB:,.{decimals}f}"


def params_text(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


_SHORT_LIMIT = {"GPU memory": "OOM", "host memory per node": "host OOM"}


def _fit(est: Estimate) -> Text:
    """'fits', or which limit fails: 'OOM' (GPU memory), 'host OOM', or both."""
    if est.fits:
        return Text("fits", style="bold green")
    return Text(" + ".join(_SHORT_LIMIT.get(name, name) for name in est.does_not_fit), style="bold red")


def verdict(est: Estimate) -> Text:
    """One sentence per limit: what the layout needs of it, what there is, and whether it fits."""
    parts: list = []
    for limit in est.limits:
        if parts:
            parts.append("; ")
        needed, available = limit.needed_bytes, limit.available_bytes
        if limit.name == "GPU memory":
            worst = max(est.stages, key=lambda stage: stage.peak).stage
            where = f" at {est.memory.peak_phase}" + (f" (stage {worst})" if est.train.pp > 1 else "")
            parts += ["peak ", (f"{gib(needed)} GiB", "bold"), f"{where} of {gib(available)} GiB GPU memory: "]
        else:
            parts += [f"{limit.name} {gib(needed)} GiB of {gib(available)} GiB: "]
        parts.append(("fits", "bold green") if limit.fits else ("does not fit", "bold red"))
        if limit.name == "GPU memory":
            parts.append(f", headroom {gib(available - needed)} GiB")
    mb = f"; largest micro-batch that fits: {est.max_micro_batch}"
    if "host memory per node" in est.does_not_fit:
        mb += " (offloaded state does not shrink with the micro-batch: fewer GPUs per node, or more host memory)"
    parts.append(mb)
    return Text.assemble(*parts)


def _short_layout(est: Estimate) -> str:
    t = est.train
    text = f"{t.dp}·{t.tp}·{t.pp}" + ("+sp" if t.sequence_parallel else "") + (f" cp{t.cp}" if t.cp > 1 else "")
    text += f" ep{t.ep}" if t.ep > 1 else ""
    if t.pp > 1 and t.schedule != "1f1b":
        text += " gpipe" if t.schedule == "gpipe" else f" int×{t.chunks}"
    return text


def _memory_table() -> Table:
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    table.add_column("strategy", no_wrap=True)
    table.add_column("dp·tp·pp", no_wrap=True)
    for name in COMPONENTS:
        table.add_column(f"{COMPONENT_HEADERS[name]}\nGiB", justify="right")
    table.add_column("peak\nGiB", justify="right", style="bold")
    table.add_column("at")
    table.add_column("host\nGiB", justify="right")
    table.add_column("fit", no_wrap=True)
    return table


def _memory_cells(est: Estimate) -> list:
    mem, t = est.memory, est.train
    return [
        strategy_label(t),
        _short_layout(est),
        *(gib(getattr(mem, name), 1) for name in COMPONENTS),
        gib(mem.peak, 1),
        PHASE_SHORT[mem.peak_phase],
        gib(est.host.per_rank, 1) if est.host.per_rank else "-",
        _fit(est),
    ]


def render_plan(result: PlanResult, console: Console) -> None:
    console.print(
        f"[bold]{result.model.name}[/] ({params_text(result.model.num_params)} parameters) on {result.gpus} × "
        f"{result.gpu} ({gib(result.gpu_memory_bytes)} GiB each, {result.gpus_per_node} per node) — "
        f"{result.num_candidates:,} layouts searched, {result.num_fitting:,} fit"
    )
    if result.strategies:
        table = _memory_table()
        table.title = "strategies, each at its fastest layout that fits (or its smallest peak)"
        table.title_justify = "left"
        table.add_column("tok/s\n/GPU", justify="right")
        table.add_column("MFU", justify="right")
        for summary in result.strategies:
            est = summary.best
            if est is None:
                continue
            th = est.throughput
            table.add_row(*_memory_cells(est), f"{th.tokens_per_s_per_gpu:,.0f}" if summary.fits else "-",
                          f"{th.mfu:.0%}" if summary.fits else "-")
        print_table(console, table)
    title = "closest layouts (none fits)" if result.recommended is None else f"fastest layouts (by {result.sort})"
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, title=title, title_justify="left")
    for name, justify in (("#", "right"), ("strategy", "left"), ("dp·tp·pp", "left"), ("mb×acc", "right"), ("ac", "left"),
                          ("peak\nGiB", "right"), ("step\ns", "right"), ("tok/s\n/GPU", "right"), ("MFU", "right"),
                          ("compute\ns", "right"), ("comm\ns", "right"), ("bubble\ns", "right"),
                          ("offload\ns", "right")):
        table.add_column(name, justify=justify)
    for rank, est in enumerate(result.candidates, 1):
        t, th = est.train, est.throughput
        b = th.breakdown
        table.add_row(
            str(rank), strategy_label(t), _short_layout(est), f"{t.micro_batch}×{t.grad_accum}", t.activation_checkpointing,
            Text(gib(est.memory.peak, 1), style="green" if est.fits else "red"),
            f"{th.step_time_s:.2f}", f"{th.tokens_per_s_per_gpu:,.0f}", f"{th.mfu:.0%}",
            f"{b.compute_s + b.recompute_s:.2f}", f"{b.exposed_communication_s:.2f}", f"{b.bubble_s:.2f}",
            f"{b.offload_s + b.optimizer_s:.2f}",
        )
    print_table(console, table)
    if result.recommended is not None:
        console.print(Text.assemble(("recommended: ", "bold green"), result.reason))
    else:
        console.print(Text.assemble(("nothing fits: ", "bold red"), result.reason))
        for line in result.advice:
            console.print(f"  • {line}")
    t = (result.recommended or (result.candidates[0] if result.candidates else None))
    if t is not None:
        tr = t.train
        console.print(
            f"[dim]{finetune_label(tr)}seq {tr.seq_len}, global batch {tr.global_batch}, {tr.precision}, "
            f"{tr.optimizer} ({tr.optimizer_impl}), "
            f"{tr.attention} attention, engine {tr.engine}, model code {tr.impl}, {'compiled' if tr.compile else 'eager'}; calibration: {result.calibration}. Memory per GPU in GiB "
            f"(2^30 bytes); peak = the largest total over forward / backward / optimizer step (at), worst pipeline stage; "
            f"comm = exposed communication; mb×acc = micro-batch × gradient accumulation.[/]"
        )


def finetune_label(t) -> str:
    """``LoRA r=8 on q,k,v,o,gate,up,down, nf4 base; `` (empty for a full fine-tune)."""
    extras = [x for x, on in (("optimizer in backward", t.optimizer_in_backward),
                              ("paged optimizer", t.paged_optimizer)) if on]
    if t.finetune == "full":
        return "".join(f"{x}, " for x in extras)
    name = {"lora": "LoRA", "qlora": "QLoRA"}[t.finetune]
    embeddings = ", embeddings and head train" if t.train_embeddings else ""
    return f"{name} r={t.lora_rank} on {t.lora_targets}, {t.base} base{embeddings}; " + "".join(f"{x}, " for x in extras)


def render_estimate(est: Estimate, console: Console) -> None:
    t = est.train
    console.print(
        f"[bold]{est.model.name}[/] ({est.model.num_params:,} parameters) — {strategy_label(t)}, "
        f"{layout_label(t)} on {t.gpus} × {est.gpu} ({gib(est.gpu_memory_bytes)} GiB)"
    )
    console.print(
        f"[dim]{finetune_label(t)}micro-batch {t.micro_batch}, seq {t.seq_len}, global batch {t.global_batch} "
        f"(accumulation {t.grad_accum}), {t.precision}, {t.optimizer} ({t.optimizer_impl}), {t.attention} attention, "
        f"checkpointing {t.activation_checkpointing}, engine {t.engine}, model code {t.impl}, {'compiled' if t.compile else 'eager'}[/]"
    )
    for stage in est.stages:
        title = f"stage {stage.stage}" if t.pp > 1 else "memory per GPU"
        if stage.last_layer > stage.first_layer:
            title += f" — layers {stage.first_layer}–{stage.last_layer - 1}"
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
        print_table(console, table)
        if stage.temporaries_detail:
            parts = ", ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in stage.temporaries_detail.items())
            console.print(f"  [dim]temporaries at the peak ({stage.peak_phase}): {parts} GiB[/]")
    console.print(verdict(est))
    if est.host.per_rank:
        h = est.host
        console.print(
            f"host memory (offload): {gib(h.per_rank)} GiB per GPU — params {gib(h.params)}, grads {gib(h.grads)}, "
            f"optimizer {gib(h.optimizer)} — {gib(h.per_node)} GiB per node"
        )
    th = est.throughput
    b = th.breakdown
    console.print(Text.assemble(
        "step ", (f"{th.step_time_s:.3f} s", "bold"), f": {th.tokens_per_s:,.0f} tokens/s, ",
        (f"{th.tokens_per_s_per_gpu:,.0f} tokens/s per GPU", "bold"), f", MFU {th.mfu:.1%}, HFU {th.hfu:.1%} ",
        f"({'calibrated' if th.calibrated else 'default efficiency'} {th.compute_efficiency:.0%} of peak)",
    ))
    parts = [("compute", b.compute_s), ("recompute", b.recompute_s), ("tensor-parallel comm", b.tp_communication_s),
             ("exposed ring attention (cp)", b.cp_communication_s),
             ("pipeline transfers", b.pp_communication_s), ("expert all-to-all (ep)", b.ep_communication_s),
             ("exposed data-parallel comm", b.dp_communication_exposed_s),
             ("bubble", b.bubble_s), ("offload", b.offload_s), ("optimizer", b.optimizer_s)]
    console.print("  [dim]" + ", ".join(f"{name} {value:.3f} s" for name, value in parts if value > 0) + "[/]")
    if t.cp > 1:
        console.print(f"  [dim]context parallel: each rank holds {t.local_seq_len:,} of {t.seq_len:,} tokens per "
                      f"sequence; ring attention sends {th.cp_ring_bytes / 2**30:,.2f} GiB of k, v (and their "
                      f"gradients) per step, {th.cp_communication_s:.3f} s of transfers, "
                      f"{b.cp_communication_s:.3f} s not hidden behind attention[/]")
    if t.precision in FLOAT8_RECIPES:
        console.print(f"  [dim]Float8 ({t.precision}): the blocks' projections run fp8 GEMMs"
                      f"{' and are all-gathered in fp8' if t.fp8_all_gather and t.precision == 'fp8-tensorwise' else ''}; "
                      f"MFU and HFU are against the bf16 peak[/]")
    if t.precision in TE_RECIPES:
        console.print(f"  [dim]Transformer Engine FP8 ({t.precision}): the blocks' projections run fp8 GEMMs and keep "
                      f"their FP8 weights cached for the step and their inputs in FP8 for backward; MFU and HFU are "
                      f"against the bf16 peak[/]")
    if t.async_tp:
        console.print("  [dim]asynchronous TP: each sequence-parallel collective pipelined with the matmul it feeds; "
                      "tensor-parallel comm above is what stays exposed[/]")
    console.print(f"[dim]overhead: {overhead_text(est)}; calibration: {est.calibration}[/]")
    for note in est.notes:
        console.print(f"[yellow]note:[/] {note}")


def overhead_text(est) -> str:
    """What the overhead of the worst rank is made of: the CUDA context, NCCL's communicators and
    the caching allocator's cache (planner/allocator.py), as NVML would see them."""
    o, worst = est.overheads, max(est.stages, key=lambda s: s.peak)
    n = worst.communicators
    cache = (f"{o.fragmentation:.0%} of the allocated peak held by the caching allocator (flat)"
             if o.fragmentation is not None else
             f"{gib(worst.allocator_cache)} GiB cached by PyTorch's caching allocator beyond the allocated peak"
             f"{' (expandable segments)' if est.train.alloc_conf == 'expandable_segments' else ''}")
    return (f"CUDA context {gib(o.cuda_context_bytes)} GiB + {n} NCCL communicator{'s' if n != 1 else ''} x "
            f"{gib(o.communicator_bytes)} GiB + {cache} ({'calibrated' if o.calibrated else 'uncalibrated defaults'})")


def bytes_text(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def render_run(result, console: Console) -> None:
    t = result.train
    console.print(
        f"[bold]{result.model_name}[/] ({result.num_params:,} parameters) — {strategy_label(t)}, {layout_label(t)}, "
        f"{result.world} rank{'s' if result.world > 1 else ''} on {result.device} ({result.backend}), "
        f"torch {result.torch_version}"
    )
    console.print(f"[dim]micro-batch {t.micro_batch} × accumulation {t.grad_accum} × dp {t.dp} = global batch "
                  f"{t.global_batch}, seq {t.seq_len}, {t.precision}, checkpointing {t.activation_checkpointing}, "
                  f"{t.attention} attention, {'compiled' if t.compile else 'eager'}[/]")
    table = Table(box=box.SIMPLE_HEAD, header_style="bold")
    for name in ("step", "loss", "step time s", "tokens/s"):
        table.add_column(name, justify="right")
    for step in result.steps:
        loss = "-" if step.loss is None else f"{step.loss:.6f}"
        table.add_row(str(step.step), loss, f"{step.step_time_s:.3f}", f"{step.tokens_per_s:,.0f}")
    print_table(console, table)
    console.print(f"median step {result.median_step_time_s:.3f} s (after warm-up): "
                  f"[bold]{result.tokens_per_s:,.0f} tokens/s[/], {result.tokens_per_s / result.world:,.0f} per rank")
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", title="resident per rank after the last step",
                  title_justify="left")
    for name in ("rank", "params", "grads", "optimizer", "max allocated"):
        table.add_column(name, justify="right")
    for r in result.ranks:
        table.add_row(str(r.rank), bytes_text(r.params), bytes_text(r.grads), bytes_text(r.optimizer),
                      bytes_text(r.max_memory_allocated))
    print_table(console, table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")


def _quantity(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return bytes_text(int(value))
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:,.0f}"


def _error_text(error: float | None) -> Text:
    if error is None:
        return Text("-")
    style = "green" if abs(error) <= 5 else ("yellow" if abs(error) <= 15 else "red")
    return Text(f"{error:+.1f}%", style=style)


def render_profile(report, console: Console) -> None:
    t = report.train
    layout = f"dp{t['dp']}·tp{t['tp']}·pp{t['pp']}" + (f"·cp{t['cp']}" if t.get("cp", 1) > 1 else "") + (
        f"·ep{t['ep']}" if t.get("ep", 1) > 1 else "") + ("+sp" if t["sequence_parallel"] else "")
    strategy = {0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}[t["zero_stage"]]
    if t["offload"] != "none":
        strategy += f"+offload({t['offload']})"
    where = (f"simulated world of {report.simulated_world}" if report.simulated_world
             else f"{t['gpus']} rank{'s' if t['gpus'] > 1 else ''}")
    env = report.environment
    console.print(
        f"[bold]{report.model}[/] ({report.num_params:,} parameters) — {strategy}, {layout}, {where} on "
        f"{env.get('device', env.get('gpu', '?'))} (torch {env.get('torch', '?')}, {env.get('date', '')})"
    )
    console.print(f"[dim]micro-batch {t['micro_batch']} × accumulation {t['grad_accum']}, seq {t['seq_len']}, "
                  f"{t['precision']}, checkpointing {t['activation_checkpointing']}, {t['attention']} attention, "
                  f"{'compiled' if t.get('compile') else 'eager'}; prediction for {report.gpu}[/]")
    if report.status != "ok":
        console.print(Text.assemble((f"{report.status}: ", "bold red"), report.message))
        return
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", title="most loaded rank", title_justify="left")
    for name, justify in (("quantity", "left"), ("predicted", "right"), ("measured", "right"), ("error", "right")):
        table.add_column(name, justify=justify)
    for row in report.rows:
        table.add_row(row.quantity, _quantity(row.predicted, row.unit), _quantity(row.measured, row.unit),
                      _error_text(row.error_pct))
    print_table(console, table)
    if len(report.measured.ranks) > 1:
        table = Table(box=box.SIMPLE_HEAD, header_style="bold", title="per rank: prediction error",
                      title_justify="left")
        for name in ("rank", "stage", "params", "grads", "optimizer", "activations", "peak", "measured peak"):
            table.add_column(name, justify="right")
        for measured in report.measured.ranks:
            predicted = report.predicted.ranks[measured.rank]
            pairs = [(getattr(predicted.memory, k), getattr(measured.memory, k))
                     for k in ("params", "grads", "optimizer", "activations")]
            pairs.append((predicted.memory.peak - predicted.memory.overhead, measured.memory.peak))
            cells = ["exact" if p == m else _error_text((p - m) / m * 100 if m else None) for p, m in pairs]
            table.add_row(str(measured.rank), str(measured.stage), *cells, bytes_text(measured.memory.peak))
        print_table(console, table)
    rank = max(report.measured.ranks, key=lambda r: r.max_memory_allocated or 0)
    if rank.fragmentation is not None:
        console.print(f"[dim]allocator: {bytes_text(rank.max_memory_reserved)} reserved at a "
                      f"{bytes_text(rank.max_memory_allocated)} peak allocation ({rank.fragmentation:.1%} beyond it)[/]")
    for note in report.notes:
        console.print(f"[dim]note: {note}[/]")


def render_recommend(report, console: Console) -> None:
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", title="planned candidates, run and measured",
                  title_justify="left")
    for name in ("#", "layout", "predicted peak", "measured peak", "predicted tok/s", "measured tok/s", "status"):
        table.add_column(name, justify="right" if name not in ("layout", "status") else "left")
    for i, r in enumerate(report.reports):
        t = r.train
        strategy = {0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}[t["zero_stage"]]
        cp = f"·cp{t['cp']}" if t.get("cp", 1) > 1 else ""
        layout = (f"{strategy} dp{t['dp']}·tp{t['tp']}·pp{t['pp']}{cp} mb{t['micro_batch']}×{t['grad_accum']} "
                  f"{t['activation_checkpointing']}")
        measured = r.measured
        table.add_row(str(i + 1), layout, bytes_text(r.predicted.memory.peak),
                      bytes_text(measured.memory.peak) if measured else "-",
                      f"{r.predicted.tokens_per_s:,.0f}" if r.predicted.tokens_per_s else "-",
                      f"{measured.tokens_per_s:,.0f}" if measured and measured.tokens_per_s else "-",
                      Text(r.status, style="green" if r.status == "ok" else "red"))
    print_table(console, table)
    if report.reports and report.reports[0].environment.get("device") == "cpu":
        console.print("[dim]note: measured on a CPU; predicted tokens/s are for the GPU preset, memory compares[/]")
    style = "bold green" if report.recommended is not None else "bold red"
    console.print(Text.assemble(("recommended: " if report.recommended is not None else "none: ", style), report.reason))


# ---------------------------------------------------------------- inference


def _inference_header(est, console: Console) -> None:
    c = est.config
    layout = f"tp={c.tp}, pp={c.pp} on {c.gpus} × " if c.gpus > 1 else ""
    kv = "int8" if c.kv_cache == "int8" else est.compute_dtype
    console.print(f"[bold]{est.model}[/] inference on {layout}{est.gpu} ({gib(est.capacity_bytes)} GiB) — weights "
                  f"{c.weights} ({est.compute_dtype} compute, {c.kernels} kernels), KV cache {kv}")
    chunk = f", prefill chunks of {c.prefill_chunk}" if c.prefill_chunk else ""
    console.print(f"[dim]batch {c.batch}, prompt {c.prompt_len} + {c.new_tokens} new tokens{chunk}; "
                  f"calibration: {est.calibration}[/]")


def render_inference(est, console: Console) -> None:
    _inference_header(est, console)
    m = est.memory
    table = Table(title="memory per GPU" if est.config.gpus > 1 else "GPU memory", title_justify="left",
                  header_style="bold")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("what", style="dim")
    resident = "resident " if est.offload else ""
    table.add_row("weights", gib(m.weights), f"{resident}as {est.config.weights}")
    table.add_row("kv_cache", gib(m.kv_cache), f"{est.config.batch} × {est.config.prompt_len + est.config.new_tokens} "
                  "positions")
    table.add_row("activations", gib(m.activations), f"prefill {gib(m.prefill_activations)}, decode "
                  f"{gib(m.decode_activations)}")
    if est.offload:
        table.add_row("swap_buffers", gib(m.swap_buffers), f"{est.offload.slots} slots of one layer")
    table.add_row("overhead", gib(m.overhead), "CUDA context, communicators, caching allocator")
    table.add_row(Text("peak", style="bold"), Text(gib(m.peak), style="bold"),
                  Text("fits", style="bold green") if est.fits else Text("does not fit", style="bold red"))
    print_table(console, table)
    if est.config.weights not in ("bf16", "fp16"):
        console.print(f"weights as {est.config.weights}: {gib(m.all_weights)} GiB (16-bit: {gib(m.weights_16bit)} GiB)"
                      + (f"; all resident the peak would be {gib(m.peak_without_offload)} GiB of "
                         f"{gib(est.capacity_bytes)} GiB" if est.offload else ""))
    elif est.offload:
        console.print(f"all resident the peak would be {gib(m.peak_without_offload)} GiB of {gib(est.capacity_bytes)} GiB")
    if est.offload:
        o = est.offload
        console.print(Text.assemble(
            "layer offload: ", (f"{o.resident_layers} layers resident, {o.swapped_layers} swapped", "bold"),
            f" through {o.slots} slots ({gib(m.host_bytes)} GiB of pinned host memory); a layer loads in "
            f"{o.layer_load_s * 1e3:,.1f} ms over {o.host_link_gb_s:,.1f} GB/s; exposed loads: "
            f"{o.exposed_load_s_per_token * 1e3:,.1f} ms per decode step, {o.exposed_load_s_prefill:,.3f} s in prefill"))
        console.print(f"  [dim]swapped layers: {', '.join(map(str, o.swapped))}[/]")
    t = est.time
    console.print(Text.assemble(
        "time to first token ", (f"{t.time_to_first_token_s:,.3f} s", "bold"), "; decode ",
        (f"{t.decode_tokens_per_s:,.1f} tokens/s", "bold"), f" ({t.decode_step_s * 1e3:,.1f} ms per step of "
        f"{est.config.batch} token{'s' if est.config.batch > 1 else ''}, bound by {t.decode_bound}); "
        f"{t.total_s:,.2f} s for the whole generation"))
    console.print(f"  [dim]decode step without offload: HBM {t.decode_memory_s * 1e3:,.2f} ms at "
                  f"{t.hbm_efficiency:.0%} of peak bandwidth, compute {t.decode_compute_s * 1e3:,.2f} ms at "
                  f"{t.compute_efficiency:.0%} of peak[/]")
    for note in est.notes:
        console.print(f"[yellow]note:[/] {note}")


def render_inference_plan(plan, console: Console) -> None:
    console.print(f"[bold]{plan.model}[/] inference on {plan.gpus} × {plan.gpu}")
    table = Table(box=box.SIMPLE_HEAD, header_style="bold")
    for name in ("tp", "pp", "peak GiB", "fit", "decode tokens/s", "first token s", "max batch", "max context"):
        table.add_column(name, justify="right")
    for c in plan.candidates:
        table.add_row(str(c.tp), str(c.pp), gib(c.peak_bytes), Text("fits", style="green") if c.fits else
                      Text("OOM", style="red"), f"{c.decode_tokens_per_s:,.1f}", f"{c.time_to_first_token_s:,.3f}",
                      str(c.max_batch or "-"), f"{c.max_context:,}" if c.max_context else "-")
    print_table(console, table)
    console.print(f"recommended: {plan.reason}" if plan.recommended else f"[bold red]{plan.reason}[/]")
    if plan.recommended is not None:
        render_inference(plan.recommended, console)
    for advice in plan.advice:
        console.print(f"[yellow]try:[/] {advice}")


def render_inference_profile(report, console: Console, measure_only: bool = False) -> None:
    _inference_header(report.estimate, console)
    console.print(f"[dim]ran on {report.environment.get('device', report.device)}, torch "
                  f"{report.environment.get('torch')}[/]")
    table = Table(box=box.SIMPLE_HEAD, header_style="bold")
    table.add_column("component")
    if not measure_only:
        table.add_column("predicted", justify="right")
    table.add_column("measured", justify="right")
    if not measure_only:
        table.add_column("error", justify="right")
    units = {"time_to_first_token_s": "s", "decode_tokens_per_s": "tokens/s"}
    for key in ("weights", "kv_cache", "activations", "prefill_activations", "decode_activations", "swap_buffers",
                "host_bytes", "overhead", "peak", "time_to_first_token_s", "decode_tokens_per_s"):
        unit = units.get(key, "bytes")
        measured = getattr(report.measured, key)
        row = [key, _quantity(measured, unit)]
        if not measure_only:
            error = report.error.get(key)
            row = [key, _quantity(getattr(report.predicted, key), unit), row[1],
                   _error_text(None if error is None else 100 * error)]
        table.add_row(*row)
    print_table(console, table)
    if report.tokens:
        first = report.tokens[0][:16]
        console.print(f"generated (sequence 0, first {len(first)}): {' '.join(map(str, first))}")
    if "simulated" in report.environment:
        console.print(f"[dim]{report.environment['simulated']}[/]")
