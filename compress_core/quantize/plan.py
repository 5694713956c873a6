"""How the `quantize` stage treats one tensor: every option resolved for its format and role.

Options left unset take defaults that depend on where the tensor is written:

- ONNX ("compact"): below 8 bits, asymmetric groups of 16 along the
  reduction axis, each with a 5-bit scale code and a 2-bit zero point
  (4.44 bits per weight at 4 bits); an explicit --group-size above 16 gets
  8-bit scale codes and full-width zero points. At 2-4 bits, 2-D
  MatMul/Gemm weights of 1M+ elements in groups of up to 64 get multiplier
  scales per super-block of 128 inputs instead (`_super_block`). At 8 bits,
  symmetric groups with 8-bit scale codes, their size (a power of two from 4
  up to the former rule's max(16, K/5), at most 128) chosen per tensor from
  its values by rate and distortion (`grouping`; the plan says `from_values`
  and holds the former rule's size, which --dry-run estimates with).
- safetensors and anything else ("interoperable"): the layout
  compressed-tensors readers (vLLM, transformers) load: symmetric, float
  scales in the model's type, per channel at 8 bits and groups of 128 below.

Backup precision: embeddings and the output head (`TensorInfo.sensitive`)
pass their quantization error straight to the outputs, so in ONNX, with
--bits below --backup-bits, they are quantized at --backup-bits instead
unless --all-layers is given. Left to its default, the backup is 6 bits
within a budget: it may add at most BACKUP_BUDGET bits per weight averaged
over the model, so where those tensors hold a large share of the weights
(a small language model's vocabulary) they get fewer extra bits (share
0.58 at --bits 4: 5 bits, +0.58 bits per weight; in large language models
they hold 3-15% and get 6). An explicit --backup-bits is applied as given.
In safetensors the backup applies only when --backup-bits is given:
compressed-tensors readers expect every quantized module at the widths of
its config group, and the layout's interoperable widths are 4 and 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from modelpress.core.errors import UnsupportedTensorError
from modelpress.core.quantize.grouping import choose_group, former_group
from modelpress.core.tensorinfo import TensorInfo, axes_for

DEFAULT_BACKUP_BITS = 6
BACKUP_BUDGET = 1.0  # extra bits per weight, over the whole model, the default backup may add
PLAIN_GROUP = 128
CODED_GROUP = 16
SUPER_BLOCK = 128
MAX_MULTIPLIED_BITS = 4
MULTIPLIER_MIN_WEIGHTS = 1 << 20  # as modelpress.formats.onnx.sites.KERNEL8_MIN_WEIGHTS (tested)


@dataclass(frozen=True)
class QuantPlan:
    """Every quantization choice for one tensor."""

    bits: int
    symmetric: bool
    granularity: str
    group_size: int | None
    method: str                # rtn, mse, or gptq (needs the tensor's second moments)
    scale_bits: int            # 0: scales stored as floats of the scale dtype
    zero_bits: int | None      # None when symmetric
    backup: bool = False       # bits raised by the backup-precision policy
    super_block: int = 0       # inputs per float16 base of multiplier scales (0: none)
    block_span: int = 1        # axes from the block axis that groups run along, flattened
    # The group size is chosen from the values (`chosen_layout`); until then group_size
    # is the estimate of `grouping.former_group`.
    from_values: bool = False


# A group may pad its axis up to this factor (or up to PADDED_FLOOR elements in all).
MAX_PADDING = 16
PADDED_FLOOR = 1 << 22


def budgeted_backup(bits: int, share: float | None) -> int:
    """The default backup width for tensors holding `share` of the model's weights."""
    if not share:
        return DEFAULT_BACKUP_BITS
    extra = math.floor(BACKUP_BUDGET / share + 1e-9)
    return min(DEFAULT_BACKUP_BITS, bits + extra)


def plan_for(stage: Any, info: TensorInfo) -> QuantPlan:
    """Resolve a Quantize stage's unset options for one tensor."""
    compact = info.format == "onnx"
    bits, backup = stage.bits, False
    if info.sensitive and not stage.all_layers and (compact or stage.backup_bits):
        floor = stage.backup_bits or budgeted_backup(stage.bits, info.sensitive_share)
        if bits < floor:
            bits, backup = floor, True
    granularity = stage.granularity or (
        "group" if stage.group_size or bits < 8 or compact else "channel")
    scale_bits = stage.scale_bits
    if stage.super_block and scale_bits is None and bits <= MAX_MULTIPLIED_BITS:
        scale_bits = 5  # a given --super-block refits the log grid's 5-bit codes
    group_size, span = None, 1
    from_values = False
    if granularity == "group":
        group_size = stage.group_size or _default_group(bits, scale_bits, compact, info)
        span = _flattened_span(info, group_size)
        if span > 1 and not stage.group_size:
            group_size = _balanced(_reduction_size(info, span),
                                   _default_group(bits, scale_bits, compact, info, span),
                                   info.shape[axes_for(info)[1]])
        if stage.group_size:
            _check_padding(stage.group_size, info, span)
        # Whole-kernel groups keep their balanced size; the others of 8-bit codes with
        # 8-bit scale codes are chosen from the values.
        from_values = (not stage.group_size and span == 1
                       and _measured(bits, scale_bits, compact))
    if scale_bits is None:
        scale_bits = 0
        if compact and granularity != "tensor":
            scale_bits = 5 if granularity == "group" and group_size <= CODED_GROUP and bits < 8 \
                else 8
    symmetric = (stage.scheme or ("asym" if scale_bits and bits < 8 else "sym")) == "sym"
    zero_bits = None
    if not symmetric:
        narrow = scale_bits and granularity == "group" and group_size <= CODED_GROUP and bits < 8
        zero_bits = min(stage.zero_bits or (2 if narrow else bits), bits)
    method = stage.method or default_method(bits)
    if method == "gptq" and not has_second_moments(info):
        method = default_method(bits)  # no statistics for this tensor: the note says so
    elif stage.method is None and has_second_moments(info):
        method = "gptq"
    super_block = _super_block(stage, info, bits, granularity, group_size, compact)
    return QuantPlan(bits=bits, symmetric=symmetric, granularity=granularity,
                     group_size=group_size, method=method, scale_bits=scale_bits,
                     zero_bits=zero_bits, backup=backup, super_block=super_block,
                     block_span=span, from_values=from_values)


def _flattened_span(info: TensorInfo, group_size: int) -> int:
    """The block span groups run along: the tensor's (a depthwise or grouped convolution
    kernel) when one group would be longer than its block axis, so that grouping
    along that axis alone would give every few weights a scale of their own; else 1."""
    _, block_axis = axes_for(info)
    span = info.block_span
    if (span > 1 and info.shape and info.shape[block_axis] < group_size
            and math.prod(info.shape[block_axis + 1:block_axis + span]) > 1):
        return span
    return 1


def _balanced(k: int, group_size: int, axis: int) -> int:
    """The shortest group that splits `k` inputs into as many groups as `group_size` does
    (a depthwise 3x3 kernel's 9 weights are one group of 9, not 16 with 7 padded), if
    that is still longer than the block axis (`axis` inputs), else `group_size`: given
    back as --group-size, the group must flatten the kernel again (recipe replays)."""
    groups = -(-k // group_size)
    balanced = -(-k // groups)
    return balanced if balanced > axis else group_size


def default_method(bits: int) -> str:
    """The rounding without calibration statistics (and the fit of gptq's grid)."""
    return "mse" if bits < 8 else "rtn"


def has_second_moments(info: TensorInfo) -> bool:
    """Whether a calibration run collected X^T X for this tensor (see quantize.gptq)."""
    return info.input_stats is not None and info.input_stats.second_moments is not None


def chosen_layout(plan: QuantPlan, w: np.ndarray, info: TensorInfo) -> QuantPlan:
    """`plan` with the group size its `from_values` asks for chosen from `w` (float32), or
    `plan` itself when the layout is fixed."""
    if not plan.from_values:
        return plan
    group = choose_group(w, info, bits=plan.bits, scale_bits=plan.scale_bits,
                         zero_bits=plan.zero_bits)
    return replace(plan, group_size=group, from_values=False)


def _super_block(stage: Any, info: TensorInfo, bits: int, granularity: str,
                 group_size: int | None, compact: bool) -> int:
    """Inputs per multiplier base for this tensor, 0 for none.

    Given, it applies to every tensor of at most MAX_MULTIPLIED_BITS bits in
    groups that tile it; by default only in ONNX, with scale codes left to
    their default, to 2-D MatMul/Gemm weights of at least
    MULTIPLIER_MIN_WEIGHTS elements in groups of up to 64 that tile a
    super-block: those onnxruntime runs in its 8-bit kernel
    (`modelpress.formats.onnx.sites`). Elsewhere the log grid's 5-bit codes cost less
    (4.44 bits per weight against 4.5 in groups of 16) for about the same
    error, and a smaller weight is decoded at load anyway.
    """
    if granularity != "group" or bits > MAX_MULTIPLIED_BITS:
        return 0
    if stage.super_block is not None:
        return stage.super_block if stage.super_block % group_size == 0 else 0
    if not compact or stage.scale_bits is not None or group_size > SUPER_BLOCK // 2 \
            or SUPER_BLOCK % group_size:
        return 0
    if info.role not in ("MatMul", "Gemm") or len(info.shape) != 2:
        return 0
    if info.shape[0] * info.shape[1] < MULTIPLIER_MIN_WEIGHTS:
        return 0
    return SUPER_BLOCK


def _measured(bits: int, scale_bits: int | None, compact: bool) -> bool:
    """Whether the group size is chosen from the values (8-bit codes with 8-bit scale codes)."""
    return bits == 8 and compact and scale_bits in (None, 8)


def _default_group(bits: int, scale_bits: int | None, compact: bool, info: TensorInfo,
                   span: int = 1) -> int:
    if _measured(bits, scale_bits, compact):
        return former_group(_reduction_size(info, span))
    if (scale_bits is None and compact) or (scale_bits and scale_bits <= 6):
        return CODED_GROUP
    return PLAIN_GROUP


def _check_padding(group_size: int, info: TensorInfo, span: int = 1) -> None:
    """Refuse a group so much longer than the axis it runs along that its zero padding,
    not the tensor, would set the memory used (a 204 kB model took 5.9 GB at
    --group-size 4000000). Up to MAX_PADDING times the axis, or PADDED_FLOOR
    elements in all, a longer group is one group per row, as it always was."""
    k = _reduction_size(info, span)
    rows = math.prod(info.shape) // k if k else 0
    if group_size > MAX_PADDING * k and rows * group_size > PADDED_FLOOR:
        raise UnsupportedTensorError(
            f"tensor {info.name!r}: --group-size {group_size} is far longer than its {k} inputs "
            f"per output, the axis groups run along (at most {MAX_PADDING * k} here); give "
            f"--group-size {k}, --granularity channel, or --exclude {info.name!r}")


def _reduction_size(info: TensorInfo, span: int = 1) -> int:
    _, block_axis = axes_for(info)
    return math.prod(info.shape[block_axis:block_axis + span]) if info.shape else 1
