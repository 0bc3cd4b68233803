"""Input checks, the machine launches are planned for, and the one launch-size rule.

Every public op validates its arguments here before anything is launched, so a
bad call fails with a message that names the argument instead of a Triton
compile error or a wrong answer.

Launch plans are explicit. A `Target` is the machine a plan is for: resolved once per
device (`target_of`: a CUDA device's SMs, shared memory, memory and the occupancy of the
binaries its JIT builds; Triton's interpreter), or named (`ARCHITECTURES`: the static
report's sm_90 and sm_80, whose occupancy it reads from the compiled cubin and whose
launches it records). Each op plans a launch with a pure function of its operands and
a Target, into a frozen `Plan` (kernel, grid, warps, constexprs), and launches the plan
through the target with keyword arguments. The ops are torch.library custom ops whose
bodies take the target first (`op_on_target`): called as ops, they run on their
tensors' device; the static report calls the same bodies with its own target.
"""
import dataclasses
import functools
import inspect
import math
import os
from typing import Callable, Optional

import torch
import triton

from . import _compat

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the op
# modules are imported: read it at the same moment so the check agrees.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRETER:
    _compat.interpreter_loop_bounds_fix()
    _compat.interpreter_bf16_rounding_fix()
_compat.inductor_fallback_message_fix()

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The row kernels hold one whole row in registers.
MAX_HIDDEN = 65536


def check_float(name, t, dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")


def check_same_dtype(**tensors):
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name}: expected the dtype of {first_name} ({first.dtype}); got {t.dtype}"
            )


def check_device(**tensors):
    """All tensors on one device. (Whether Triton can run there is the op's target's
    question: `op_on_target`.)"""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected a tensor on {first.device} (the device of {first_name}); "
                f"got one on {t.device}"
            )


def check_hidden(name, n):
    if n > MAX_HIDDEN:
        raise ValueError(f"{name}: last dimension at most {MAX_HIDDEN} is supported; got {n}")


def unit_last_stride(x):
    """x itself when its last dim is contiguous (kernels take the other strides as arguments), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def as_rows(x):
    """View x as [rows, last dim] with unit stride along the last dim (copying only if needed)."""
    return unit_last_stride(x.reshape(-1, x.shape[-1]))


# ---------------------------------------------------------------- targets and plans

@dataclasses.dataclass(frozen=True)
class Plan:
    """One launch as planned: the kernel, its grid, its warps and its constexprs (rows per
    program among them). Launched with keyword arguments only: the plan's and the operands'."""
    kernel: object
    grid: tuple
    num_warps: int
    constexprs: tuple = ()  # (name, value) pairs

    def kwargs(self, operands):
        return {**operands, **dict(self.constexprs), "num_warps": self.num_warps}


def run_plan(plan, operands):
    plan.kernel[plan.grid](**plan.kwargs(operands))


@dataclasses.dataclass(frozen=True)
class Target:
    """The machine launches are planned for."""
    name: str
    sms: int  # streaming multiprocessors (the interpreter's 4: a few programs, so multi-program paths run)
    smem_per_sm: int  # bytes of shared memory an SM holds
    memory: int  # bytes of device memory (the linear loss may store an eighth)
    float32_products: bool  # half GEMMs write float32 outputs (cuBLAS's out_dtype; CPU has none)
    registers_per_sm: int = 65536  # sm_80 and sm_90 alike
    # (plan, operands) -> blocks of plan's binary resident per SM; None: no occupancy (the
    # interpreter), where the largest program is taken.
    occupancy: Optional[Callable] = None
    # (plan, operands): runs the plan (run_plan) or records it; None: Triton cannot run here.
    launch: Optional[Callable] = None


# The static report's architectures: what a plan for them reads (occupancy and launch are
# the report's own). Memory: 80 GB parts.
ARCHITECTURES = {
    90: Target(name="sm_90 (H100)", sms=132, smem_per_sm=228 * 1024, memory=80 << 30, float32_products=True),
    80: Target(name="sm_80 (A100)", sms=108, smem_per_sm=164 * 1024, memory=80 << 30, float32_products=True),
}
# Triton's interpreter: 4 SMs and no occupancy (a few programs, so the multi-row loops and
# the partials run); 2 GiB, so the linear loss's budget (256 MiB) sends large cases through chunks.
INTERPRETER_TARGET = Target(name="Triton's interpreter", sms=4, smem_per_sm=228 * 1024, memory=2 << 30,
                            float32_products=False, launch=run_plan)
CPU_TARGET = dataclasses.replace(INTERPRETER_TARGET, name="CPU (no Triton)", launch=None)


def target_of(device):
    """The Target of a device: a CUDA device's own (resolved once), Triton's interpreter
    when it is on, else CPU_TARGET, where the ops' torch work runs and no kernel does."""
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_TARGET if INTERPRETER else CPU_TARGET


@functools.lru_cache(maxsize=None)
def _cuda_target(index):
    props = torch.cuda.get_device_properties(index)
    return Target(name=f"cuda:{index} ({props.name})", sms=props.multi_processor_count,
                  smem_per_sm=props.shared_memory_per_multiprocessor, memory=props.total_memory,
                  float32_products=True, occupancy=functools.partial(_cuda_occupancy, index), launch=run_plan)


_resident = {}


def _cuda_occupancy(index, plan, operands):
    """Blocks resident per SM of the binary the JIT builds for this launch on device
    `index`, from its registers and shared memory; cached under the launch's binary_key."""
    kwargs = plan.kwargs(operands)
    key = binary_key(plan.kernel, (), kwargs), index
    if key not in _resident:
        compiled = plan.kernel.warmup(grid=(1,), **kwargs)
        compiled._init_handles()  # loads the binary: n_regs is known from here
        _resident[key] = blocks_per_sm(compiled.n_regs, compiled.metadata.shared, plan.num_warps, _cuda_target(index))
    return _resident[key]


def blocks_per_sm(registers, shared_bytes, num_warps, target):
    """Resident blocks per SM (sm_80/sm_90 limits: 64 warps, 32 blocks; registers allocated
    per warp in units of 256 and warps in 4s; 1 KiB of shared memory reserved per block)."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = ((target.registers_per_sm // regs_per_warp) // 4 * 4) // num_warps
    by_smem = target.smem_per_sm // (shared_bytes + 1024) if shared_bytes else 32
    return max(0, min(32, 64 // num_warps, by_regs, by_smem))


def resident_programs(target, plan, operands):
    """How many programs of plan fit on the target at once (one full wave). A reduction
    launched with this many programs writes as few partials as keep every SM busy, and
    has no last wave. Without occupancy (the interpreter): 4, so the multi-row loop and
    the partials run."""
    if target.occupancy is None:
        return 4
    return max(1, target.occupancy(plan, operands)) * target.sms


def op_on_target(name, mutates_args=(), kernels=True):
    """Registers body(target, *args) as the torch.library custom op `name`, whose schema is
    body's without the target. Called as an op, body runs on the target of its first
    tensor's device; an op that launches kernels (`kernels`) refuses a device Triton
    cannot run on, naming that argument. `op.on_target` is body itself, for a caller that
    chooses the target (the static report, for an architecture it has no device of)."""
    def register(body):
        signature = inspect.signature(body)
        params = list(signature.parameters.values())[1:]
        first = next(i for i, p in enumerate(params) if p.annotation is torch.Tensor)

        def op(*args, **kwargs):
            tensor = args[first] if first < len(args) else kwargs[params[first].name]
            target = target_of(tensor.device)
            if kernels and target.launch is None:
                raise RuntimeError(
                    f"{params[first].name}: tinyfuse's Triton kernels need CUDA tensors; got a {tensor.device.type.upper()} "
                    "tensor. Use tinyfuse.kernels.reference for plain-PyTorch versions of the same ops, or set "
                    "TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's interpreter.")
            return body(target, *args, **kwargs)

        op.__name__, op.__qualname__, op.__doc__, op.__module__ = (body.__name__, body.__qualname__, body.__doc__,
                                                                   body.__module__)
        op.__signature__ = signature.replace(parameters=params)
        custom = torch.library.custom_op(name, op, mutates_args=mutates_args)
        custom.on_target = body
        return custom
    return register


# ---------------------------------------------------------------- the launch-size rule

# One rule for every row kernel (rms_norm, rope, swiglu, the losses' rows). A program
# holds ROWS rows of row_elements values each; ROWS is the largest power of two up to
# target_elements a program whose grid leaves at most MAX_IDLE of the last wave's slots
# idle, judged from the occupancy of the binary each choice compiles to. Without
# occupancy (the interpreter) the largest is taken.
MAX_IDLE = 0.1
# Each thread holds at least one 16-byte vector of 16-bit values: 4 warps x 32 x 8.
MIN_PROGRAM_ELEMENTS = 1024


def warps_for(elements, per_thread=32, least=4, most=16):
    """Warps for a program holding `elements` values, about per_thread values a thread
    (8 or more keep 16-bit loads 16 bytes wide), between least and most."""
    return int(min(most, max(least, elements // (32 * per_thread))))


def idle_share(programs, per_wave):
    """Share of a grid's slots left idle: the last wave's empty ones (under one wave, the
    empty SM slots)."""
    waves = programs / per_wave
    return 1.0 - waves / math.ceil(waves)


def plan_rows(target, kernel, operands, constexprs, m, row_elements, *, columns=1, target_elements=4096,
              max_rows=64, per_thread=32, rows_arg="ROWS"):
    """The Plan of kernel over m rows (times `columns` blocks of columns: a second grid
    axis) whose programs hold rows_arg rows of row_elements values, with these
    constexprs; operands are the launch's own (their dtypes and alignment decide the
    binary whose occupancy is judged)."""
    fit = max(1, min(max_rows, target_elements // max(row_elements, 1)))
    rows = 1 << (fit.bit_length() - 1)  # a power of two: the kernels' tl.arange
    candidates = [rows]
    while rows > 1 and (rows // 2) * row_elements >= MIN_PROGRAM_ELEMENTS:
        rows //= 2
        candidates.append(rows)
    plans = (Plan(kernel, (triton.cdiv(m, r),) + ((columns,) if columns > 1 else ()),
                  warps_for(r * row_elements, per_thread), (*constexprs.items(), (rows_arg, r))) for r in candidates)
    if m * columns == 0 or target.occupancy is None:
        return next(plans)  # the largest; no other is built
    best = None
    for plan in plans:
        idle = idle_share(math.prod(plan.grid), resident_programs(target, plan, operands))
        if idle <= MAX_IDLE:
            return plan
        if best is None or idle < best[0]:
            best = idle, plan
    return best[1]


def _specialisation(value):
    """A runtime argument as Triton specialises it: an integer by being 1 (a constant), a
    multiple of 16 and beyond int32 (int64), as bits; a tensor by dtype and 16-byte alignment."""
    kind = type(value)
    if kind is int:
        return (value == 1) | ((value & 15) == 0) << 1 | (not -2 ** 31 <= value < 2 ** 31) << 2
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() & 15 == 0
    return float if kind is float else value


@functools.lru_cache(maxsize=None)
def _runtime_params(kernel):
    return frozenset(p.name for p in getattr(kernel, "params", ()) if not p.is_constexpr)


def binary_key(kernel, args, kwargs):
    """What decides the binary the JIT builds for a launch, derived from its arguments:
    the runtime ones as Triton specialises them, the constexprs and the launch options
    (warps) by value. Keywords keep their call's order (a call site that orders them
    otherwise only adds a cache entry). Host cost, measured on this CPU for rope's
    20-argument launch: 4.4 us, once per launch size chosen on CUDA (the hand-built
    tuples it replaces took 0.2 us; the interpreter and the static report never build one)."""
    runtime = _runtime_params(kernel)
    return (kernel, *map(_specialisation, args),
            *((name, _specialisation(value) if name in runtime or isinstance(value, torch.Tensor) else value)
              for name, value in kwargs.items()))
