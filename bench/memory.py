"""Per-GPU memory of SDXL distillation at 1024 px, by stage and training mode: a MODEL, computed on the
meta device (no weights are allocated, no GPU is needed), not a measurement of a real run.

    python bench/memory.py                                  # SDXL, micro-batch from configs/sdxl.yaml (8)
    python bench/memory.py --micro-batch 4 --json bench/results/memory.json
    python bench/memory.py --preset tiny                    # the toy UNet (seconds; what the tests run)
    python bench/memory.py --compare peaks.json             # measured peaks (bench/step.py on a GPU) vs model

One rank's GPU memory is modelled as static terms plus the largest activation "moment" of a step:

Static (DeepSpeed 0.19 ZeRO-2 engines, bf16 weights; buckets and dtypes from the recipe's DeepSpeed JSON:
data_types.grad_accum_dtype and communication_data_type, the model dtype where the JSON leaves them out):
- student weights: bf16 full replica, 2 B x params (ZeRO-2 partitions gradients and optimizer
  state, never weights). LoRA mode: the frozen base and the LoRA factors, all bf16.
- student gradients: this rank's partition only. grad_accum_dtype fp32 (the GPU JSONs): DeepSpeed sums
  each reduced bucket into an fp32 partition, 4 B x trainable / N, from the first backward of a step to
  the optimizer step, on the GPU also with optimizer offload. bf16: a bf16 partition, 2 B x trainable / N
  (none on the GPU with offload: each gradient goes to the CPU as it is reduced).
- student optimizer: fp32 master weights + Adam m and v, 12 B x trainable / N. With optimizer offload
  (zero_optimization.offload_optimizer.device = cpu) they are in CPU memory, with the pinned fp32
  gradient the CPU Adam reads and a pinned bf16 copy of the updated partition: 18 B x trainable / N of
  CPU memory per rank (+ 2 B for a bf16 accumulator when a bf16-accumulating step accumulates).
  The allgather bucket costs nothing: the updated weights are gathered straight into the flat weights.
- teacher: a frozen bf16 copy, 2 B x params, no gradients (in LoRA mode it is a second copy of the
  base weights: the trainer loads teacher and LoRA student separately). The one-step stage's x0
  conversion phase holds a frozen copy of the student instead: same size.
- discriminator (adversarial phases): its own ZeRO-2 engine over all its parameters (the copy of the
  UNet's encoder and mid block, plus the head: the recipe's disc.head_channels, or --head-channels).

Activation moments (the largest one is added to the static terms):
- saved-for-backward bytes, MEASURED on the meta device with torch.autograd.graph.saved_tensors_hooks
  during a bf16 forward at micro-batch B: the student (gradient checkpointing as the recipe says), and D
  (the D step judges real and fake in one stacked call, as Adversarial.judge_real_and_fake:
  the conditional D's backbone runs on x_t and both candidates, 3B rows). Tensors are deduplicated by
  the id of their root tensor (a view counts as the tensor it views: meta tensors have no data_ptr to
  compare); parameters are excluded (counted as weights). Under non-reentrant checkpointing torch's own
  hooks hold each checkpointed block's tensors and ours never see them; what the block keeps is its
  inputs, which our checkpoint function adds explicitly.
- the recompute of one checkpointed block in backward: the largest block's own saved bytes (measured).
- attention: on the meta device torch's SDPA takes the math path, which saves the L x L probabilities
  in fp32; a GPU runs the flash kernel, which saves q, k, v, the output and an fp32 logsumexp. A
  stand-in with the flash kernel's saved tensors replaces SDPA while measuring.
- the teacher's (or frozen copy's) forward under no_grad (doubled batch with CFG): the peak of live
  intermediate tensors, MEASURED with a dispatch mode that tracks every freshly allocated op output
  until it is freed (views and in-place results are not new memory). This replaces the cruder
  "largest single intermediate x a small factor", which is printed alongside as a cross-check.
- an engine's backward also holds its reduce buckets (reduce_bucket_size elements, bf16, two with
  overlap_comm; freed when the backward ends) and one bucket's reduction copies: a flat bf16 copy, and
  the fp32 copy that is all-reduced when communication_data_type is fp32 (2 + 4 B per element).
- the optimizer step: Adam reads the fp32 partition in place; a bf16 partition is flattened and cast to
  fp32 first (2 + 4 B x trainable / N).
- adversarial phases run the G step, then the D step (Adversarial.micro_step): the G backward
  frees the student's graph before D's forward.

Not modelled: the CUDA context, NCCL buffers, allocator fragmentation (hence the reserve subtracted from
the card), gradients of activations in backward beyond one block's recompute, data-loader tensors,
offload's staging buffers (one largest parameter's gradient, bf16).
Activations are measured at the table's micro-batch and scaled in proportion for the search of the
largest micro-batch that fits (every activation tensor has the batch dimension; the tests check that
the toy's terms at micro-batch 1 and 3 are exactly proportional).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/memory.py` from a clone, and `import bench.memory` in tests
    sys.path.insert(0, str(ROOT))

from bench.common import PRESETS, Preset  # noqa: E402
from trainer.config import Config, load_config  # noqa: E402
from trainer.method.models import Conditioning, unet_forward  # noqa: E402
from trainer.runtime.engines import compute_dtype  # noqa: E402

GIB = 2 ** 30
BF16, FP32 = 2, 4
ADAM_FP32_STATE = 12  # fp32 master weights + Adam m + Adam v, bytes per trainable parameter
PAPER_GLOBAL_BATCH = 512
CHECKED_WORLD_SIZES = (8, 64)
TABLE_WORLD_SIZES = (1, 8, 64)
# An "80 GB" H100/A100 reports 81,559 MiB = 79.6 GiB; the reserve stands for what the model leaves out
# (CUDA context ~0.5-1 GiB, NCCL buffers, allocator fragmentation).
CARD_GIB, RESERVE_GIB = 79.6, 3.0


# ---------------------------------------------------------------------------------------------------
# Models on the meta device


def build_unet(preset: Preset) -> nn.Module:
    """The preset's UNet on the meta device, in bf16 as the DeepSpeed engines and the teacher hold it."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**preset.unet).to(torch.bfloat16)


def build_lora_unet(preset: Preset) -> nn.Module:
    """The UNet with trainer.method.lora.add_lora applied. Under torch.device("meta") peft creates the factors on
    meta too; otherwise it initialises them on the CPU first (seconds of real work for SDXL's 197 M)."""
    from trainer.method.lora import add_lora

    unet = build_unet(preset)
    with torch.device("meta"):
        add_lora(unet, rank=preset.lora_rank)
    return unet.to(torch.bfloat16)


def build_discriminator(unet: nn.Module, conditional: bool, head_blocks: Optional[int],
                        head_channels: Optional[int] = None) -> nn.Module:
    """trainer.method.discriminator's D (head_channels None: the mid block's width, as the trainer's default)."""
    from trainer.method.discriminator import discriminator_from_unet

    return discriminator_from_unet(unet, conditional=conditional, head_blocks=head_blocks,
                                   head_channels=head_channels).to(torch.bfloat16)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class ParamCounts:
    student: int  # the UNet: what full mode trains, and the teacher's size
    lora: int  # the LoRA factors add_lora adds: what LoRA mode trains
    disc: dict  # "cond" / "uncond" -> all parameters of D (all trainable)
    disc_head: dict = dataclasses.field(default_factory=dict)  # "cond" / "uncond" -> D's head alone


@dataclass
class MetaModels:
    unet: nn.Module  # full student, teacher and frozen x0 copy share this architecture
    lora_unet: nn.Module
    discs: dict  # "cond" / "uncond" -> Discriminator

    @classmethod
    def build(cls, preset: Preset, head_blocks: Optional[int], head_channels: Optional[int] = None) -> "MetaModels":
        unet = build_unet(preset)
        discs = {form: build_discriminator(unet, form == "cond", head_blocks, head_channels)
                 for form in ("cond", "uncond")}
        return cls(unet, build_lora_unet(preset), discs)

    def counts(self) -> ParamCounts:
        return ParamCounts(student=count_params(self.unet), lora=count_params(self.lora_unet, trainable_only=True),
                           disc={form: count_params(d) for form, d in self.discs.items()},
                           disc_head={form: count_params(d.head) for form, d in self.discs.items()})

    def head_shape(self) -> tuple[int, int]:
        """(channels, stride-2 blocks) of D's head, the same for both forms."""
        head = self.discs["cond"].head
        return head[-1].in_channels, self.discs["cond"].head_blocks


def meta_batch(preset: Preset, batch: int) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """Float32 latents, timesteps and conditioning as the trainer hands them to unet_forward."""
    x = torch.empty(batch, *preset.latent, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    cond = Conditioning(torch.empty(batch, preset.text_tokens, preset.text_dim, device="meta"),
                        torch.empty(batch, preset.pooled_dim, device="meta"),
                        torch.empty(batch, preset.time_ids, device="meta"))
    return x, t, cond


# ---------------------------------------------------------------------------------------------------
# Attention as the GPU runs it


class _FlashAttentionStandIn(torch.autograd.Function):
    """Forward-only SDPA for meta tensors that saves what the GPU's flash kernel saves for backward (q, k, v,
    output, fp32 logsumexp per query), not the L x L fp32 probabilities of the math path meta dispatches to."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError("the meta-device attention stand-in only sizes the forward")


@contextlib.contextmanager
def flash_attention_on_meta():
    """Routes unmasked, non-causal SDPA calls on meta tensors to the stand-in (diffusers' AttnProcessor2_0
    looks F.scaled_dot_product_attention up at call time); everything else goes to torch's SDPA."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if query.device.type == "meta" and attn_mask is None and not is_causal and not kwargs.get("enable_gqa"):
            return _FlashAttentionStandIn.apply(query, key, value)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


# ---------------------------------------------------------------------------------------------------
# Saved-for-backward bytes


def _root(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory a view keeps alive (autograd records it as _base)."""
    return tensor._base if tensor._base is not None else tensor


class SavedTensorBytes:
    """Sums the bytes of distinct tensors autograd saves for backward while `hooks()` is active.

    Distinct = distinct root tensor object (meta tensors have no data_ptr to compare storages by); the
    roots are kept referenced so that an id is never reused within one count. Parameters are excluded."""

    def __init__(self, excluded_ids: frozenset = frozenset()):
        self.excluded = excluded_ids
        self._seen: dict[int, torch.Tensor] = {}
        self.bytes = 0

    def add(self, tensor: torch.Tensor) -> None:
        root = _root(tensor)
        if id(root) in self.excluded or id(root) in self._seen:
            return
        self._seen[id(root)] = root
        self.bytes += root.numel() * root.element_size()

    @classmethod
    def excluding(cls, params: Iterable[torch.Tensor]) -> "SavedTensorBytes":
        return cls(frozenset(id(p) for p in params))

    def fresh(self) -> "SavedTensorBytes":
        """A new count with the same exclusions."""
        return SavedTensorBytes(self.excluded)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)


def counted_checkpoint(counter: SavedTensorBytes, block_bytes: list[int]) -> Callable:
    """A `_gradient_checkpointing_func` for diffusers blocks (and trainer.method.discriminator's backbone): torch's
    non-reentrant checkpoint, plus the bytes it costs that saved-tensor hooks cannot see.

    The checkpoint keeps its inputs (closed over for the recompute): added to `counter`. The block's own
    saved tensors, which backward rematerialises, are measured by running the block once more under a
    fresh count (on meta this costs no memory) and appended to `block_bytes`."""

    def checkpointed(module: nn.Module, *args):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                counter.add(arg)
        block = counter.fresh()
        with block.hooks():
            module(*args)
        block_bytes.append(block.bytes)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    return checkpointed


@dataclass(frozen=True)
class SavedReport:
    saved: int  # bytes held for backward after the forward
    block: int  # the largest checkpointed block's own saved bytes (0 without checkpointing)


def saved_for_backward(model: nn.Module, forward: Callable[[], object], checkpointing: bool) -> SavedReport:
    """Runs `forward` (with grad) and reports what it leaves saved for backward."""
    counter = SavedTensorBytes.excluding(model.parameters())
    blocks: list[int] = []
    if checkpointing:
        model.enable_gradient_checkpointing()
        function = counted_checkpoint(counter, blocks)
        for module in model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = function
    else:
        model.disable_gradient_checkpointing()
    with torch.enable_grad(), flash_attention_on_meta(), counter.hooks():
        forward()
    return SavedReport(counter.bytes, max(blocks, default=0))


# ---------------------------------------------------------------------------------------------------
# Live intermediates of a no_grad forward


class LiveIntermediates(TorchDispatchMode):
    """Tracks the bytes of op outputs that are new memory (not views, not in-place results) from allocation
    until the tensor is freed (a weakref finalizer), and records the peak and the largest single tensor."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(ret.alias_info is not None for ret in func._schema.returns):
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self._allocated(tensor)
        return out

    def _allocated(self, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.largest = max(self.largest, nbytes)
        weakref.finalize(tensor, self._freed, nbytes)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes


def frozen_forward_peak(unet: nn.Module, preset: Preset, batch: int) -> LiveIntermediates:
    """The teacher's (or frozen copy's) forward under no_grad, as teacher_jump runs it."""
    x, t, cond = meta_batch(preset, batch)
    with torch.no_grad(), flash_attention_on_meta(), LiveIntermediates() as live:
        out = unet_forward(unet, x, t, cond)
        del out
    return live


# ---------------------------------------------------------------------------------------------------
# Activation measurements at one micro-batch


@dataclass(frozen=True)
class Activations:
    """Activation bytes at micro-batch `batch` (see the module docstring for each term)."""
    batch: int
    student: int  # full student, saved for backward
    student_block: int  # its largest checkpointed block's own saved bytes
    student_no_ckpt: int  # the same forward without gradient checkpointing
    lora_student: int
    lora_block: int
    disc_step: dict  # form -> D step: real and fake forwards with D trainable
    disc_g_step: dict  # form -> G step: one forward of the fake with D frozen
    disc_block: dict  # form -> D's largest checkpointed block
    teacher: int  # no_grad forward peak at batch
    teacher_cfg: int  # ... at 2 x batch (classifier-free guidance as one doubled batch)
    teacher_largest_tensor: int  # largest single intermediate at 2 x batch (cross-check)

    def scaled(self, batch: int) -> "Activations":
        """The same terms at another micro-batch: every saved or live activation tensor carries the batch
        dimension, so they are proportional to it (the tests check this at 1 and 3 on the toy)."""
        def scale(value):
            if isinstance(value, dict):
                return {k: scale(v) for k, v in value.items()}
            return round(value * batch / self.batch)
        values = {f.name: scale(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "batch"}
        return Activations(batch=batch, **values)


def student_saved(unet: nn.Module, preset: Preset, batch: int, checkpointing: bool) -> SavedReport:
    x, t, cond = meta_batch(preset, batch)
    return saved_for_backward(unet, lambda: unet_forward(unet, x, t, cond), checkpointing)


def disc_step_saved(disc: nn.Module, preset: Preset, batch: int, checkpointing: bool) -> SavedReport:
    """The D step: D judges the teacher's landing (real) and the detached student's (fake) in one stacked
    call, as Adversarial.judge_real_and_fake does (the conditional D's x_t branch runs once)."""
    x_t, t, cond = meta_batch(preset, batch)
    both = torch.empty(2 * batch, *x_t.shape[1:], device="meta")
    extra = (x_t, t) if disc.conditional else ()
    return saved_for_backward(disc, lambda: disc(both, torch.cat([t, t]), cond, *extra), checkpointing)


def disc_g_step_saved(disc: nn.Module, preset: Preset, batch: int, checkpointing: bool) -> SavedReport:
    """The G step: D (parameters frozen, as Adversarial.g_step sets them) judges the fake, whose
    gradient flows back to the student."""
    x_t, t, cond = meta_batch(preset, batch)
    fake = torch.empty_like(x_t).requires_grad_()
    extra = (x_t, t) if disc.conditional else ()
    disc.requires_grad_(False)
    try:
        return saved_for_backward(disc, lambda: disc(fake, t, cond, *extra), checkpointing)
    finally:
        disc.requires_grad_(True)


def measure_activations(models: MetaModels, preset: Preset, batch: int, student_ckpt: bool, disc_ckpt: bool,
                        disc_forms: Iterable[str] = ("cond", "uncond")) -> Activations:
    """All activation terms at `batch`, D only in the forms asked for (the recipe's phases)."""
    full = student_saved(models.unet, preset, batch, student_ckpt)
    no_ckpt = student_saved(models.unet, preset, batch, checkpointing=False)
    lora = student_saved(models.lora_unet, preset, batch, student_ckpt)
    d_step = {f: disc_step_saved(models.discs[f], preset, batch, disc_ckpt) for f in disc_forms}
    d_g = {f: disc_g_step_saved(models.discs[f], preset, batch, disc_ckpt) for f in disc_forms}
    teacher_cfg = frozen_forward_peak(models.unet, preset, 2 * batch)
    return Activations(
        batch=batch, student=full.saved, student_block=full.block, student_no_ckpt=no_ckpt.saved,
        lora_student=lora.saved, lora_block=lora.block,
        disc_step={f: r.saved for f, r in d_step.items()}, disc_g_step={f: r.saved for f, r in d_g.items()},
        disc_block={f: max(d_step[f].block, d_g[f].block) for f in d_step},
        teacher=frozen_forward_peak(models.unet, preset, batch).peak, teacher_cfg=teacher_cfg.peak,
        teacher_largest_tensor=teacher_cfg.largest)


# ---------------------------------------------------------------------------------------------------
# ZeRO-2 engines and the phases of the recipe


# DeepSpeed's spellings: data_types.grad_accum_dtype goes through its DtypeEnum (several aliases),
# communication_data_type accepts fp32 / fp16 / bf16 only (lower-cased).
DTYPE_BYTES = {"fp32": FP32, "fp16": 2, "bf16": BF16}
_DTYPE_ALIASES = {alias: name for name, aliases in {
    "fp32": ("fp32", "float32", "float", "torch.float32"), "fp16": ("fp16", "float16", "half", "torch.float16"),
    "bf16": ("bf16", "bfloat16", "torch.bfloat16")}.items() for alias in aliases}


def _dtype_name(value: str, key: str, path: str | Path) -> str:
    name = _DTYPE_ALIASES.get(str(value).lower())
    if name is None:
        raise SystemExit(f"{path}: {key}={value!r} is not a dtype this model knows (fp32, fp16, bf16)")
    return name


@dataclass(frozen=True)
class ZeroSettings:
    reduce_bucket: int  # elements
    overlap_comm: bool
    model_dtype: str = "bf16"  # the weights, the reduce buckets (ZeRO-2 stages gradients in it)
    grad_accum_dtype: str = "bf16"  # the gradient partition (data_types.grad_accum_dtype)
    comm_dtype: str = "bf16"  # what the reduction runs in (communication_data_type)

    @classmethod
    def from_ds_json(cls, path: str | Path) -> "ZeroSettings":
        ds = json.loads(Path(path).read_text())
        zero = ds.get("zero_optimization", {})
        if zero.get("stage") != 2:
            raise SystemExit(f"{path}: this model is for ZeRO stage 2, the file sets {zero.get('stage')}")
        if compute_dtype(ds) != torch.bfloat16 or (ds.get("fp16") or {}).get("enabled") is True:
            raise SystemExit(f"{path}: this model is for bf16 engines (bf16.enabled true)")
        offload = (zero.get("offload_optimizer") or {}).get("device", "none") != "none"
        if not zero.get("contiguous_gradients", True) and not offload:
            raise SystemExit(f"{path}: this model assumes contiguous_gradients (DeepSpeed's default)")
        # DeepSpeed's defaults when the JSON leaves them out: both dtypes follow the model's (engine.py's
        # get_data_types and communication_data_type).
        model = "bf16"
        accum = ds.get("data_types", {}).get("grad_accum_dtype")
        comm = ds.get("communication_data_type")
        return cls(int(float(zero.get("reduce_bucket_size", 5e8))), bool(zero.get("overlap_comm", False)), model,
                   _dtype_name(accum, "data_types.grad_accum_dtype", path) if accum is not None else model,
                   _dtype_name(comm, "communication_data_type", path) if comm is not None else model)

    @property
    def fp32_partition(self) -> bool:
        """DeepSpeed 0.19's compact gradient partition (stage_1_and_2.py, _use_compact_grad_partition_buffer):
        every reduced bucket is summed straight into an fp32 partition, which the optimizer step reads."""
        return self.grad_accum_dtype == "fp32" and self.model_dtype != "fp32"

    def describe(self) -> str:
        return (f"ZeRO-2, {self.model_dtype} weights, gradients accumulated in {self.grad_accum_dtype} and reduced "
                f"in {self.comm_dtype}, reduce bucket {self.reduce_bucket:.0e} elements"
                f"{', x2 for overlap_comm' if self.overlap_comm else ''}")


@dataclass(frozen=True)
class EngineMemory:
    """One ZeRO-2 engine on one rank, bytes."""
    weights: float  # model dtype, full replica
    grads: float  # the gradient partition on the GPU (grad_accum dtype), first backward to optimizer step
    buckets: float  # reduce buckets, during this engine's backward
    comm: float  # one bucket's reduction temporaries, during this engine's backward
    optimizer: float  # fp32 master + Adam m, v on the GPU (0 with offload)
    cpu: float  # what offload puts in CPU memory
    step_transient: float  # what the optimizer step allocates on the GPU beyond the static terms

    @property
    def gpu_static(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def backward_transient(self) -> float:
        return self.buckets + self.comm


def zero2_engine(total: int, trainable: int, world: int, zero: ZeroSettings, offload: bool,
                 accumulates: bool = False) -> EngineMemory:
    """`accumulates`: more than one micro-batch per optimizer step (with bf16 accumulation, offload then
    keeps a bf16 accumulator per rank in CPU memory)."""
    model, accum, comm = (DTYPE_BYTES[d] for d in (zero.model_dtype, zero.grad_accum_dtype, zero.comm_dtype))
    partition = trainable / world
    bucket = min(zero.reduce_bucket, trainable)
    # Offload's CPU side: fp32 master + Adam m, v, the pinned fp32 gradient the CPU Adam reads, the pinned
    # bf16 copy of the updated partition on its way back; with model-dtype accumulation the accumulator.
    offloaded = ADAM_FP32_STATE + FP32 + model + (model if accumulates and not zero.fp32_partition else 0)
    if zero.fp32_partition:
        grads, step = FP32 * partition, 0.0  # the accumulator; Adam reads it in place (offload: a CPU copy)
    else:  # a partition in the accumulation dtype (none on the GPU with offload), flattened + cast at the step
        grads, step = (0.0, 0.0) if offload else (accum * partition, (accum + FP32) * partition)
    return EngineMemory(
        weights=model * total,
        grads=grads,
        buckets=model * bucket * (2 if zero.overlap_comm else 1),  # double-buffered with overlap_comm
        comm=(model + (comm if zero.comm_dtype != zero.model_dtype else 0)) * bucket,  # flat copy (+ cast)
        optimizer=0.0 if offload else ADAM_FP32_STATE * partition,
        cpu=offloaded * partition if offload else 0.0,
        step_transient=step)


@dataclass(frozen=True)
class PhaseSpec:
    """A kind of training phase of the recipe, with the worst discriminator it uses."""
    key: str  # stage1_mse | adv_lora | adv_full | x0
    title: str
    train: str  # full | lora
    disc: Optional[str]  # cond | uncond | None
    frozen_batch_factor: int  # teacher (or frozen copy) forward batch / micro-batch: 2 with CFG
    micro_batch: int
    stage: str
    global_batch: int = 0  # the stage's (0: grad_accum is fixed)
    grad_accum: int = 1

    def accumulates(self, micro_batch: int, world: int) -> bool:
        """More than one micro-batch per optimizer step at this micro-batch and world size."""
        return self.global_batch > micro_batch * world if self.global_batch else self.grad_accum > 1


def recipe_phases(cfg: Config) -> dict[str, PhaseSpec]:
    """stage1_mse, adv_lora, adv_full and x0 as they occur in the recipe (first stage of each kind; the
    conditional D wherever any phase of that kind uses it, since it sees a doubled batch)."""
    specs: dict[str, PhaseSpec] = {}
    for stage in cfg.stages:
        for phase in stage.plan():
            if phase.kind in ("mse", "x0"):
                key = "stage1_mse" if phase.kind == "mse" else "x0"
                title = "stage 1 MSE" if phase.kind == "mse" else "x0 conversion"
                factor = 2 if phase.kind == "mse" and stage.cfg_scale != 1.0 else 1
                specs.setdefault(key, PhaseSpec(key, title, phase.train, None, factor, stage.micro_batch, stage.name,
                                                stage.global_batch, stage.grad_accum))
            else:
                key = f"adv_{phase.train}"
                form = "cond" if phase.kind == "adv_cond" else "uncond"
                known = specs.get(key)
                if known is None:
                    specs[key] = PhaseSpec(key, f"adversarial {phase.train}", phase.train, form, 1,
                                           stage.micro_batch, stage.name, stage.global_batch, stage.grad_accum)
                elif form == "cond" and known.disc != "cond":
                    specs[key] = dataclasses.replace(known, disc="cond", stage=stage.name,
                                                     micro_batch=stage.micro_batch, global_batch=stage.global_batch,
                                                     grad_accum=stage.grad_accum)
    return specs


@dataclass(frozen=True)
class PhaseMemory:
    spec: PhaseSpec
    world: int
    offload: bool
    micro_batch: int
    student: EngineMemory
    teacher: float
    disc: Optional[EngineMemory]
    moments: dict  # name -> activation/transient bytes at that moment of the step

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.moments.get)

    @property
    def static(self) -> float:
        return self.student.gpu_static + self.teacher + (self.disc.gpu_static if self.disc else 0.0)

    @property
    def total(self) -> float:
        return self.static + self.moments[self.peak_moment]

    @property
    def cpu(self) -> float:
        return self.student.cpu + (self.disc.cpu if self.disc else 0.0)

    def as_dict(self) -> dict:
        return {"phase": self.spec.key, "stage": self.spec.stage, "mode": self.spec.train, "disc": self.spec.disc,
                "world_size": self.world, "offload": self.offload, "micro_batch": self.micro_batch,
                "student_gib": self.student.gpu_static / GIB, "teacher_gib": self.teacher / GIB,
                "disc_gib": self.disc.gpu_static / GIB if self.disc else 0.0,
                "peak_moment": self.peak_moment, "moments_gib": {k: v / GIB for k, v in self.moments.items()},
                "gpu_total_gib": self.total / GIB, "cpu_gib": self.cpu / GIB}


def activation_moments(spec: PhaseSpec, acts: Activations, student: EngineMemory,
                       disc: Optional[EngineMemory]) -> dict[str, float]:
    """The step's moments of high activation memory, in the order the objectives run them. A backward
    also holds its engine's reduce buckets and one bucket's reduction temporaries."""
    lora = spec.train == "lora"
    saved, block = (acts.lora_student, acts.lora_block) if lora else (acts.student, acts.student_block)
    moments = {"frozen fwd": float(acts.teacher_cfg if spec.frozen_batch_factor == 2 else acts.teacher)}
    if disc is None:
        moments["student bwd"] = float(saved + block) + student.backward_transient
        moments["student opt step"] = student.step_transient
    else:  # Adversarial.micro_step: the G step (D frozen), then the D step on a freed student graph
        form = spec.disc
        moments["G bwd"] = (float(saved + acts.disc_g_step[form] + max(acts.disc_block[form], block))
                            + student.backward_transient)
        moments["student opt step"] = student.step_transient
        moments["D bwd"] = float(acts.disc_step[form] + acts.disc_block[form]) + disc.backward_transient
        moments["D opt step"] = disc.step_transient
    return moments


def phase_memory(spec: PhaseSpec, counts: ParamCounts, acts: Activations, world: int, offload: bool,
                 zero: ZeroSettings) -> PhaseMemory:
    lora = spec.train == "lora"
    accumulates = spec.accumulates(acts.batch, world)
    student = zero2_engine(counts.student + (counts.lora if lora else 0), counts.lora if lora else counts.student,
                           world, zero, offload, accumulates)
    disc = (zero2_engine(counts.disc[spec.disc], counts.disc[spec.disc], world, zero, offload, accumulates)
            if spec.disc else None)
    return PhaseMemory(spec, world, offload, acts.batch, student, BF16 * counts.student, disc,
                       activation_moments(spec, acts, student, disc))


def largest_fitting_batch(specs: list[PhaseSpec], counts: ParamCounts, act_at: Callable[[int], Activations],
                          offload: bool, zero: ZeroSettings, budget: float) -> int:
    """The largest micro-batch at which every phase in `specs` fits `budget` on one GPU (0: not even 1).
    Memory grows with the micro-batch, so: double until it no longer fits, then bisect."""
    def fits(batch: int) -> bool:
        acts = act_at(batch)
        return all(phase_memory(s, counts, acts, 1, offload, zero).total <= budget for s in specs)

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


# ---------------------------------------------------------------------------------------------------
# The recipe's batch arithmetic


def global_batch_rows(cfg: Config) -> list[dict]:
    """micro_batch x accumulation x world for every stage at 8 and 64 GPUs, against the paper's 512."""
    rows = []
    for i, stage in enumerate(cfg.stages):
        for world in CHECKED_WORLD_SIZES:
            try:
                accum = stage.accumulation(world, f"stages[{i}]")
            except ValueError as err:  # ConfigError: global_batch not divisible at this world size
                rows.append({"stage": stage.name, "world_size": world, "micro_batch": stage.micro_batch,
                             "accumulation": None, "global_batch": None, "ok": False, "error": str(err)})
                continue
            total = stage.micro_batch * accum * world
            rows.append({"stage": stage.name, "world_size": world, "micro_batch": stage.micro_batch,
                         "accumulation": accum, "global_batch": total, "ok": total == PAPER_GLOBAL_BATCH})
    return rows


# ---------------------------------------------------------------------------------------------------
# The report


@dataclass
class Report:
    preset: Preset
    cfg: Config
    zero: ZeroSettings
    specs: dict  # key -> PhaseSpec
    counts: ParamCounts
    acts: Activations  # measured at the table's micro-batch
    student_ckpt: bool
    disc_ckpt: bool
    budget: float  # bytes a phase may use on one card
    rows: list  # PhaseMemory per shown phase x world size x offload
    x0: list  # the x0 conversion phase on one GPU, without and with offload
    largest: dict  # "lora" / "lora_offload" / "full" / "full_offload" -> micro-batch (None: no such phase)
    batch_rows: list
    comparison: list
    head: tuple = (0, 0)  # D head's (channels, stride-2 blocks)
    seconds: float = 0.0

    @property
    def batch_ok(self) -> bool:
        return all(r["ok"] for r in self.batch_rows)

    @property
    def targets(self) -> dict:
        best = lambda mode: max(self.largest.get(mode) or 0, self.largest.get(f"{mode}_offload") or 0)
        return {"lora_micro_batch_4": best("lora") >= 4, "full_micro_batch_1": best("full") >= 1}


SHOWN_PHASES = ("stage1_mse", "adv_lora", "adv_full")


def compare_spec(row: dict, specs: dict) -> PhaseSpec:
    """The phase a measured row ran: its `phase` if it names one, else what bench/step.py's `objective`
    says ("mse": the first stage's step, CFG from the row's cfg_scale; "adv", or none: the adversarial step
    with the conditional D), trained in the row's mode, one micro-batch per optimizer step."""
    if row.get("phase"):
        return specs[row["phase"]]
    mode = row["mode"]
    if row.get("objective") == "mse":
        factor = 2 if float(row.get("cfg_scale", 1.0)) != 1.0 else 1
        spec = dataclasses.replace(specs["stage1_mse"], train=mode, frozen_batch_factor=factor)
    else:
        spec = dataclasses.replace(specs[f"adv_{mode}"], disc="cond")
    return dataclasses.replace(spec, global_batch=0, grad_accum=1)


def compare_rows(path: Path, preset: Preset, specs: dict, counts: ParamCounts,
                 act_at: Callable[[int], Activations], zero: ZeroSettings) -> list[dict]:
    """Measured peaks (bench/step.py's JSON on a GPU: torch.cuda.max_memory_allocated) next to the model.
    Rows of other presets and rows without a peak (meta-device FLOP rows) are skipped."""
    out = []
    for row in json.loads(Path(path).read_text()):
        if row.get("preset") != preset.name or "peak_gib" not in row:
            continue
        spec, world = compare_spec(row, specs), int(row.get("world_size", 1))
        model = phase_memory(spec, counts, act_at(int(row["micro_batch"])), world, bool(row["offload"]), zero)
        modelled = model.total / GIB
        out.append({**row, "phase": spec.key, "world_size": world, "modelled_gib": modelled,
                    "ratio": float(row["peak_gib"]) / modelled})
    return out


def disc_head(cfg: Config, preset: Preset, head_channels: Optional[int] = None) -> tuple[Optional[int], Optional[int]]:
    """D's (head_blocks, head_channels): the first adversarial stage's disc settings, which are sized for
    SDXL's 32x32, 1280-wide mid block (the toy gets the adaptive head at its own width; None = the
    trainer's defaults); `head_channels` (--head-channels) overrides the width for any preset."""
    adversarial = [s for s in cfg.stages if s.objective != "mse"]
    disc = adversarial[0].disc if adversarial and preset.name == "sdxl" else None
    return (disc.head_blocks if disc else None), head_channels or (disc.head_channels if disc else None)


def build_report(args: argparse.Namespace) -> Report:
    started = time.perf_counter()
    preset = PRESETS[args.preset]
    cfg = load_config(_from_root(args.config), check_paths=False)  # the recipe's model.base is a placeholder
    zero = ZeroSettings.from_ds_json(_from_root(cfg.deepspeed))
    specs = recipe_phases(cfg)
    adversarial = [s for s in cfg.stages if s.objective != "mse"]
    head_blocks, head_channels = disc_head(cfg, preset, args.head_channels)
    student_ckpt = cfg.model.gradient_checkpointing
    disc_ckpt = adversarial[0].disc.gradient_checkpointing if adversarial else True

    models = MetaModels.build(preset, head_blocks, head_channels)
    counts = models.counts()
    batch = args.micro_batch or max(s.micro_batch for s in specs.values())
    # D in the forms the recipe's phases use, and the conditional one bench/step.py measures.
    forms = sorted({s.disc for s in specs.values() if s.disc} | ({"cond"} if args.compare else set()))
    acts = measure_activations(models, preset, batch, student_ckpt, disc_ckpt, forms)
    act_at = lambda b: acts if b == acts.batch else acts.scaled(b)
    budget = (args.card_gib - args.reserve_gib) * GIB
    micro = lambda spec: args.micro_batch or spec.micro_batch

    rows = [phase_memory(specs[k], counts, act_at(micro(specs[k])), world, offload, zero)
            for k in SHOWN_PHASES if k in specs for world in TABLE_WORLD_SIZES for offload in (False, True)]
    x0 = [phase_memory(specs["x0"], counts, act_at(micro(specs["x0"])), 1, offload, zero)
          for offload in (False, True)] if "x0" in specs else []
    largest = {}
    for mode in ("lora", "full"):
        mode_specs = [s for k, s in specs.items() if s.train == mode and k != "x0"]
        for offload in (False, True):
            largest[mode + ("_offload" if offload else "")] = (
                largest_fitting_batch(mode_specs, counts, act_at, offload, zero, budget) if mode_specs else None)
    comparison = compare_rows(args.compare, preset, specs, counts, act_at, zero) if args.compare else []
    return Report(preset, cfg, zero, specs, counts, acts, student_ckpt, disc_ckpt, budget, rows, x0, largest,
                  global_batch_rows(cfg), comparison, models.head_shape(), time.perf_counter() - started)


def _from_root(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() or path.exists() else ROOT / path


# ---------------------------------------------------------------------------------------------------
# Output


@dataclass(frozen=True)
class Unit:
    name: str
    nbytes: int

    def __call__(self, value: float) -> str:
        return f"{value / self.nbytes:.1f}"


def unit_for(counts: ParamCounts) -> Unit:
    """GiB for SDXL; MiB for the toy, whose terms would all print as 0.0 GiB."""
    return Unit("GiB", GIB) if counts.student > 10 ** 8 else Unit("MiB", 2 ** 20)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def params_table(r: Report) -> str:
    c, billions = r.counts, lambda n: f"{n:,} ({n / 1e9:.4g} B)"
    rows = [["student UNet, full mode (= teacher)", billions(c.student), billions(c.student)],
            [f"student UNet + LoRA rank {r.preset.lora_rank}, LoRA mode", billions(c.student + c.lora),
             f"{billions(c.lora)}, counted by applying add_lora on meta"]]
    channels, blocks = r.head
    for form, n in sorted(c.disc.items()):
        name = "conditional" if form == "cond" else "unconditional"
        rows += [[f"D {name} (encoder + mid copy + head)", billions(n), billions(n)],
                 [f"  of which the head ({channels} channels, {blocks} stride-2 block{'s' if blocks != 1 else ''})",
                  billions(c.disc_head[form]), ""]]
    return markdown_table(["model", "parameters", "trainable"], rows)


def activations_table(r: Report, u: Unit) -> str:
    a, ckpt = r.acts, lambda on: "on" if on else "off"
    rows = [[f"student full: saved for backward, checkpointing {ckpt(r.student_ckpt)}", u(a.student)],
            ["student full: saved for backward, no checkpointing", u(a.student_no_ckpt)],
            ["student full: largest checkpointed block (recomputed in backward)", u(a.student_block)],
            [f"student LoRA: saved for backward, checkpointing {ckpt(r.student_ckpt)}", u(a.lora_student)]]
    for form in a.disc_step:
        rows += [[f"D {form}: D step, real + fake in one call, checkpointing {ckpt(r.disc_ckpt)}", u(a.disc_step[form])],
                 [f"D {form}: G step, fake forward with D frozen", u(a.disc_g_step[form])],
                 [f"D {form}: largest checkpointed block", u(a.disc_block[form])]]
    rows += [[f"teacher no_grad forward: live peak at batch {a.batch}", u(a.teacher)],
             [f"teacher no_grad forward: live peak at batch {2 * a.batch} (CFG)", u(a.teacher_cfg)],
             [f"  cross-check: 4 x largest single intermediate at batch {2 * a.batch}",
              u(4 * a.teacher_largest_tensor)]]
    return markdown_table(["term", u.name], rows)


def memory_table(r: Report, u: Unit) -> str:
    header = ["phase", "stage", "mode", "GPUs", "offload", "micro", "student", "teacher", "D",
              "activations (peak moment)", "GPU total", "CPU/rank", "fits 80 GB"]
    rows = [[m.spec.title, m.spec.stage, m.spec.train + (f", D {m.spec.disc}" if m.spec.disc else ""), m.world,
             "cpu" if m.offload else "-", m.micro_batch, u(m.student.gpu_static), u(m.teacher),
             u(m.disc.gpu_static) if m.disc else "-", f"{u(m.moments[m.peak_moment])} ({m.peak_moment})",
             f"**{u(m.total)}**", u(m.cpu), "yes" if m.total <= r.budget else "NO"] for m in r.rows]
    return markdown_table(header, rows)


def notes(r: Report, u: Unit) -> list[str]:
    z = r.zero
    if z.fp32_partition:
        grads = "fp32 gradient partition (4 B/param /N, on the GPU also with offload: the accumulator)"
        step = "nothing new (Adam reads the fp32 partition in place)"
        accum = ""
    else:
        grads = (f"{z.grad_accum_dtype} gradient partition ({DTYPE_BYTES[z.grad_accum_dtype]} B/param /N; "
                 "none on the GPU with offload)")
        step = f"flat {z.grad_accum_dtype} copy + its fp32 cast of the partition"
        accum = f", + a {z.model_dtype} gradient accumulator when a step accumulates micro-batches"
    comm = (f"a flat {z.model_dtype} copy + an {z.comm_dtype} copy to reduce" if z.comm_dtype != z.model_dtype
            else f"a flat {z.model_dtype} copy")
    out = [
        ("A MODEL of one rank's memory, not a measurement: static terms from parameter counts, activations "
         "measured on the meta device (bench/memory.py's docstring explains every term)."),
        (f"student / D (static): {z.model_dtype} weights (full replica) + {grads} + fp32 master and Adam m, v "
         "(12 B/param /N; in CPU memory with offload). teacher: frozen bf16 copy."),
        (f"activations: the largest moment of a step. frozen fwd = teacher jump under no_grad (live peak; doubled "
         f"batch with CFG); student bwd = saved + one block's recompute; G bwd = student saved + D (frozen) on "
         f"the fake + one block; D bwd = D on real and fake in one call + one block (the G step has freed the "
         f"student's graph); every bwd adds its engine's reduce buckets ({z.model_dtype}) and one bucket's "
         f"reduction copies ({comm}); opt step = {step}."),
        (f"CPU/rank: with offload, both engines' fp32 master + Adam m, v + pinned fp32 gradient + pinned "
         f"{z.model_dtype} copy (18 B/param /N){accum}. The offload rows use the same JSON's dtypes and buckets."),
        (f"fits 80 GB: total <= {r.budget / GIB:.1f} GiB ({CARD_GIB} GiB an 80 GB card reports, minus a reserve "
         "for the CUDA context, NCCL buffers and fragmentation, which the model leaves out)."),
        ("adversarial rows use the conditional D (its D step runs the backbone on x_t and both candidates, 3 x "
         "the micro-batch, against 2 x for the unconditional D); the unconditional "
         "D of the lora+full stages' final full phase is smaller."),
    ]
    if r.x0:
        out.append(f"{r.specs['x0'].stage}'s x0 conversion phase (student full + frozen copy of it, no D) is a "
                   f"separate phase: {u(r.x0[0].total)} {u.name} on 1 GPU, {u(r.x0[1].total)} with offload.")
    return out


def print_report(r: Report) -> None:
    u = unit_for(r.counts)
    print(f"# Memory model: {r.preset.name}, {r.cfg.source}, {r.cfg.deepspeed} ({r.zero.describe()}); "
          f"D head {r.head[0]} channels; {u.name}\n")
    print(f"## Parameters\n\n{params_table(r)}\n")
    print(f"## Activations, measured on meta at micro-batch {r.acts.batch} (bf16)\n\n{activations_table(r, u)}\n")
    print(f"## Per-GPU memory by phase ({u.name})\n\n{memory_table(r, u)}\n")
    print("Notes:\n" + "\n".join(f"- {n}" for n in notes(r, u)) + "\n")
    print("## Largest micro-batch on one 80 GB GPU (activations scaled with the micro-batch)\n")
    shown = lambda key: {None: "-", 0: "0 (not even 1)"}.get(r.largest.get(key), r.largest.get(key))
    print(markdown_table(["mode", "no offload", "optimizer offload"], [
        ["LoRA (adversarial LoRA phases)", shown("lora"), shown("lora_offload")],
        ["full (stage 1 and adversarial full)", shown("full"), shown("full_offload")]]))
    met = lambda ok: "met" if ok else "NOT met"
    print(f"\nTargets: LoRA stage at micro-batch >= 4: {met(r.targets['lora_micro_batch_4'])}; full stage at "
          f"micro-batch >= 1, offload allowed: {met(r.targets['full_micro_batch_1'])}.\n")
    print(f"## Global batch: micro_batch x accumulation x GPUs = {PAPER_GLOBAL_BATCH} ({r.cfg.source})\n")
    print(markdown_table(["stage", "GPUs", "micro", "accum", "global", "ok"], [
        [b["stage"], b["world_size"], b["micro_batch"], b["accumulation"] or "-", b["global_batch"] or b.get("error"),
         "yes" if b["ok"] else "NO"] for b in r.batch_rows]))
    print()
    if r.comparison:
        print("## Measured vs modelled (GiB)\n")
        print(markdown_table(["phase", "mode", "GPUs", "offload", "micro", "measured", "modelled", "measured/model"], [
            [c["phase"], c["mode"], c["world_size"], c["offload"], c["micro_batch"], f"{c['peak_gib']:.1f}",
             f"{c['modelled_gib']:.1f}", f"{c['ratio']:.2f}"] for c in r.comparison]))
        print()
    if torch.cuda.is_available():
        print("A GPU is available: bench/step.py measures the real peak; pass its JSON here with --compare.\n")
    print(f"({r.seconds:.1f} s)")


def report_json(r: Report) -> dict:
    return {
        "preset": r.preset.name, "config": r.cfg.source, "deepspeed": r.cfg.deepspeed,
        "zero": dataclasses.asdict(r.zero), "budget_gib": r.budget / GIB,
        "params": {"student": r.counts.student, "lora_trainable": r.counts.lora,
                   "student_with_lora": r.counts.student + r.counts.lora, "disc": r.counts.disc,
                   "disc_head": r.counts.disc_head},
        "disc_head": {"channels": r.head[0], "blocks": r.head[1]},
        "activations_bytes": dataclasses.asdict(r.acts),
        "rows": [m.as_dict() for m in r.rows], "x0_phase_1gpu": [m.as_dict() for m in r.x0],
        "largest_micro_batch_1gpu": r.largest, "targets": r.targets,
        "global_batch": r.batch_rows, "global_batch_ok": r.batch_ok, "compare": r.comparison,
        "notes": notes(r, Unit("GiB", GIB)), "seconds": r.seconds,
    }


# ---------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  python bench/memory.py --preset sdxl "
                                            "--json bench/results/memory.json")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sdxl")
    parser.add_argument("--config", default="configs/sdxl.yaml", help="the recipe: stages, micro-batch, DeepSpeed JSON")
    parser.add_argument("--micro-batch", type=int, default=None, help="instead of every stage's micro_batch")
    parser.add_argument("--head-channels", type=int, default=None,
                        help="D head width instead of the recipe's disc.head_channels (null: the mid block's, "
                             "1280 for SDXL); 2560 = the old conditional head")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--compare", type=Path, default=None,
                        help="JSON list of measured peaks: preset, mode, micro_batch, world_size, offload, peak_gib")
    parser.add_argument("--card-gib", type=float, default=CARD_GIB, help="GPU memory (an 80 GB card: 79.6 GiB)")
    parser.add_argument("--reserve-gib", type=float, default=RESERVE_GIB,
                        help="left for the CUDA context, NCCL buffers and fragmentation")
    args = parser.parse_args(argv)
    if args.micro_batch is not None and args.micro_batch < 1:
        parser.error("--micro-batch must be >= 1")
    if args.head_channels is not None and args.head_channels < 1:
        parser.error("--head-channels must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32": none in this UNet
    report = build_report(args)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report_json(report), indent=1))
    if not report.batch_ok:
        print(f"global batch check FAILED: not {PAPER_GLOBAL_BATCH} everywhere", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
