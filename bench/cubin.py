"""Compiling a recorded launch as the JIT would specialise it, for an architecture, and
reading the result (the static report's second job): registers, local memory and shared
memory from the cubin and the compiler, resident blocks per SM and waves, and the PTX's
global accesses by width, async copies, 64-bit divisions and special functions.
"""
import functools
import os
import re
import subprocess
import tempfile

from tinyfuse.kernels._launch import ARCHITECTURES, blocks_per_sm


@functools.lru_cache(maxsize=None)
def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_compiled = {}


def compile_launch(fn, args, kwargs, arch):
    """The kernel the JIT would build for these arguments, compiled for sm_<arch>:
    (resource usage, PTX)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {k: v for k, v in kwargs.items()}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = (fn.fn.__qualname__, arch, str(signature), str(constexprs), str(sorted(attrs.items())), str(options))
    if key not in _compiled:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                                   check=True).stdout
        found = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
        # What a launch asks for: the dynamic shared memory of the reductions' scratch and
        # the pipelined loops' buffers (cuobjdump shows only the static part), as on CUDA.
        found["SHARED"] = compiled.metadata.shared
        _compiled[key] = (found, compiled.asm["ptx"],
                          {k: v for k, v in constexprs.items()}, options.num_warps)
    return _compiled[key]


def ptx_counts(ptx):
    """Global accesses by width, async copies, 64-bit divisions and special functions."""
    counts = {}
    for kind, vec, width in re.findall(r"\b(ld|st)\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.[busf](\d+)\b", ptx):
        bits = int(width) * int(vec or 1)
        key = f"{kind}.{bits}"
        counts[key] = counts.get(key, 0) + 1
    # Global reads of pipelined loops: cp.async copies to shared memory, by size in bytes.
    for size in re.findall(r"\bcp\.async\.c[ag]\.shared\.global\s*\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-f]+|\d+)", ptx):
        key = f"cp.{int(size, 0) * 8}"
        counts[key] = counts.get(key, 0) + 1
    return {
        "global": counts,
        "cp_async": len(re.findall(r"\bcp\.async\.(?!bulk)", ptx)),
        "tma": len(re.findall(r"\bcp\.async\.bulk", ptx)),
        "div64": len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx)),
        "sfu": {f: len(re.findall(rf"\b{f}\.approx", ptx)) for f in ("ex2", "rsqrt", "lg2", "rcp")},
    }


def occupancy(usage, num_warps, arch):
    """Resident blocks per SM from registers, shared memory and warps."""
    return blocks_per_sm(usage.get("REG", 0), usage.get("SHARED", 0), num_warps, ARCHITECTURES[arch])


def launch_row(fn, grid, args, kwargs, arch):
    usage, ptx, constexprs, num_warps = compile_launch(fn, args, kwargs, arch)
    grid = tuple(grid) + (1,) * (3 - len(grid))
    programs = grid[0] * grid[1] * grid[2]
    blocks = occupancy(usage, num_warps, arch)
    per_wave = blocks * ARCHITECTURES[arch].sms
    waves = programs / per_wave if per_wave else float("inf")
    last = waves - int(waves) if waves != int(waves) else 1.0
    return {"kernel": fn.fn.__name__, "grid": list(grid), "num_warps": num_warps,
            "constexprs": {fn.arg_names[k[0]]: v for k, v in constexprs.items()}, "arch": arch,
            "registers": usage.get("REG"), "local_bytes": usage.get("LOCAL", 0) + usage.get("STACK", 0),
            "shared_bytes": usage.get("SHARED", 0), "blocks_per_sm": blocks, "waves": waves, "last_wave_busy": last,
            **ptx_counts(ptx)}


