"""Profile your own training loop: ``trainplan.track``.

    import trainplan
    from planner.estimate import estimate

    with trainplan.track(model, optimizer) as t:
        for batch in batches[:3]:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    report = t.compare(estimate(spec, gpu, train))   # predicted vs measured, per component

Phases are found from hooks: the model's forward (forward), from its end to the optimizer
step (the loss and backward: backward), the step (optimizer). The last full step is
measured, after the earlier ones created the optimizer state.

For a Hugging Face ``transformers`` model, ``t.compare()`` needs no estimate: it plans the run
it saw (``Tracker.observed``): the architecture from ``model.config``, the batch and sequence
length from the forward's ``input_ids``, the precision from the parameters' dtype and
torch.autocast, the attention from ``config._attn_implementation``, the optimizer and its
implementation from the optimizer, and ``--impl hf`` (``planner/implementations.py``).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from profiler.memory import phase_memory
from strategies.kernels.optim import state_tensors
from strategies.train import RankBytes, RunResult, StepRecord, _unique_bytes


class Tracker:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.device_type = next(model.parameters()).device.type
        fsdp = any(type(m).__name__.startswith("FSDP") for m in model.modules())
        # a torch.compile'd model (or block) is measured by high-water mark: a dispatch-mode
        # tracker would run it eagerly (profiler.memory.HighWaterMemory)
        self.compiled = any(type(m).__name__ == "OptimizedModule" for m in model.modules())
        self.memory = phase_memory([model], optimizer, fsdp=fsdp, compiled=self.compiled)
        self._handles = []
        self._step_start: float | None = None
        self.step_times: list[float] = []
        self.resident: RankBytes | None = None
        self.input_shape: tuple[int, int] | None = None  # (batch, sequence) of the last forward
        self.autocast_dtype: torch.dtype | None = None

    def __enter__(self) -> Tracker:
        self.memory.__enter__()
        self._handles = [
            self.model.register_forward_pre_hook(self._forward_pre, with_kwargs=True),
            self.model.register_forward_hook(lambda *_: self.memory.begin("backward")),
            self.optimizer.register_step_pre_hook(lambda *_: self.memory.begin("optimizer")),
            self.optimizer.register_step_post_hook(lambda *_: self._after_step()),
        ]
        return self

    def __exit__(self, *exc) -> None:
        self.memory.end()
        for handle in self._handles:
            handle.remove()
        self.memory.__exit__(*exc)

    def _forward_pre(self, module, args, kwargs) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
            self.input_shape = tuple(tokens.shape)
        device = self.device_type
        self.autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        self._begin("forward")

    def _begin(self, name: str) -> None:
        if self.memory.current_phase is None:  # a new step begins with the forward
            self.memory.reset_peaks()
            self._step_start = time.perf_counter()
        self.memory.begin(name)

    def _after_step(self) -> None:
        params = list(self.model.parameters())
        self.resident = RankBytes(
            rank=torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
            params=_unique_bytes(params), grads=_unique_bytes(p.grad for p in params),
            optimizer=_unique_bytes(state_tensors(self.optimizer)),
        )
        self.memory.end()
        if self._step_start is not None:
            self.step_times.append(time.perf_counter() - self._step_start)

    def result(self) -> RankBytes:
        """Resident bytes after the last step, and per phase the components at its peak."""
        if self.resident is None:
            raise RuntimeError("trainplan.track saw no optimizer step")
        record = self.resident.model_copy()
        record.phases, record.phase_totals = dict(self.memory.peaks), dict(self.memory.totals)
        record.activations = self.memory.forward_end.get("activations")
        return record

    def observed(self):
        """(ModelSpec, TrainConfig) of the run this tracker saw, for a Hugging Face model;
        ValueError with the reason when it cannot be read off the model."""
        from planner.catalog import model_from_hf_dict
        from planner.configs import TrainConfig

        config = getattr(self.model, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            raise ValueError("compare() without an estimate needs a Hugging Face model (one with a .config); "
                             "pass the planner's estimate for other models")
        if self.input_shape is None:
            raise ValueError("compare() without an estimate needs a forward called with input_ids [batch, seq]")
        checkpointing = ("is_activation_checkpointing" if hasattr(type(self.model), "is_activation_checkpointing")
                         else "is_gradient_checkpointing")  # renamed in transformers 5
        if getattr(self.model, checkpointing, False):
            raise ValueError("Hugging Face gradient checkpointing is not modelled yet; pass an estimate "
                             "with the activation checkpointing you mean")
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ValueError("compare() without an estimate plans one process; pass an estimate for a distributed run")
        spec = model_from_hf_dict(config.to_dict(), "model.config", f"Hugging Face {type(self.model).__name__}.config",
                                  type(self.model).__name__)
        param_dtype = next(self.model.parameters()).dtype
        if self.autocast_dtype is torch.bfloat16 and param_dtype is torch.float32:
            precision = "amp-bf16"
        elif self.autocast_dtype is None and param_dtype in (torch.float32, torch.bfloat16):
            precision = "fp32" if param_dtype is torch.float32 else "bf16"
        else:
            raise ValueError(f"parameters in {param_dtype} under autocast {self.autocast_dtype} are not a precision "
                             "the planner models (fp32, bf16, amp-bf16)")
        opt = self.optimizer
        kind = type(opt).__name__.lower()
        if kind not in ("adam", "adamw", "sgd") or (kind == "sgd" and not opt.defaults.get("momentum")):
            raise ValueError(f"the planner models AdamW and SGD with momentum, not {type(opt).__name__} "
                             f"{'without momentum' if kind == 'sgd' else ''}".rstrip())
        # torch/optim/optimizer.py: _default_to_fused_or_foreach picks foreach only when every
        # tensor is on a native device (CUDA); on CPU the default is the for-loop.
        foreach = opt.defaults.get("foreach")
        if foreach is None:
            foreach = self.device_type != "cpu"
        impl = "fused" if opt.defaults.get("fused") else "foreach" if foreach else "for-loop"
        batch, seq = self.input_shape
        attention = "eager" if getattr(config, "_attn_implementation", "sdpa") == "eager" else "flash"
        train = TrainConfig(gpus=1, precision=precision, micro_batch=batch, global_batch=batch, seq_len=seq,
                            attention=attention, optimizer="sgd" if kind == "sgd" else "adamw",
                            optimizer_impl=impl, impl="hf", compile=self.compiled, **self._peft_fields())
        return spec, train

    # peft's module names (Llama, Mistral, Qwen2 and the like) -> the planner's --lora-targets
    _PEFT_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                     "up_proj": "up", "down_proj": "down"}

    def _peft_fields(self) -> dict:
        """A peft LoRA model (``PeftModel`` with one LoraConfig) as TrainConfig fields: its rank,
        its target projections, whether the embedding and head train (``modules_to_save``)."""
        configs = getattr(self.model, "peft_config", None)
        if not configs:
            return {}
        if len(configs) != 1:
            raise ValueError("compare() plans one LoRA adapter; this peft model has several")
        lora = next(iter(configs.values()))
        if type(lora).__name__ != "LoraConfig":
            raise ValueError(f"the planner models LoRA, not peft's {type(lora).__name__}")
        if lora.lora_dropout:
            raise ValueError("LoRA dropout is not modelled (it keeps a dropped copy of each adapted input); "
                             "plan with lora_dropout=0 or pass an estimate")
        targets = lora.target_modules
        if isinstance(targets, str):
            raise ValueError("a target_modules regular expression is not read; list the module names")
        unknown = sorted(set(targets) - set(self._PEFT_TARGETS))
        if unknown:
            raise ValueError(f"peft target {unknown[0]!r} is not a projection the planner models "
                             f"({', '.join(self._PEFT_TARGETS)})")
        order = list(self._PEFT_TARGETS)
        names = [self._PEFT_TARGETS[t] for t in sorted(targets, key=order.index)]
        saved = set(lora.modules_to_save or ())
        if saved - {"embed_tokens", "lm_head"}:
            raise ValueError(f"modules_to_save {sorted(saved)}: the planner trains the embedding and head or neither")
        adapters = [p for name, p in self.model.named_parameters() if "lora_" in name]
        base_dtype = next(p for name, p in self.model.named_parameters() if "lora_" not in name).dtype
        fp32_adapters = bool(adapters) and adapters[0].dtype == torch.float32 and base_dtype != torch.float32
        return dict(finetune="lora", lora_rank=lora.r, lora_targets=",".join(names),
                    train_embeddings=bool(saved), lora_dtype="fp32" if fp32_adapters else "auto")

    def compare(self, estimate=None, tokens_per_step: int | None = None, gpu: str = "h100"):
        """A ProfileReport: the planner's ``Estimate`` for this layout against what was measured.
        Without one (a Hugging Face model) the run observed is planned, on ``gpu``'s preset
        (its memory size does not change the predicted bytes)."""
        from profiler.report import compare
        from profiler.run import environment

        if estimate is None:
            from planner.catalog import load_gpu
            from planner.estimate import estimate as plan

            spec, train = self.observed()
            estimate = plan(spec, load_gpu(gpu), train)
        train = estimate.train
        step = min(self.step_times) if self.step_times else 0.0
        tokens = tokens_per_step or train.global_batch * train.seq_len
        result = RunResult(
            model_name=estimate.model.name, num_params=estimate.model.num_params, train=train, world=1,
            backend="none", device=str(next(self.model.parameters()).device),
            torch_version=torch.__version__, steps=[StepRecord(step=i, loss=None, step_time_s=t,
                                                               tokens_per_s=tokens / t if t else 0.0)
                                                    for i, t in enumerate(self.step_times)],
            ranks=[self.result()], median_step_time_s=step, tokens_per_s=tokens / step if step else 0.0,
        )
        return compare(estimate, result, environment(result))


def track(model: nn.Module, optimizer: torch.optim.Optimizer) -> Tracker:
    return Tracker(model, optimizer)
