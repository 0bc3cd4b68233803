"""Every fused op against the float64 evaluation of its plain-PyTorch reference
(tinyfuse.kernels.reference), on fresh random inputs: the cases, the tolerances and the
checks that the tests and `tinyfuse check` both run, so the two cannot drift apart.

A case is an op variant (cross_entropy with reduction="sum", say), a dtype and a Shape.
Checking it runs the forward and a backward with random upstream gradients and holds
every output and every input's gradient to the dtype's bound on the relative-norm error
||out - ref|| / ||ref||; runs both again and asks for bit-identical results; and does all
of it with torch.empty handing out NaN-filled memory, so an element a kernel forgets to
write shows as NaN. Once per op (its first case), the same forward and backward under
torch.compile(fullgraph=True) must agree with eager.

Any function with an op's signature can stand in for tinyfuse's (`impl`, or `tinyfuse
check --against MODULE:FUNCTION`): the reference suite as a tool for other kernel authors.
"""
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import time
import warnings

import torch

from . import reference
from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy
from .rms_norm import add_rms_norm, rms_norm
from .rope import rope, rope_qkv, rope_tables
from .swiglu import geglu, swiglu

# Relative-norm error bounds against a float64 reference: a bound on the output rounding
# of each dtype (unit roundoff 2^-24, 2^-11, 2^-8) with headroom.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class CheckError(ValueError):
    """A request the check cannot run (an unknown op, a bad shape, an --against that does
    not load): one line for the user."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """The sizes of one model's step; each op takes its own from them: rows are batch x
    seq tokens; RMSNorm normalises `dim`, SwiGLU is `hidden` wide, RoPE rotates heads of
    `head_dim`, the losses have `vocab` classes (the linear one over hidden width `dim`)."""
    name: str
    batch: int
    seq: int
    dim: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def tokens(self):
        return self.batch * self.seq

    @classmethod
    def rows(cls, text):
        """`N,D` (as --shapes takes it): N rows of width D for every op. D is the normalised
        width, the SwiGLU width, the vocabulary of both losses (the linear one over hidden
        width D) and the model width RoPE splits into heads of 64 (one head of D when D is
        not a multiple of 64), half of them key/value heads when they pair up."""
        try:
            n, d = (int(part) for part in text.split(","))
        except ValueError:
            raise CheckError(f"--shapes: expected preset, small, sweep or N,D (two integers); got {text!r}") from None
        if n < 1 or d < 2:
            raise CheckError(f"--shapes {text}: N must be >= 1 and D >= 2")
        head_dim = 64 if d % 64 == 0 else d
        heads = d // head_dim
        return cls(f"{n}x{d}", 1, n, d, d, heads, heads // 2 if heads % 2 == 0 else heads, head_dim, d)

    @classmethod
    def of_model(cls, name, config, tokens):
        """A model configuration's sizes (tinyfuse.engine.model.ModelConfig) at `tokens` a step."""
        seq = min(config.max_seq_len, tokens)
        return cls(name, max(1, tokens // seq), seq, config.dim, config.hidden_dim, config.n_heads,
                   config.n_kv_heads, config.head_dim, config.vocab_size)


# The interpreter's shapes (a CPU's default, and the tests'): odd widths and row counts
# that leave masked lanes and a ragged last program; GQA groups of 2 and 1; head widths 8
# and 48; the vocabularies of stories260K and of a 4K BPE.
SMALL = (
    Shape("small-a", batch=2, seq=11, dim=172, hidden=172, heads=8, kv_heads=4, head_dim=8, vocab=512),
    Shape("small-b", batch=1, seq=37, dim=64, hidden=768, heads=6, kv_heads=6, head_dim=48, vocab=4096),
)
# SMALL and wider: the preset widths 288 and 768, a 4096-wide norm, a SwiGLU width that is
# not a multiple of the tile, head widths 64 and 128 (a GQA group of 4), Llama 2's and
# GPT-2's vocabularies.
SWEEP = SMALL + (
    Shape("sweep-c", batch=3, seq=7, dim=288, hidden=2048, heads=12, kv_heads=12, head_dim=64, vocab=32000),
    Shape("sweep-d", batch=2, seq=5, dim=768, hidden=5000, heads=4, kv_heads=1, head_dim=128, vocab=50257),
    Shape("sweep-e", batch=1, seq=9, dim=4096, hidden=64, heads=2, kv_heads=2, head_dim=64, vocab=512),
)


@dataclasses.dataclass(frozen=True)
class Op:
    """One op variant: what runs, what it is held to, and how its inputs are made."""
    name: str  # the op's name, as --ops takes it
    variant: str  # its options, as printed
    impl: object  # tinyfuse's implementation
    reference: object  # the specification, evaluated in float64
    make: object  # (shape, dtype, device, generator) -> (positional args, shape-dependent options)
    arg_names: tuple  # the positional arguments' names (gradients are reported as d<name>)
    out_names: tuple  # what impl returns
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def label(self):
        return f"{self.name}[{self.variant}]" if self.variant else self.name

    def describe(self, shape):
        """The op's own tensor shape at `shape`, as a case's line prints it."""
        return DESCRIBE[self.name](shape)

    def skips(self, shape):
        """Why this op has no case at `shape`, or None."""
        if self.name.startswith("rope") and shape.head_dim % 2:
            return f"RoPE rotates pairs: head width {shape.head_dim} is odd"
        return None


def _randn(shape, dtype, device, generator, scale=1.0, grad=True):
    t = (torch.randn(shape, device=device, generator=generator) * scale).to(dtype)
    return t.requires_grad_(grad)


def _targets(n, vocab, device, generator, ignore_index=-100):
    """Class indices with every 5th row ignored (the first one too)."""
    t = torch.randint(0, vocab, (n,), device=device, generator=generator)
    t[::5] = ignore_index
    return t


def _make_rms_norm(shape, dtype, device, gen):
    return [_randn((shape.tokens, shape.dim), dtype, device, gen, 3.0), _randn((shape.dim,), dtype, device, gen)], {}


def _make_add_rms_norm(shape, dtype, device, gen):
    x, r = (_randn((shape.batch, shape.seq, shape.dim), dtype, device, gen) for _ in range(2))
    return [x, r, _randn((shape.dim,), dtype, device, gen)], {}


def _make_rope(shape, dtype, device, gen):
    b, t, d = shape.batch, shape.seq, shape.head_dim
    cos, sin = rope_tables(t, d, device=device)
    return [_randn((b, t, shape.heads, d), dtype, device, gen), _randn((b, t, shape.kv_heads, d), dtype, device, gen),
            cos, sin], {}


def _make_rope_qkv(shape, dtype, device, gen):
    d = shape.head_dim
    cos, sin = rope_tables(shape.seq + 2, d, device=device)  # longer tables than the sequence: a slice is read
    qkv = _randn((shape.batch, shape.seq, (shape.heads + 2 * shape.kv_heads) * d), dtype, device, gen)
    return [qkv, cos, sin, shape.heads, shape.kv_heads], {}


def _make_swiglu(shape, dtype, device, gen):
    return [_randn((shape.batch, shape.seq, shape.hidden), dtype, device, gen, 3.0),
            _randn((shape.batch, shape.seq, shape.hidden), dtype, device, gen)], {}


def _make_swiglu_packed(shape, dtype, device, gen):
    return [_randn((shape.tokens, 2 * shape.hidden), dtype, device, gen, 3.0)], {}


def _make_cross_entropy(ignore_index):
    def make(shape, dtype, device, gen):  # std 4: a softmax far from uniform
        return [_randn((shape.tokens, shape.vocab), dtype, device, gen, 4.0),
                _targets(shape.tokens, shape.vocab, device, gen, ignore_index)], {}
    return make


# The linear loss's logits are drawn with std 2 (a trained small model's spread 2-4). The op
# rounds its logits to the input dtype, as the plain matmul does, so the gradients' error
# grows with that spread: at std 4 over 32K-50K classes bf16 reaches 1.0-1.2e-2 for tinyfuse
# and for the reference evaluated in bf16 alike (5 seeds of SWEEP, CPU), a property of the
# op's definition rather than of its kernels; at std 2, at most 3.6e-3 over SWEEP (fp16 4.3e-4).
LOGIT_STD = 2.0


def _make_linear_cross_entropy(chunked, bias=False):
    def make(shape, dtype, device, gen):
        hidden = _randn((shape.tokens, shape.dim), dtype, device, gen)
        weight = _randn((shape.vocab, shape.dim), dtype, device, gen, shape.dim ** -0.5 * LOGIT_STD)
        # chunked: the backward recomputes the logits, 3 chunks or more (the default size at a model's shapes)
        options = {"memory_budget": 0, "chunk_size": max(1, shape.tokens // 3) if shape.tokens < 256 else None} \
            if chunked else {}
        if bias:
            options["bias"] = _randn((shape.vocab,), dtype, device, gen)
        return [hidden, weight, _targets(shape.tokens, shape.vocab, device, gen)], options
    return make


DESCRIBE = {  # by op name; geglu takes swiglu's
    "rms_norm": lambda s: f"{s.tokens}x{s.dim}",
    "add_rms_norm": lambda s: f"{s.batch}x{s.seq}x{s.dim}",
    "rope": lambda s: f"{s.batch}x{s.seq}x{s.heads}/{s.kv_heads}x{s.head_dim}",
    "rope_qkv": lambda s: f"{s.batch}x{s.seq}x({s.heads}+2x{s.kv_heads})x{s.head_dim}",
    "swiglu": lambda s: f"{s.tokens}x{s.hidden}",
    "cross_entropy": lambda s: f"{s.tokens}x{s.vocab}",
    "linear_cross_entropy": lambda s: f"{s.tokens}x{s.dim}->{s.vocab}",
}
DESCRIBE["geglu"] = DESCRIBE["swiglu"]

_LOSS = dict(label_smoothing=0.1, z_loss=1e-4)
OPS = (
    # offset=1: Gemma's norm, which scales by 1 + weight
    *(Op("rms_norm", variant, rms_norm, reference.rms_norm, _make_rms_norm, ("x", "weight"), ("y",), options)
      for variant, options in (("", {}), ("offset=1", {"offset": 1.0}))),
    *(Op("add_rms_norm", variant, add_rms_norm, reference.add_rms_norm, _make_add_rms_norm,
         ("x", "residual", "weight"), ("y", "h"), options)
      for variant, options in (("", {}), ("offset=1", {"offset": 1.0}))),
    *(Op("rope", layout, rope, reference.rope, _make_rope, ("q", "k", "cos", "sin"), ("q", "k"),
         {"interleaved": layout == "interleaved"}) for layout in ("interleaved", "halves")),
    *(Op("rope_qkv", layout, rope_qkv, reference.rope_qkv, _make_rope_qkv,
         ("qkv", "cos", "sin", "n_heads", "n_kv_heads"), ("q", "k", "v"), {"interleaved": layout == "interleaved"})
      for layout in ("interleaved", "halves")),
    Op("swiglu", "gate,up", swiglu, reference.swiglu, _make_swiglu, ("gate", "up"), ("y",)),
    Op("swiglu", "packed", swiglu, reference.swiglu, _make_swiglu_packed, ("gate_up",), ("y",)),
    Op("geglu", "gate,up", geglu, reference.geglu, _make_swiglu, ("gate", "up"), ("y",)),
    Op("geglu", "packed", geglu, reference.geglu, _make_swiglu_packed, ("gate_up",), ("y",)),
    *(Op("cross_entropy", reduction, cross_entropy, reference.cross_entropy, _make_cross_entropy(-100),
         ("logits", "target"), ("loss",), {"reduction": reduction}) for reduction in ("mean", "sum", "none")),
    *(Op("cross_entropy", f"{reduction},smoothing,z_loss,ignore_index=7", cross_entropy, reference.cross_entropy,
         _make_cross_entropy(7), ("logits", "target"), ("loss",), {"reduction": reduction, "ignore_index": 7, **_LOSS})
      for reduction in ("mean", "sum", "none")),
    # Gemma 2's soft cap and Granite's logit scale (a cap of 5 bends logits of std 4 well into the tanh)
    *(Op("cross_entropy", f"{reduction},softcap=5,logit_scale=0.5", cross_entropy, reference.cross_entropy,
         _make_cross_entropy(-100), ("logits", "target"), ("loss",),
         {"reduction": reduction, "softcap": 5.0, "logit_scale": 0.5}) for reduction in ("mean", "none")),
    *(Op("linear_cross_entropy", f"{path},bias,softcap=5,logit_scale=0.5", linear_cross_entropy,
         reference.linear_cross_entropy, _make_linear_cross_entropy(path == "chunked", bias=True),
         ("hidden", "weight", "target"), ("loss",), {"softcap": 5.0, "logit_scale": 0.5})
      for path in ("stored", "chunked")),
    *(Op("linear_cross_entropy", f"{path},{reduction},smoothing,z_loss", linear_cross_entropy,
         reference.linear_cross_entropy, _make_linear_cross_entropy(path == "chunked"), ("hidden", "weight", "target"),
         ("loss",), {"reduction": reduction, **_LOSS})
      for path in ("stored", "chunked") for reduction in ("mean", "none")),
)
OP_NAMES = tuple(dict.fromkeys(op.name for op in OPS))
_LABEL_WIDTH = max(len(op.label) for op in OPS)


@dataclasses.dataclass(frozen=True)
class Case:
    op: Op
    dtype: torch.dtype
    shape: Shape
    compile: bool = False  # also run it under torch.compile(fullgraph=True)

    @property
    def id(self):
        """A stable name (the tests' parameter ids)."""
        return f"{self.op.label}-{DTYPE_NAMES[self.dtype]}-{self.shape.name}"


def cases(ops=None, dtypes=tuple(DTYPES.values()), shapes=SMALL):
    """Every op variant of `ops` (names; None: all) x dtype x shape that applies; the first
    case of each op also runs compiled (an inductor compile costs seconds on a GPU's host;
    the variants' compiled graphs are the tests' business)."""
    unknown = sorted(set(ops or ()) - set(OP_NAMES))
    if unknown:
        raise CheckError(f"--ops: unknown {', '.join(unknown)}; the ops are {', '.join(OP_NAMES)}")
    out, skipped, compiled = [], set(), set()
    for op in OPS:
        if ops and op.name not in ops:
            continue
        for dtype in dtypes:
            for shape in shapes:
                if op.skips(shape) is None:
                    out.append(Case(op, dtype, shape, compile=op.name not in compiled))
                    compiled.add(op.name)
                else:
                    skipped.add(op.skips(shape))
    if not out:
        raise CheckError("no case to run" + (f": {'; '.join(sorted(skipped))}" if skipped else ""))
    return out


@dataclasses.dataclass
class Result:
    case: Case
    errors: dict  # output or gradient name -> relative-norm error against float64
    failures: list  # what failed, one phrase each
    compile_error: float | None = None  # relative-norm distance of the compiled results from eager
    seconds: float = 0.0

    @property
    def ok(self):
        return not self.failures

    def line(self):
        """One line: the verdict, the case, and the worst error or what failed."""
        case = self.case
        tol = TOLERANCE[case.dtype]
        head = f"{'ok' if self.ok else 'FAIL':4} {case.op.label:{_LABEL_WIDTH}} {DTYPE_NAMES[case.dtype]:4} " \
               f"{case.op.describe(case.shape):22}"
        if not self.ok:
            return f"{head} {'; '.join(self.failures)}"
        name, worst = max(self.errors.items(), key=lambda item: item[1])
        tail = f" compiled {self.compile_error:.1e}" if self.compile_error is not None else ""
        return f"{head} worst {worst:.1e} ({name}) of {tol:.0e}, deterministic{tail}"

    def record(self):
        case = self.case
        return {"op": case.op.name, "variant": case.op.variant, "dtype": DTYPE_NAMES[case.dtype],
                "shape": case.shape.name, "sizes": case.op.describe(case.shape), "ok": self.ok,
                "tolerance": TOLERANCE[case.dtype], "failures": self.failures,
                "errors": {name: e if e == e else None for name, e in self.errors.items()},  # NaN: null
                "compiled_error": self.compile_error, "seconds": round(self.seconds, 3)}


def relative_error(out, ref):
    """||out - ref|| / ||ref|| in float64; NaN when out has a NaN or inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _float64(value):
    """A reference input: a float tensor in float64 (a new leaf when it needs a gradient)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double().requires_grad_(value.requires_grad)
    return value


def _tensor_inputs(op, args, options):
    """(name, tensor) of every tensor input, positional or keyword (a bias)."""
    named = list(zip(op.arg_names, args)) + list(options.items())
    return [(n, a) for n, a in named if isinstance(a, torch.Tensor)]


def _forward(fn, args, options):
    outs = fn(*args, **options)
    return outs if isinstance(outs, tuple) else (outs,)


def _backward(op, args, options, outs, upstream):
    """{name: tensor} of the outputs and of the gradients, for the upstream gradients
    `upstream` (drawn once per case), of every input that requires one (None where the
    function left it unused)."""
    if len(outs) != len(upstream):
        raise ValueError(f"returned {len(outs)} outputs, the reference {len(upstream)}")
    leaves = [(n, a) for n, a in _tensor_inputs(op, args, options) if a.requires_grad]
    grads = torch.autograd.grad(outs, [a for _, a in leaves], [g.to(o.dtype) for o, g in zip(outs, upstream)],
                                allow_unused=True)
    return {**dict(zip(op.out_names, (o.detach() for o in outs))), **{f"d{n}": g for (n, _), g in zip(leaves, grads)}}


def _upstream(outs, dtype, generator):
    """Random upstream gradients, one per output, exact in the case's dtype (kept in
    float64): normal, except a scalar's, drawn from [0.5, 1.5) as a loss's is (1 or one
    over the accumulation steps in training) — a normal draw near 0 would scale a half
    precision gradient into its subnormals."""
    out = []
    for o in outs:
        g = torch.randn(o.shape, device=o.device, generator=generator, dtype=torch.float64)
        if o.dim() == 0:
            g = torch.rand(o.shape, device=o.device, generator=generator, dtype=torch.float64) + 0.5
        out.append(g.to(dtype).double())
    return out


def check_case(case, device, generator, impl=None, compile_backend=None):
    """Check one case (see the module's docstring); impl stands in for tinyfuse's op."""
    start = time.perf_counter()
    op, fn, tol = case.op, impl or case.op.impl, TOLERANCE[case.dtype]
    try:
        args, shaped = op.make(case.shape, case.dtype, device, generator)
        options = {**op.options, **shaped}
        args64, options64 = [_float64(a) for a in args], {k: _float64(v) for k, v in options.items()}
        outs64 = _forward(op.reference, args64, options64)
        upstream = _upstream(outs64, case.dtype, generator)
        ref = _backward(op, args64, options64, outs64, upstream)
        got = _backward(op, args, options, _forward(fn, args, options), upstream)
        again = _backward(op, args, options, _forward(fn, args, options), upstream)
    except Exception as e:  # an implementation that cannot take this case fails it, in one line
        text = str(e).strip().splitlines()
        return Result(case, {}, [f"raised {type(e).__name__}" + (f": {text[0]}" if text else "")],
                      seconds=time.perf_counter() - start)
    expected_dtype = {**{n: case.dtype for n in op.out_names},
                      **{f"d{n}": a.dtype for n, a in _tensor_inputs(op, args, options)}}
    errors, failures = {}, []
    for name, ref_t in ref.items():
        out = got[name]
        if out is None:
            failures.append(f"{name}: no gradient")
        elif out.shape != ref_t.shape:
            failures.append(f"{name}: shape {tuple(out.shape)}, the reference's {tuple(ref_t.shape)}")
        else:
            if out.dtype != expected_dtype[name]:
                failures.append(f"{name}: dtype {out.dtype}, expected {expected_dtype[name]}")
            errors[name] = relative_error(out, ref_t)
            if errors[name] != errors[name]:
                failures.append(f"{name}: NaN or inf (an element left unwritten, as buffers are NaN-poisoned, "
                                "or an overflow)")
            elif errors[name] > tol:
                failures.append(f"{name} error {errors[name]:.1e} > {tol:.0e}")
    unequal = [n for n in got if got[n] is not None and not torch.equal(got[n], again[n])]
    if unequal:
        failures.append(f"not deterministic: a second run differs in {', '.join(unequal)}")
    result = Result(case, errors, failures)
    if case.compile and compile_backend and not failures:
        result.compile_error = _check_compiled(op, fn, args, options, upstream, got, compile_backend, tol, failures)
    result.seconds = time.perf_counter() - start
    return result


def _check_compiled(op, fn, args, options, upstream, eager, backend, tol, failures):
    """The same forward and backward under torch.compile(fullgraph=True): its largest
    relative-norm distance from eager, which must be within the dtype's tolerance (an
    opaque op, as tinyfuse's are to the compiler, gives 0; a function the compiler sees
    into may be fused and rounded differently)."""
    torch._dynamo.reset()  # a fresh compile per case: no cache limit sends a later case back to eager
    compiled = torch.compile(functools.partial(fn, **options), fullgraph=True, backend=backend, dynamic=False)
    try:
        got = _backward(op, args, options, _forward(compiled, args, {}), upstream)
    except Exception as e:
        failures.append(f"torch.compile(fullgraph=True) raised {type(e).__name__}: {str(e).splitlines()[0]}")
        return None
    worst = max(relative_error(got[n], eager[n]) if eager[n].abs().max() > 0 else
                float(not torch.equal(got[n], eager[n])) for n in eager if eager[n] is not None)
    if not worst <= tol:
        failures.append(f"compiled differs from eager: {worst:.1e} > {tol:.0e}")
    return worst


@contextlib.contextmanager
def poisoned():
    """torch.empty hands out NaN-filled memory (and algorithms are deterministic, which
    that fill needs) inside this context; restored after."""
    # cuBLAS refuses deterministic mode unless its workspace is fixed; it reads this when
    # its first handle is made.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    deterministic = torch.utils.deterministic
    previous = torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        deterministic.fill_uninitialized_memory = previous[1]


def compile_backend(device):
    """inductor on CUDA; on a CPU aot_eager, which traces as inductor does (dynamo, fake
    tensors, AOT autograd: what a torch.library registration must survive) without
    spending ~30 s compiling C++ per graph."""
    return "inductor" if torch.device(device).type == "cuda" else "aot_eager"


def run(case_list, device, seed, impl=None, progress=None):
    """Check every case (poisoned, compiled where the case says), calling progress(result)
    after each; the results."""
    generator = torch.Generator(device=device).manual_seed(seed)
    results = []
    with poisoned(), warnings.catch_warnings():
        # Triton's interpreter computes exp in NumPy, which warns where it overflows to inf
        # (a sigmoid of a large negative argument: 0, as intended)
        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
        for case in case_list:
            result = check_case(case, device, generator, impl, compile_backend(device))
            results.append(result)
            if progress:
                progress(result)
    return results


def takes_options(fn, op):
    """Whether fn accepts the keyword options of the op variant (an --against function may
    implement the plain op only: Gemma's offset, a soft cap, a bias are optional)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read: try every variant
        return True
    return any(p.kind == p.VAR_KEYWORD for p in params.values()) or all(name in params for name in op.options)


def load_function(spec):
    """MODULE:FUNCTION (a module importable from the current folder or PYTHONPATH, or a
    .py file) -> the function."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise CheckError(f"--against: expected MODULE:FUNCTION; got {spec!r}")
    try:
        if module_name.endswith(".py"):
            loader = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            if loader is None or not os.path.isfile(module_name):
                raise ImportError(f"no file {module_name}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise CheckError(f"--against {spec}: cannot import {module_name}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise CheckError(f"--against {spec}: {module_name} has no function {name}")
    return fn
