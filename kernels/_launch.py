"""Input checks and launch heuristics shared by the ops.

Every public op validates its arguments here before anything is launched, so a
bad call fails with a message that names the argument instead of a Triton
compile error or a wrong answer.
"""
import functools
import math
import os

import torch
import triton

from . import _compat

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the op
# modules are imported: read it at the same moment so the check agrees.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Set by tinyfuse.bench.static while it records launches without running them: CPU
# tensors then stand in for device ones (only their shapes, strides and alignment count),
# and launch sizes are chosen for a GPU of RECORDING_SMS multiprocessors.
RECORDING = False
RECORDING_SMS = 132
RECORDING_MEMORY = 80 << 30  # an H100's

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
    """All tensors on one device, and one that Triton can run on."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected a tensor on {first.device} (the device of {first_name}); "
                f"got one on {t.device}"
            )
    if first.device.type == "cpu" and not (INTERPRETER or RECORDING):
        raise RuntimeError(
            f"{first_name}: tinyfuse's Triton kernels need CUDA tensors; got a CPU tensor. "
            "Use tinyfuse.kernels.reference for plain-PyTorch versions of the same ops, or set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's interpreter."
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


# Launch sizes: one rule for every row kernel (rms_norm, rope, swiglu, the losses' rows).
# A program holds ROWS rows of row_elements values each; ROWS is the largest power of two up
# to target_elements a program whose grid leaves at most MAX_IDLE of the last wave's slots
# idle, judged from the occupancy of the binary each choice compiles to (a CUDA device, or
# sm_90 in the static report). The interpreter takes the largest: it has no occupancy.
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


def rows_per_program(kernel, args, kwargs, device, m, row_elements, columns=1, target_elements=4096,
                     max_rows=64, per_thread=32, rows_arg="ROWS"):
    """(ROWS, num_warps) for a kernel over m rows (times columns blocks of columns) whose
    programs hold ROWS rows of row_elements values. args, kwargs: the launch's arguments
    but ROWS and the warps."""
    fit = max(1, min(max_rows, target_elements // max(row_elements, 1)))
    rows = 1 << (fit.bit_length() - 1)  # a power of two: the kernels' tl.arange
    candidates = [rows]
    while rows > 1 and (rows // 2) * row_elements >= MIN_PROGRAM_ELEMENTS:
        rows //= 2
        candidates.append(rows)
    choices = [(r, warps_for(r * row_elements, per_thread)) for r in candidates]
    if m * columns == 0 or not (device.type == "cuda" or RECORDING):
        return choices[0]
    best = None
    for r, warps in choices:
        per_wave = resident_programs(kernel, args, {**kwargs, rows_arg: r, "num_warps": warps}, device)
        idle = idle_share(triton.cdiv(m, r) * columns, per_wave)
        if idle <= MAX_IDLE:
            return r, warps
        if best is None or idle < best[0]:
            best = idle, r, warps
    return best[1:]


# Set by the static report while it records: blocks of a kernel resident per SM for these
# launch arguments, found by compiling it for the architecture being reported.
RECORDING_OCCUPANCY = None


def blocks_per_sm(registers, shared_bytes, num_warps, smem_per_sm):
    """Resident blocks per SM (sm_80/sm_90 limits: 64K registers, 64 warps, 32 blocks;
    registers allocated per warp in units of 256 and warps in 4s; 1 KiB of shared memory
    reserved per block)."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = ((65536 // regs_per_warp) // 4 * 4) // num_warps
    by_smem = smem_per_sm // (shared_bytes + 1024) if shared_bytes else 32
    return max(0, min(32, 64 // num_warps, by_regs, by_smem))


def multiprocessors(device):
    """SMs of the device the launch sizes are chosen for (4 in the interpreter: a few
    programs, so multi-program paths run)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return RECORDING_SMS if RECORDING else 4


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


_resident = {}


def resident_programs(kernel, args, kwargs, device):
    """How many programs of kernel fit on the device at once (one full wave), from the
    registers and shared memory of the binary the JIT builds for these arguments. A
    reduction launched with this many programs writes as few partials as keep every SM
    busy, and has no last wave. On CUDA the answer is cached under the device and the
    launch's binary_key."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = binary_key(kernel, args, kwargs), index
        if key not in _resident:
            compiled = kernel.warmup(*args, grid=(1,), **kwargs)
            compiled._init_handles()  # loads the binary: n_regs is known from here
            props = torch.cuda.get_device_properties(index)
            _resident[key] = blocks_per_sm(compiled.n_regs, compiled.metadata.shared, kwargs["num_warps"],
                                           props.shared_memory_per_multiprocessor)
        blocks = _resident[key]
    elif RECORDING:
        blocks = RECORDING_OCCUPANCY(kernel, args, kwargs)
    else:
        return 4  # the interpreter: a few programs, so the multi-row loop and the partials run
    return max(1, blocks) * multiprocessors(device)
