"""Fine-tuning a frozen base: LoRA and QLoRA (``--finetune lora|qlora``).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", sec. 4.1): each
adapted projection W [out, in] stays frozen and gains A [r, in] and B [out, r], B zero-initialised,
so y = W x + (alpha / r) B A x; only A and B train. The seed notes (004) add QLoRA (Dettmers et
al. 2023): the frozen base stored in 4-bit NormalFloat, blocks of 64 weights sharing an absmax
that is itself quantised to 8 bits in blocks of 256 ("double quantisation", sec. 3:
0.5 + 8/64 + 32/(64 x 256) bits per weight of overhead), dequantised to 16 bits for each matmul.

What this module says, per unit (embedding, each layer, head) of the model:

- the frozen base's bytes: the projections in the base precision (bf16: not quantised, in the
  parameters' dtype;
  int8: 1 B + one fp32 scale per output row, ``strategies/kernels/int8.py``; nf4: the layout
  above, ``strategies/kernels/nf4.py``), everything else (norms, embedding, head) in the
  parameter dtype -- QLoRA and bitsandbytes leave the embedding and the output head unquantised;
- the trainable tensors: the adapters (and the embedding and head with ``train_embeddings``),
  which get gradients, optimizer state and, with a mixed-precision recipe, fp32 masters;
- the largest dequantised weight: one projection in the compute dtype, the temporary a
  quantised base materialises per matmul (forward and backward).

Activations (``planner/activations.py``): a frozen projection without an adapter saves no input
(autograd keeps a matmul's input only for the weight's gradient); an adapter keeps its A output
[tokens, r] for B's gradient, and A shares the projection's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import ceil

from planner.configs import ModelSpec, TrainConfig
from planner.params import ParamTensor, Unit, adapter_tensors, model_units

NF4_BLOCK = 64  # weights per absmax (QLoRA sec. 3)
NF4_DQ_BLOCK = 256  # absmaxes per second-level fp32 scale (double quantisation)

# projection name in planner/params.py (and strategies/model.py) -> the --lora-targets names that
# adapt it
PROJECTIONS = {"q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",), "gate": ("gate",), "up": ("up",),
              "down": ("down",), "fc1": ("gate", "up"), "fc2": ("down",)}


def quantised_bytes(shape: tuple[int, ...], base: str, param_bytes: int) -> int:
    """Bytes a frozen projection weight [out, in] occupies in ``base`` storage (``bf16``: not
    quantised, in the parameters' dtype)."""
    numel = shape[0] * shape[1]
    if base == "int8":  # int8 codes and one fp32 absmax scale per output row
        return numel + 4 * shape[0]
    if base == "nf4":
        # two 4-bit codes per byte (the last block padded), one int8 absmax per 64 weights, one
        # fp32 scale per 256 absmaxes, and the absmaxes' fp32 mean (subtracted before their
        # quantisation): strategies/kernels/nf4.py stores exactly these
        blocks = ceil(numel / NF4_BLOCK)
        return NF4_BLOCK // 2 * blocks + blocks + 4 * ceil(blocks / NF4_DQ_BLOCK) + 4
    return numel * param_bytes


def block_projection(tensor: ParamTensor) -> str | None:
    """``attn.q.weight`` -> ``q``; None for anything that is not a block projection's weight
    (the inventory's role, ``ParamTensor.block_projection``)."""
    return tensor.block_projection


def is_adapted(projection: str, targets) -> bool:
    """Whether ``--lora-targets`` (a TrainConfig or ActivationInputs) adapts this projection."""
    return any(t in targets.lora_targets.split(",") for t in PROJECTIONS[projection])


@dataclass(frozen=True)
class UnitState:
    kind: str
    frozen_bytes: int  # the frozen base, stored (quantised projections, 16-bit rest)
    trainable: tuple[ParamTensor, ...]  # adapters (and embedding/head with train_embeddings)
    quantised: int  # elements of the projections held quantised (dequantised per matmul)
    quantised_bytes: int  # their storage
    largest_dequantised: int  # elements of the largest of them

    @property
    def trainable_numel(self) -> int:
        return sum(t.numel for t in self.trainable)


def _unit_state(unit: Unit, train: TrainConfig, param_bytes: int) -> UnitState:
    frozen, trainable, quantised, stored, largest = 0, [], 0, 0, 0
    for tensor in unit.tensors:
        if train.train_embeddings and tensor.role in ("embedding", "positions", "head"):
            trainable.append(tensor)
            continue
        projection = block_projection(tensor)
        if projection is None:
            frozen += tensor.numel * param_bytes
            continue
        nbytes = quantised_bytes(tensor.shape, train.base, param_bytes)
        frozen += nbytes
        if train.base != "bf16":
            quantised, stored, largest = quantised + tensor.numel, stored + nbytes, max(largest, tensor.numel)
        if is_adapted(projection, train):
            trainable += adapter_tensors(tensor, train.lora_rank)
    return UnitState(unit.kind, frozen, tuple(trainable), quantised, stored, largest)


@lru_cache(maxsize=1024)
def unit_states(model: ModelSpec, train: TrainConfig, param_bytes: int) -> tuple[UnitState, ...]:
    """Every unit of the model in forward order (``planner.params.model_units``)."""
    return tuple(_unit_state(unit, train, param_bytes) for unit in model_units(model))


def trainable_params(model: ModelSpec, train: TrainConfig) -> int:
    """Trainable elements of a LoRA fine-tune (adapters, and embedding/head when they train)."""
    return sum(u.trainable_numel for u in unit_states(model, train, 2))
