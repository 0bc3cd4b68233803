"""The `tinyfuse` command line (also `python -m tinyfuse.engine`).

Exit codes, every command: 0 done; 1 the work ran and failed (a check found problems, the
loss diverged, a measurement failed; or a bug, with its traceback); 2 nothing was done:
bad flags, settings or input files, in one line; 128 + N stopped by signal N (training
writes a checkpoint first)."""
import argparse
import os
import signal
import sys
import time

from .runtime import default_device, select_backend


def prepare(args):
    """Corpus -> tokenizer -> shards, or --verify of a prepared folder."""
    from .data import prepare as run_prepare
    from .shards import DataError, verify

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
            hub_url=args.hub_url, cache_dir=args.cache_dir, shard_tokens=args.shard_tokens, force=args.force,
        )
    except (DataError, FileNotFoundError, OSError) as e:
        print(f"tinyfuse prepare: {e}", file=sys.stderr)
        return 2
    for split in ("train", "val"):
        shards = [s for s in manifest["shards"] if s["split"] == split]
        tokens, stories = sum(s["tokens"] for s in shards), sum(s["stories"] for s in shards)
        print(f"{split}: {stories} stories, {tokens} tokens in {len(shards)} shard(s)")
    print(f"wrote {args.out} (vocab {manifest['vocab_size']}, {manifest['dtype']})")
    return 0


def default_data_dir():
    from .data import default_cache_dir

    return os.path.join(default_cache_dir(), "synthetic-512")


def train(args):
    """The main job: train a model; with no arguments, stories260K on the built-in corpus."""
    select_backend()
    from .checkpoint import load_training_state
    from .run_spec import resolve_run
    from .shards import DataError
    from .train import Interrupted, Trainer

    try:
        # --resume: the newest intact checkpoint, read once for its settings and its state
        loaded = load_training_state(args.out) if args.resume and getattr(args, "out", None) else None
        cfg = train_config(args, loaded[0]["train_config"] if loaded else None)
        cfg.validate()
    except (ValueError, TypeError, OSError) as e:
        print(f"tinyfuse train: {e}", file=sys.stderr)
        return 2
    if cfg.data is None:
        why = _prepare_default_data(cfg)
        if why:
            print(f"tinyfuse train: {why}", file=sys.stderr)
            return 2
    if cfg.out is None:
        cfg.out = os.path.join("runs", f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        _check_out(cfg.out, args.resume)  # before anything is built or loaded
        trainer = Trainer(resolve_run(cfg))  # holds the run folder from here: a second run into it is refused
        if args.resume:
            trainer.resume(loaded)
    except (ValueError, FileNotFoundError, ImportError, DataError) as e:
        print(f"tinyfuse train: {e}", file=sys.stderr)
        return 2
    say = print if trainer.master else (lambda *a, **k: None)
    if args.resume and trainer.step >= cfg.max_steps:
        trainer.close()
        say(f"nothing to do: {cfg.out} is at step {trainer.step} of --max-steps {cfg.max_steps}; "
            "give a larger --max-steps to train on")
        return 0
    m, spec = trainer.model_cfg, trainer.spec
    say(f"training {cfg.preset if not cfg.init_from else cfg.init_from} ({trainer.model.num_params() / 1e6:.2f}M parameters: "
          f"dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads, {m.n_kv_heads} kv heads, vocab {m.vocab_size}) "
          f"on {spec.device} with kernels={spec.kernels}, {spec.tokens_per_step} tokens/step, "
          f"{cfg.max_steps} steps -> {cfg.out}")
    try:
        trainer.fit()
    except Interrupted as e:
        return 128 + signal.Signals[str(e)].value
    except (FloatingPointError, ValueError) as e:  # ValueError: a checkpoint that could not be written
        print(f"tinyfuse train: {e}", file=sys.stderr)
        return 1
    if trainer.master and cfg.sample_tokens > 0:
        from .sample import load_tokenizer_bytes, printable, story

        sp = load_tokenizer_bytes(trainer._tokenizer_bytes())
        say("\n--- a story from the trained model ---")
        say(printable(story(trainer.model, sp, max_new_tokens=cfg.sample_tokens, seed=cfg.seed)))
    say(f"\ncheckpoint and metrics in {cfg.out}")
    return 0


def train_config(args, saved=None):
    """TrainConfig from `saved` (a resumed run's own settings), then the TOML file, then the
    flags: later wins."""
    import dataclasses

    from .model import ModelConfig
    from .train import TrainConfig

    values = dict(saved or {})
    given = vars(args)
    if args.config:
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        with open(args.config, "rb") as f:
            values.update(tomllib.load(f))
    model = values.pop("model", {})
    if not isinstance(model, dict):
        raise ValueError(f"{args.config}: model settings must be a table ([model] with name = value lines); "
                         f"got {type(model).__name__} {model!r}")
    model = dict(model)
    for f in dataclasses.fields(ModelConfig):
        if f.name in given:
            model[f.name] = given[f.name]
    for f in dataclasses.fields(TrainConfig):
        if f.name in given and f.name != "model":
            values[f.name] = given[f.name]
    values["model"] = model
    return TrainConfig.from_dict(values)


def _prepare_default_data(cfg):
    """Point cfg.data at the built-in synthetic corpus, prepared on first use; why not, or None."""
    from .data import prepare as run_prepare
    from .files import FolderLock
    from .runtime import launched_world_size
    from .shards import DataError

    cfg.data = default_data_dir()
    if os.path.isfile(os.path.join(cfg.data, "manifest.json")):
        return None
    if launched_world_size() > 1:
        return "under torchrun, prepare the data first (tinyfuse prepare --out DIR) and pass --data DIR"
    try:
        # two first runs at once: one prepares, the other waits and finds it done
        lock = FolderLock(os.path.dirname(cfg.data), what="cache", wait=True)
        try:
            if not os.path.isfile(os.path.join(cfg.data, "manifest.json")):
                print(f"preparing the built-in synthetic corpus in {cfg.data} (once)", flush=True)
                run_prepare("synthetic", cfg.data, vocab_size=512)
        finally:
            lock.release()
    except (DataError, OSError) as e:
        return str(e)
    return None


def _check_out(out, resume):
    """Refuse an --out that cannot hold this run: a file on its path, or a run's checkpoints
    without --resume."""
    from .checkpoint import run_checkpoints

    existing = out
    while existing and not os.path.exists(existing):  # the nearest part of --out that exists
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        raise ValueError(f"--out {out}: {existing} is a file, not a folder; choose another --out")
    if not resume and run_checkpoints(out):
        raise ValueError(f"{out} already holds checkpoints: pass --resume to continue it, or another --out")


def _model_and_tokenizer(args, data=None):
    """The model of --checkpoint (any format) on its device, and its tokenizer: --tokenizer,
    else the one the checkpoint carries, else the prepared data folder's."""
    from .checkpoint import check_tokenizer, load_checkpoint
    from .data import load_tokenizer
    from .model import Transformer, default_kernels
    from .sample import load_tokenizer_bytes
    from .shards import TOKENIZER

    weights = load_checkpoint(args.checkpoint)
    if args.tokenizer:
        sp, source = load_tokenizer(args.tokenizer), args.tokenizer
    elif weights.tokenizer:
        source = f"carried by {args.checkpoint}"
        sp = load_tokenizer_bytes(weights.tokenizer, f"the tokenizer {source}")
    elif data is not None and os.path.isfile(os.path.join(data, TOKENIZER)):
        source = os.path.join(data, TOKENIZER)
        sp = load_tokenizer(source)
    else:
        raise ValueError(f"{args.checkpoint} ({weights.format}) carries no tokenizer: give --tokenizer MODEL")
    check_tokenizer(sp, weights.config, source)
    device = default_device(args.device)
    model = Transformer(weights.config, kernels=args.kernels or default_kernels(device))
    model.load_state_dict(weights.state)
    return model.to(device), sp


def sample(args):
    """Generate a story from a checkpoint."""
    select_backend()
    from .sample import printable, story
    from .shards import DataError

    try:
        model, sp = _model_and_tokenizer(args)
        text = story(model, sp, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, seed=args.seed, progress=True)
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"tinyfuse sample: {e}", file=sys.stderr)
        return 2
    print(printable(text))
    return 0


def evaluate(args):
    """Loss, perplexity and bits per byte of a checkpoint over held-out stories."""
    select_backend()
    import json
    import math

    from .evaluate import evaluate as run_evaluate, prepared_stories, text_stories
    from .shards import DataError, check_token_range, is_prepared, read_manifest

    try:
        if args.max_stories is not None and args.max_stories <= 0:
            raise ValueError(f"--max-stories must be positive; got {args.max_stories}")
        if not os.path.exists(args.data):
            raise FileNotFoundError(f"--data {args.data}: no such file or folder")
        prepared = is_prepared(args.data)
        model, sp = _model_and_tokenizer(args, data=args.data if prepared else None)
        if prepared:
            manifest = read_manifest(args.data)
            if manifest["vocab_size"] != model.config.vocab_size:
                raise ValueError(f"{args.data} was tokenized with {manifest['vocab_size']} tokens; the model's "
                                 f"vocabulary has {model.config.vocab_size}")
            check_token_range(args.data, ("val",), manifest, model.config.vocab_size)  # as train checks it
            stories = prepared_stories(args.data, args.max_stories)
        else:
            stories = text_stories(sp, args.data, args.max_stories)
        result = run_evaluate(model, sp, stories, progress=not args.json)
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"tinyfuse eval: {e}", file=sys.stderr)
        return 2
    if args.json:  # JSON has no NaN or inf: those figures are null
        print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}))
    else:
        print(f"{args.checkpoint} on {args.data}: loss {result['loss']:.4f}  ppl {result['ppl']:.3f}  "
              f"bpb {result['bpb']:.4f}  ({result['stories']} stories, {result['tokens']} tokens, "
              f"{result['bytes']} bytes)")
    return 0


def export(args):
    """Write a checkpoint (any format) as llama2.c v0/v1 or a Hugging Face folder."""
    from .checkpoint import check_tokenizer, export as run_export, load_checkpoint
    from .data import load_tokenizer
    from .shards import DataError

    try:
        if os.path.exists(args.out) and not args.force and (not os.path.isdir(args.out) or os.listdir(args.out)):
            what = "a folder that holds files" if os.path.isdir(args.out) else "an existing file"
            raise ValueError(f"--out {args.out} is {what}; export replaces it only with --force")
        weights = load_checkpoint(args.checkpoint)
        tokenizer = weights.tokenizer
        if args.tokenizer:
            check_tokenizer(load_tokenizer(args.tokenizer), weights.config, args.tokenizer)
            with open(args.tokenizer, "rb") as f:
                tokenizer = f.read()
        if args.format == "hf" and tokenizer is None:
            print(f"note: {args.checkpoint} carries no tokenizer and none was given (--tokenizer); "
                  "the folder holds the model only", file=sys.stderr)
        run_export(weights, args.out, args.format, tokenizer)
    except (ValueError, FileNotFoundError, DataError, OSError) as e:
        print(f"tinyfuse export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.format}, from {weights.format} {args.checkpoint})")
    return 0


CHECKPOINT_HELP = ("a tinyfuse checkpoint or run folder (its newest checkpoint), llama2.c .bin (v0 or v1) or .pt, "
                   "or a Hugging Face folder")


def _add_model_flags(parser):
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--kernels", choices=["triton", "torch"],
                        help="fused Triton kernels or the plain-PyTorch ops (default: triton on CUDA, torch elsewhere)")


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def bench(args):
    """The benchmark suite, or the comparison of two of its results."""
    select_backend()
    from tinyfuse.bench.suite import main as run_bench

    return run_bench(args)


def check(args):
    """Every kernel against the float64 evaluation of its reference, on this machine."""
    if args.device == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: Triton's interpreter, even beside a GPU
    select_backend()
    from tinyfuse.kernels.check import CheckError

    try:
        return _check(args)
    except CheckError as e:
        print(f"tinyfuse check: {e}", file=sys.stderr)
        return 2


def _check(args):
    import json
    import random

    from tinyfuse.kernels import check as kernel_check
    from .model import PRESETS, preset

    try:
        device = default_device(args.device)
    except ValueError as e:
        raise kernel_check.CheckError(str(e)) from None
    dtypes = []
    for name in args.dtypes.split(","):
        if name not in kernel_check.DTYPES:
            raise kernel_check.CheckError(f"--dtypes: unknown {name!r}; choose from {','.join(kernel_check.DTYPES)}")
        dtypes.append(kernel_check.DTYPES[name])
    shapes = []
    for spec in args.shapes or ["preset" if device.type == "cuda" else "small"]:
        if spec == "preset":  # each preset at 8,192 tokens a step: a 24 GB card holds the float64 loss
            shapes += [kernel_check.Shape.of_model(name, preset(name), 8192) for name in PRESETS]
        else:
            shapes += {"small": kernel_check.SMALL, "sweep": kernel_check.SWEEP}.get(spec) or \
                [kernel_check.Shape.rows(spec)]
    impl = None
    if args.against:
        if not args.ops or len(args.ops) != 1:
            raise kernel_check.CheckError("--against checks one op: name it with --ops (one of "
                                          f"{', '.join(kernel_check.OP_NAMES)})")
        impl = kernel_check.load_function(args.against)
    cases = kernel_check.cases(args.ops, dtypes, shapes)
    seed = random.SystemRandom().randrange(1 << 31) if args.seed is None else args.seed
    where = f"{device.type} ({'Triton interpreter' if os.environ.get('TRITON_INTERPRET') == '1' else 'compiled'})"
    out = sys.stderr if args.json else sys.stdout
    if impl is not None:
        untaken = {c.op.label: ", ".join(c.op.options) for c in cases if not kernel_check.takes_options(impl, c.op)}
        for label, options in untaken.items():
            print(f"skip {label}: {args.against} takes no {options}", file=out)
        cases = [c for c in cases if c.op.label not in untaken]
        if not cases:
            raise kernel_check.CheckError(f"no case to run: {args.against} takes none of the op's variants")
    print(f"tinyfuse check: {len(cases)} cases of {args.against or 'tinyfuse'} on {where}, seed {seed}", file=out)
    start = time.perf_counter()
    results = kernel_check.run(cases, device, seed, impl, progress=lambda r: print(r.line(), file=out, flush=True))
    failed = [r for r in results if not r.ok]
    print(f"tinyfuse check: {len(results) - len(failed)} of {len(results)} cases passed in "
          f"{time.perf_counter() - start:.0f} s" + (f"; to repeat these inputs: --seed {seed}" if failed else ""),
          file=out)
    if args.json:
        print(json.dumps({"device": str(device), "seed": seed, "against": args.against,
                          "passed": len(results) - len(failed), "failed": len(failed),
                          "cases": [r.record() for r in results]}, indent=1))
    return 1 if failed else 0


def _add_prepare_command(sub):
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
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out that holds other files (only the dataset's own files are replaced)")
    p.set_defaults(func=prepare)


def _add_train_command(sub):
    from .model import ModelConfig, preset
    from .settings import add_dataclass_flags
    from .train import TrainConfig

    p = sub.add_parser("train", help="train a model (with no arguments: stories260K on the built-in corpus)",
                       description="Settings come from the TOML --config (a [model] table overrides the preset), "
                                   "then from the flags, which win.")
    p.add_argument("--config", help="a TOML file of training settings")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_dataclass_flags(p, TrainConfig, "training")
    default_preset = TrainConfig.preset
    model_defaults = {**preset(default_preset).to_dict(), "vocab_size": None}  # the data's
    add_dataclass_flags(p, ModelConfig, "model (overrides the preset's; not with --init-from)", model_defaults,
                         f"default: {default_preset}'s")
    p.set_defaults(func=train)


def _add_sample_command(sub):
    p = sub.add_parser("sample", help="generate a story from a checkpoint")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--tokenizer", help="a SentencePiece .model (default: the one the checkpoint carries)")
    p.add_argument("--prompt", default="", help="the story's opening (default: none, the model starts from BOS)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0: greedy (default: 0.8)")
    p.add_argument("--top-p", type=float, default=0.9,
                   help="sample from the smallest set of tokens whose probability reaches this (default: 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    _add_model_flags(p)
    p.set_defaults(func=sample)


def _add_eval_command(sub):
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint over held-out stories")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--tokenizer", help="a SentencePiece .model (default: the checkpoint's, or the data folder's)")
    p.add_argument("--data", required=True,
                   help="a text or JSON file (or folder) of stories, or a prepared folder (its val split)")
    p.add_argument("--max-stories", type=int, help="the first N stories only")
    p.add_argument("--json", action="store_true", help="print one JSON object: loss, ppl, bpb, tokens, ...")
    _add_model_flags(p)
    p.set_defaults(func=evaluate)


def _add_export_command(sub):
    from .checkpoint import FORMATS

    p = sub.add_parser("export", help="write a checkpoint as llama2.c v0/v1 .bin or a Hugging Face folder")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="llama2c-v0 (run.c's legacy .bin), llama2c-v1 (versioned .bin) or hf (a Hugging Face folder)")
    p.add_argument("--out", required=True, help="a .bin file, or a folder for hf")
    p.add_argument("--tokenizer", help="the SentencePiece .model to put in an hf folder (default: the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (a file, or a folder's files)")
    p.set_defaults(func=export)


def _add_bench_command(sub):
    from tinyfuse.bench.step import ROW_NAMES

    from .model import PRESETS

    p = sub.add_parser("bench", help="benchmark kernels, the training step and the loader; or compare two runs",
                       description="tinyfuse bench [--smoke] [--only SECTION ...] [--ops OP ...] [--presets NAME ...] "
                                   "[--no-sweep] [--step-rows ROW ...] [--repeats N] [--budget SECONDS] [--out DIR]  |  "
                                   "tinyfuse bench compare OLD.json NEW.json")
    p.add_argument("action", nargs="?", choices=["compare"], help="compare OLD.json NEW.json")
    p.add_argument("files", nargs="*", help="the two results.json files to compare")
    p.add_argument("--smoke", action="store_true",
                   help="the whole suite at tiny sizes (on CPU: Triton's interpreter), to check it end to end")
    p.add_argument("--only", nargs="+", choices=["kernels", "step", "loader"], help="these sections only")
    p.add_argument("--ops", nargs="+", metavar="OP", help="these kernels only (rms_norm, add_rms_norm, "
                                                        "gemma_rms_norm, rope, swiglu, geglu, cross_entropy, "
                                                        "softcap_cross_entropy, linear_cross_entropy)")
    p.add_argument("--presets", nargs="+", choices=list(PRESETS),
                   help="the presets whose shapes the kernels and the step run (default: all)")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="leave out the kernels' bandwidth sweep")
    p.add_argument("--step-rows", nargs="+", metavar="ROW", choices=ROW_NAMES,
                   help=f"the step rows: {', '.join(ROW_NAMES)} (default: every row that runs here)")
    p.add_argument("--repeats", type=_positive_int, help="timed repetitions of a kernel pass and a step row "
                                                         "(default 50 and 20)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="start no kernel case or step row after this many seconds (those left are recorded as skipped)")
    p.add_argument("--out", default="bench-results",
                   help="folder for rows.jsonl (written as measured), results.json, results.md and the plots")
    p.add_argument("--static", action="store_true",
                   help="no GPU needed: compile every kernel for --arch and report registers, spills, occupancy, "
                        "waves, global access widths and bytes moved, and account for a training step (static.json)")
    p.add_argument("--arch", default="90", help="with --static: compute capabilities, comma-separated (default: 90)")
    p.set_defaults(func=bench)


def _add_check_command(sub):
    p = sub.add_parser("check", help="check every kernel against its float64 reference on this machine",
                       description="Each op's forward and backward against the float64 evaluation of its reference "
                                   "(tinyfuse.kernels.reference) on fresh random inputs, held to the tests' "
                                   "tolerances; a second run must be bit-identical, outputs are written over "
                                   "NaN-poisoned memory, and each op's first case also runs under "
                                   "torch.compile(fullgraph=True). Exit 1 when any case fails.")
    p.add_argument("--ops", nargs="+", metavar="OP", help="these ops only (rms_norm, add_rms_norm, rope, rope_qkv, "
                                                        "swiglu, geglu, cross_entropy, linear_cross_entropy)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated (default: bf16,fp16,fp32)")
    p.add_argument("--shapes", nargs="+", metavar="SHAPE",
                   help="preset (each model preset's sizes at 8,192 tokens; the default on CUDA), small (the "
                        "default on a CPU, in Triton's interpreter), sweep (small and wider), or N,D: N rows of "
                        "width D for every op")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when present")
    p.add_argument("--seed", type=int, help="the inputs' seed (default: a fresh one, printed)")
    p.add_argument("--against", metavar="MODULE:FUNCTION",
                   help="check this function (same signature as the tinyfuse op named by --ops) instead of tinyfuse's; "
                        "MODULE is importable from here or a .py file")
    p.add_argument("--json", action="store_true", help="print one JSON object of every case (the lines go to stderr)")
    p.set_defaults(func=check)


def build_parser():
    parser = argparse.ArgumentParser(prog="tinyfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in (_add_prepare_command, _add_train_command, _add_sample_command, _add_eval_command,
                        _add_export_command, _add_bench_command, _add_check_command):
        add_command(sub)
    return parser


def main(argv=None):
    """Run one command. The one place a reader's failure becomes the one-line error: the
    project's errors (bad input, said in a line) exit 2 whichever command raises them;
    anything else is a bug, shown with its traceback and a line saying so."""
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .files import FileError
    from .shards import DataError

    try:
        return args.func(args)
    except (CheckpointError, DataError, FileError) as e:
        print(f"tinyfuse {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"tinyfuse {args.command}: the error above is a bug in tinyfuse, not in your input; please report it "
              "with these lines", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
