"""The `tinyfuse` command line (also `python -m tinyfuse.engine`)."""
import argparse
import os
import sys


def _select_backend():
    """CUDA when present; otherwise Triton's interpreter, enabled before triton is imported."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"


def _median_cuda_ms(fn, repeats):
    import torch

    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def demo(args):
    """Run every fused kernel forward and backward on a stories15M-shaped batch and
    check it against the float64 reference."""
    device = _select_backend()
    import torch

    from tinyfuse.kernels import add_rms_norm, reference, rope, rope_tables, swiglu

    torch.manual_seed(args.seed)
    rows = args.tokens
    dim, hidden, heads, head_dim = 288, 768, 6, 48
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    mode = "CUDA" if device == "cuda" else "Triton interpreter on CPU (no CUDA device found)"
    print(f"tinyfuse kernel demo: {rows} tokens of stories15M shapes, {str(dtype).replace('torch.', '')}, {mode}")

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    cos, sin = rope_tables(rows, head_dim, device=device)
    cases = {
        "add_rms_norm": ((randn(rows, dim), randn(rows, dim), randn(dim)),
                         lambda x, r, w: add_rms_norm(x, r, w)[0], lambda x, r, w: reference.add_rms_norm(x, r, w)[0]),
        "rope": ((randn(1, rows, heads, head_dim), randn(1, rows, heads, head_dim)),
                 lambda q, k: torch.cat(rope(q, k, cos, sin), 2),
                 lambda q, k: torch.cat(reference.rope(q, k, cos, sin), 2)),
        "swiglu": ((randn(rows, hidden), randn(rows, hidden)), swiglu, reference.swiglu),
    }
    worst = 0.0
    print(f"{'op':<14}{'fwd err':>10}{'grad err':>10}{'fused ms':>10}{'torch ms':>10}")
    for name, (inputs, fused, ref) in cases.items():
        out = fused(*inputs)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, grad_out)
        inputs64 = [t.detach().double().requires_grad_() for t in inputs]
        out64 = ref(*inputs64)
        grads64 = torch.autograd.grad(out64, inputs64, grad_out.double())
        err = ((out.double() - out64).norm() / out64.norm()).item()
        gerr = max(((g.double() - g64).norm() / g64.norm()).item() for g, g64 in zip(grads, grads64))
        worst = max(worst, err, gerr)

        def step(fn):
            return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)

        if device == "cuda":
            timing = f"{_median_cuda_ms(step(fused), args.repeats):>10.3f}{_median_cuda_ms(step(ref), args.repeats):>10.3f}"
        else:
            timing = f"{'-':>10}{'-':>10}"  # interpreter times say nothing about the kernels
        print(f"{name:<14}{err:>10.2e}{gerr:>10.2e}{timing}")
    bound = 1e-2 if dtype == torch.bfloat16 else 1e-5
    if worst > bound:
        print(f"FAILED: largest relative error {worst:.2e} exceeds {bound:.0e}")
        return 1
    print(f"all kernels agree with the float64 reference (largest relative error {worst:.2e})")
    return 0


def prepare(args):
    """Corpus -> tokenizer -> shards, or --verify of a prepared folder."""
    from .data import DataError, prepare as run_prepare, verify

    if args.verify:
        problems = verify(args.verify)
        for p in problems:
            print(f"FAIL {p}", file=sys.stderr)
        if problems:
            return 1
        print(f"{args.verify}: manifest, tokenizer and every shard check out")
        return 0
    if not args.out:
        print("tinyfuse prepare: --out DIR is required (or --verify DIR)", file=sys.stderr)
        return 2
    try:
        manifest = run_prepare(
            source=args.source, out_dir=args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            val_fraction=args.val_fraction, workers=args.workers, seed=args.seed,
            stories=args.stories if args.stories > 0 else None, tinystories_format=args.tinystories_format,
            hub_url=args.hub_url, cache_dir=args.cache_dir, shard_tokens=args.shard_tokens,
        )
    except (DataError, FileNotFoundError) as e:
        print(f"tinyfuse prepare: {e}", file=sys.stderr)
        return 1
    for split in ("train", "val"):
        shards = [s for s in manifest["shards"] if s["split"] == split]
        tokens, stories = sum(s["tokens"] for s in shards), sum(s["stories"] for s in shards)
        print(f"{split}: {stories} stories, {tokens} tokens in {len(shards)} shard(s)")
    print(f"wrote {args.out} (vocab {manifest['vocab_size']}, {manifest['dtype']})")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="tinyfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the fused kernels against the reference and time them")
    p.add_argument("--tokens", type=int, default=256, help="rows in the demo batch (default 256)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per op on CUDA (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)

    from .data import DEFAULT_SHARD_TOKENS, HUB_URL

    p = sub.add_parser("prepare", help="tokenize a corpus into shards of raw tokens (or --verify a prepared folder)")
    p.add_argument("--source", default="synthetic",
                   help="synthetic (default, built in), tinystories (download), or a .txt/.json file or folder")
    p.add_argument("--out", help="folder for the shards, tokenizer and manifest.json")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", help="an existing SentencePiece .model to encode with")
    group.add_argument("--vocab-size", type=int, help="train a BPE tokenizer of this size (default 512)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="stories held out for val (default 0.01)")
    p.add_argument("--workers", type=int, default=None, help="threads for training and encoding (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus and the val choice")
    p.add_argument("--stories", type=int, default=100_000,
                   help="synthetic corpus size; a cap on other sources (0: no cap; default 100000)")
    p.add_argument("--tinystories-format", choices=["json", "v2"], default="json",
                   help="the original archive of JSON shards, or the GPT-4 V2 text files")
    p.add_argument("--hub-url", default=os.environ.get("TINYFUSE_HUB_URL", HUB_URL),
                   help="where the TinyStories files are (default: the Hugging Face hub; env TINYFUSE_HUB_URL)")
    p.add_argument("--cache-dir", help="where downloads are kept (default ~/.cache/tinyfuse)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard, at most")
    p.add_argument("--verify", metavar="DIR", help="check a prepared folder instead of preparing one")
    p.set_defaults(func=prepare)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
