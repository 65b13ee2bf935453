"""Float8 training as torchao runs it (``torchao.float8``, 0.18.0) and torchtitan applies it.

``--precision fp8-tensorwise`` / ``fp8-rowwise`` are torchao's recipes of those names
(``Float8LinearConfig.from_recipe_name``) on top of amp-bf16's states: FSDP2 keeps fp32
parameters, gradients and Adam moments and computes in bf16 (``MixedPrecisionPolicy``), and
each block projection (q, k, v, o and the MLP's) becomes a ``Float8Linear`` whose three GEMMs
run on the fp8 tensor cores. What changes against amp-bf16:

- **Which linears.** Every projection of the blocks whose both dimensions are multiples of 16
  (``torch._scaled_mm``'s requirement; torchao's README ``module_filter_fn``); the output head
  stays in bf16 (torchtitan filters ``"output"``, torchtitan/float8.py at 9dec370 and its
  ``filter_fqns`` since). Embeddings are no linears.
- **What backward saves.** ``matmul_with_hp_or_float8_args.forward`` saves the 16-bit input and
  weight (``ctx.save_for_backward(input_hp, weight_hp_t)``, torchao/float8/float8_linear.py), so
  activations are amp-bf16's; torchtitan's Table 1 (77.0 vs 76.8 GiB) and torchao's README
  benchmark (47.65 vs 47.77 GB) agree.
- **Casts.** Each GEMM operand is scaled and cast per use (dynamic scaling): forward the input
  and the weight; backward the output gradient twice (one orientation per GEMM), the input and
  the weight again. A cast reads its 16-bit source for the amax, then again to write one byte
  per element: 5 B per element compiled (inductor fuses abs-max and the scale-and-cast, not the
  two passes of a tensor-wide max); a row-wise scale along the contiguous dimension fuses into
  one pass (3 B); eager runs torchao's ops one by one -- abs, max, ``.to(float32)``, ``* scale``,
  ``clamp``, ``.to(float8)`` (torchao/float8/float8_utils.py ``tensor_to_amax``,
  ``to_fp8_saturated``; float8_training_tensor.py ``_ToFloat8ConstrFunc``): 33 B per element,
  with an fp32 copy and its clamped copy (8 B per element) alive at once.
- **FSDP all-gather in fp8** (tensorwise only, torchao's ``enable_fsdp_float8_all_gather``, which
  torchtitan's Float8 launch command turns on, docs/float8.md at 9dec370): the fp32 shard is cast
  to fp8 before the all-gather, so a block's gathered projections take 1 B per element and their
  casts happen on the shard; torchtitan's rowwise recipe communicates in bf16.
- **Tensor parallel** (tensorwise): ``Float8ColwiseParallel`` all-gathers the fp8 input, so the
  sequence-parallel all-gathers carry 1 B per element; reduce-scatters stay bf16
  (torchao/float8/float8_tensor_parallel.py). The projections then save that fp8 input rather
  than a 16-bit one: not modelled yet (activations stay amp-bf16's), and ``run`` does not run
  Float8 with tensor parallelism to measure it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from planner.configs import ModelSpec, TrainConfig
from planner.finetune import block_projection
from planner.params import ParamTensor, layer_tensors
from planner.precision import FLOAT8_RECIPES

SCALED_MM_MULTIPLE = 16
# bytes moved per element of a 16-bit tensor cast to float8 (module docstring)
CAST_BYTES_COMPILED_TWO_PASS = 5
CAST_BYTES_COMPILED_ONE_PASS = 3
CAST_BYTES_EAGER = 33
EAGER_CAST_SCRATCH = 8  # the fp32 scaled copy and its clamp, per element, while one cast runs
FP32_SHARD_CAST_BYTES = 9  # fp8 all-gather: amax of the fp32 shard (4), then read 4 and write 1


def float8_recipe(precision: str) -> str:
    """``tensorwise``, ``rowwise``, or empty for a recipe without Float8 linears."""
    return FLOAT8_RECIPES.get(precision, "")


def converts(tensor: ParamTensor) -> bool:
    """Whether torchao's conversion, as torchtitan filters it, makes this weight a Float8Linear's:
    a block projection whose dimensions are multiples of 16."""
    return block_projection(tensor) is not None and not any(dim % SCALED_MM_MULTIPLE for dim in tensor.shape)


@lru_cache(maxsize=256)
def converted_shapes(model: ModelSpec, kind: str = "decoder") -> tuple[tuple[str, int, int, int | None], ...]:
    """(input, out, in, tp_dim) of the projections of one block that become Float8Linear;
    ``input`` names the tensor the projection reads (q, k, v read one; gate and up another)."""
    shapes = []
    for tensor in layer_tensors(model, kind):
        if not converts(tensor):
            continue
        projection = block_projection(tensor)
        # column-parallel projections of a sub-layer share its input (cross-attention's k, v read
        # the encoder's output); a row-parallel one reads its own
        sublayer = tensor.sublayer
        source = sublayer + (".memory" if sublayer == "cross" and projection in ("k", "v") else "")
        out_features, in_features = tensor.shape
        shapes.append((source if tensor.tp_dim == 0 else f"{sublayer}.{projection}", out_features, in_features,
                       tensor.tp_dim))
    return tuple(shapes)


def _local_projections(model: ModelSpec, kind: str, tp: int) -> list[tuple[str, int, int, bool]]:
    """(input, n out, k in, column-parallel) of the converted projections on one tensor-parallel rank."""
    return [(source, out // tp if tp_dim == 0 else out, inp // tp if tp_dim == 1 else inp, tp_dim == 0)
            for source, out, inp, tp_dim in converted_shapes(model, kind)]


def converted_numel(model: ModelSpec, kind: str, tp: int) -> int:
    """Elements of one block's converted weights on one tensor-parallel rank."""
    return sum(out * inp for _, out, inp, _ in converted_shapes(model, kind)) // tp


def fp8_all_gather(train: TrainConfig) -> bool:
    """Whether FSDP gathers the converted weights in fp8."""
    return float8_recipe(train.precision) == "tensorwise" and train.zero_stage >= 2 and train.fp8_all_gather


@dataclass(frozen=True)
class Float8Layer:
    """One block, one micro-batch, one rank: the FLOPs its Float8 GEMMs run (forward; the
    backward's two GEMMs run twice as many) and the bytes its casts move."""

    gemm_forward_flops: float
    cast_forward_bytes: float
    cast_backward_bytes: float


def layer(model: ModelSpec, train: TrainConfig, kind: str = "decoder") -> Float8Layer:
    """Compiled, the casts of one input shared by several projections (q, k, v; gate, up) are
    one: AOTAutograd eliminates common subexpressions of the joint graph
    (``torch._functorch.config.cse``); eager, each Float8Linear casts its own. Under tensor
    parallelism with sequence parallelism, tensorwise casts the input on the rank's sequence
    shard before the fp8 all-gather (``Float8ColwiseParallel``)."""
    recipe = float8_recipe(train.precision)
    m = train.micro_batch * train.local_seq_len  # a linear sees the whole local sequence
    gathered_fp8 = fp8_all_gather(train)
    if not train.compile:
        dim0 = dim1 = CAST_BYTES_EAGER
    elif recipe == "rowwise":  # row-wise scales along the contiguous dimension fuse; column-wise do not
        dim0, dim1 = CAST_BYTES_COMPILED_ONE_PASS, CAST_BYTES_COMPILED_TWO_PASS
    else:
        dim0 = dim1 = CAST_BYTES_COMPILED_TWO_PASS
    shard_input = recipe == "tensorwise" and train.sequence_parallel
    flops = forward = backward = 0.0
    cast_inputs: set[str] = set()
    for source, n, k, column in _local_projections(model, kind, train.tp):
        flops += 2 * m * k * n
        weight = k * n
        weight_cast = FP32_SHARD_CAST_BYTES * weight / train.shard_world if gathered_fp8 else dim0 * weight
        once = train.compile and source in cast_inputs  # the shared input was cast already
        cast_inputs.add(source)
        input_rows = m // train.tp if shard_input and column else m
        # forward: input (rows), weight; backward: grad_output both ways, input by columns, weight again
        forward += (0 if once else dim0 * input_rows * k) + weight_cast
        backward += ((dim0 + dim1) * m * n + (0 if once else dim1 * m * k)
                     + (0 if gathered_fp8 else dim1 * weight))
    return Float8Layer(flops, forward, backward)


def gathered_unit_bytes(model: ModelSpec, train: TrainConfig, sizes: tuple[int, ...], kinds: tuple[str, ...],
                        gather_bytes: int) -> tuple[int, ...]:
    """Bytes each FSDP unit all-gathers: its converted weights at 1 B when they travel in fp8,
    everything else in the gather dtype."""
    if not fp8_all_gather(train):
        return tuple(n * gather_bytes for n in sizes)
    fp8 = {kind: converted_numel(model, kind, train.tp) for kind in set(kinds) if kind not in ("embed", "head")}
    return tuple(n * gather_bytes - fp8.get(kind, 0) * (gather_bytes - 1) for n, kind in zip(sizes, kinds))


def projection_backward_peak(m: int, k: int, n: int, scratch: int, weight_cast: bool = True) -> int:
    """Bytes one Float8Linear's backward allocates at its peak (m tokens, k in, n out; 16-bit
    gradients; ``scratch``: bytes per element an eager cast holds beside its fp8 result), step by
    step as ``matmul_with_hp_or_float8_args.backward`` runs."""
    weight = k * n if weight_cast else 0  # the weight's fp8 copy
    return max(
        (1 + scratch) * m * n,  # the first output-gradient cast
        m * n + (1 + scratch) * weight,  # the weight's cast
        2 * m * n + scratch * m * n + weight + 2 * m * k,  # the second output-gradient cast
        2 * m * n + weight + 2 * m * k + (1 + scratch) * m * k,  # the input's cast by columns
        2 * m * n + weight + 2 * m * k + m * k + 2 * k * n,  # grad_weight written
    )


def backward_working_bytes(model: ModelSpec, train: TrainConfig, kind: str = "decoder", mlp_freed: int = 0) -> int:
    """The most any one Float8 projection's backward holds of its own, gradients included, as
    torchao's ``matmul_with_hp_or_float8_args.backward`` runs it (16-bit input and output
    gradient; m tokens, k in, n out): cast the output gradient for grad_input (an eager cast keeps
    its fp32 scaled copy and clamped copy with the fp8 result: 9 B per element), cast the weight
    (unless it was all-gathered in fp8), grad_input = go @ w (2mk); cast the output gradient again
    for grad_weight, then the input by columns, grad_weight (2kn). Measured on CPU with
    torch 2.13 / torchao 0.18 (``LivePeak`` over one Float8Linear, six shapes, exact to the
    scales' bytes): at the second output-gradient cast 10mn + kn + 2mk, at the input cast
    2mn + kn + 11mk, against the bf16 linear's 2mk + 2kn; traced in a block, the fp8 copy of an
    fp8-gathered weight is the gathered parameter itself. Compiled, inductor writes the fp8
    copies without the fp32 scratch (1 B per element): not measured (its allocations are inside
    the compiled kernels).

    Around it in the block: the output gradient coming in (for o and down, the residual
    stream's gradient itself; for the others beside it), the gradients of the sub-layer's
    projections still to run, the input gradient accumulated so far; and every projection but
    the MLP's output one runs after that one's backward freed its saved input (``mlp_freed``
    bytes, which the caller's moment still counts)."""
    m = train.micro_batch * train.local_seq_len
    gathered_fp8 = fp8_all_gather(train)
    scratch = 0 if train.compile else EAGER_CAST_SCRATCH
    shapes = _local_projections(model, kind, train.tp)
    worst = 0
    for i, (source, n, k, column) in enumerate(shapes):
        own = projection_backward_peak(m, k, n, scratch, weight_cast=not gathered_fp8)
        # Autograd runs a sub-layer's projections in reverse order of their forward (v, k, q;
        # up, gate): the output gradients of those still to run wait, and from the second on
        # the input's gradient accumulates in a buffer of its own
        siblings = [j for j, other in enumerate(shapes) if other[0] == source]
        waiting = sum(2 * m * shapes[j][1] for j in siblings if j < i)
        accumulated = 2 * m * k if any(j > i for j in siblings) else 0
        residual = 2 * m * model.hidden_size if column else 0  # o's and down's gradient is the residual's
        freed = 0 if source in ("mlp.down", "mlp.fc2") else mlp_freed
        worst = max(worst, own + 2 * m * n + waiting + accumulated + residual - freed)
    return worst
