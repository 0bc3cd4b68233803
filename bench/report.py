"""Results of `tinyfuse bench` as they are measured (rows.jsonl), as Markdown tables and PNG
plots, and the comparison of two runs (`tinyfuse bench compare OLD.json NEW.json`)."""
import json
import os
import time


class RowLog:
    """rows.jsonl: every row appended the moment it is measured, one JSON object a line
    with its "section" (the first line is the environment), so a run killed at its time
    limit still leaves what it measured; and the run's wall-clock budget, which the
    sections ask before each case or row (those not started are skipped for SPENT)."""

    SPENT = "the run's time budget was spent"

    def __init__(self, path, budget_s=None):
        self.path = path
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "w").close()

    def add(self, section, *rows):
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps({"section": section, **row}) + "\n")

    def expired(self):
        return self.deadline is not None and time.monotonic() > self.deadline


def read_rows(path):
    """{section: [rows]} of a rows.jsonl (a line torn by a kill is left out)."""
    out = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.setdefault(row.pop("section", "?"), []).append(row)
    return out


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def on_gpu(results):
    return results["env"].get("device_count", 0) >= 1 and not results["env"]["device"].startswith("CPU")


def kernel_table(rows, gpu=True):
    """One line per op, pass and shape: tinyfuse's time, GB/s (TFLOP/s for the linear
    cross-entropy) and % of copy bandwidth, each baseline's time, tinyfuse's speed-up over
    it, and peak memory. Without a GPU the rate and bandwidth columns are left out: the
    interpreter's times say nothing about them."""
    keys = []
    for r in rows:
        key = (r["op"], r["group"], tuple(r["shape"]), r["pass"])
        if key not in keys:
            keys.append(key)
    lines = ["| op | shape | pass | tinyfuse ms | GB/s | % bw | torch ms | compile ms | liger ms | "
             "× torch | × compile | × liger | peak MB (ours / torch) |",
             "|" + "---|" * 13]
    for op, group, shape, p in keys:
        by = {r["impl"]: r for r in rows if (r["op"], r["group"], tuple(r["shape"]), r["pass"]) == (op, group, shape, p)}
        ours = by.get("tinyfuse", {})
        rate = ""
        if ours.get("gbps") is not None:
            rate = f"{ours['gbps']:.3g}"
        elif ours.get("tflops") is not None:
            rate = f"{ours['tflops']:.3g} TFLOP/s"

        def ms(impl):
            r = by.get(impl)
            if r is None:
                return "–"
            if r.get("ms") is None:
                return "in fwd" if r.get("note") else "skipped" if r.get("skipped") else "error"
            return f"{r['ms']:.3f}"

        speed = ours.get("speedup", {})
        mem = f"{_fmt(ours.get('peak_mem_mb'), '.0f')} / {_fmt(by.get('torch', {}).get('peak_mem_mb'), '.0f')}" \
            if ours.get("peak_mem_mb") is not None else ""
        lines.append(f"| {op} | {group} {'×'.join(map(str, shape))} | {p} | {ms('tinyfuse')} | {rate} | "
                     f"{_fmt(ours.get('pct_bw'), '.0f')} | {ms('torch')} | {ms('torch.compile')} | {ms('liger')} | "
                     f"{_fmt(speed.get('torch'), '.2f')} | {_fmt(speed.get('torch.compile'), '.2f')} | "
                     f"{_fmt(speed.get('liger'), '.2f')} | {mem} |")
    if not gpu:  # drop "GB/s" and "% bw"
        lines = ["|".join(c for i, c in enumerate(line.split("|")) if i not in (5, 6)) for line in lines]
        lines[1] = "|" + "---|" * 11
    return "\n".join(lines)


def step_table(rows):
    """One line per preset and row (names as `--step-rows` takes them). "CUDA graph" is
    whether the step really ran as one (a failed capture says why); "loss" the mean loss
    of the steps run (random tokens: about ln V). The breakdown comes from separate steps
    synchronised between phases; "sum" is the phases' total over the whole-step median
    (above 100%: the synchronisations' own cost)."""
    lines = ["| preset | row | CUDA graph | attention | tokens/s | MFU | peak GB | loss | step ms | data | forward "
             "| backward | optimizer | sum |", "|" + "---|" * 14]
    for r in rows:
        graph = "yes" if r.get("cuda_graph") else f"no ({r['graph_error']})" if r.get("graph_error") else "no"
        head = f"| {r['preset']} | {r.get('row', r.get('model', 'tinyfuse'))} | {graph} | {r.get('attention', '')} |"
        if r.get("tokens_per_s") is None:
            what = f"skipped: {r['skipped']}" if r.get("skipped") else f"error: {r.get('error', '')}"
            lines.append(f"{head} {what} |||||||||")
            continue
        b = r["breakdown"]
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        lines.append(f"{head} {r['tokens_per_s']:,.0f} | {mfu} | {_fmt(r.get('peak_mem_gb'), '.2f')} | "
                     f"{_fmt(r.get('loss'), '.3f')} | {r['step_ms']:.2f} | {b['data']:.2f} | {b['forward']:.2f} | "
                     f"{b['backward']:.2f} | {b['optimizer']:.2f} | {100 * sum(b.values()) / r['step_ms']:.0f}% |")
    return "\n".join(lines)


def loader_table(rows):
    lines = ["| loader | batch × seq | M tokens/s | × reference |", "|---|---|---|---|"]
    for r in rows:
        ref = next(x for x in rows if x["impl"].startswith("reference") and x["seq_len"] == r["seq_len"])
        lines.append(f"| {r['impl']} | {r['batch_size']}×{r['seq_len']} | {r['tokens_per_s'] / 1e6:.1f} | "
                     f"{r['tokens_per_s'] / ref['tokens_per_s']:.1f} |")
    return "\n".join(lines)


def _env_line(env):
    return (f"{env['device']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · "
            f"commit {env['commit']} · {env['date']} · copy bandwidth {env['copy_gbps']:.0f} GB/s")


def markdown(results):
    env = results["env"]
    parts = [f"# tinyfuse bench{' (smoke: tiny shapes, not a performance figure)' if results.get('smoke') else ''}",
             "", _env_line(env), ""]
    for note in results.get("notes", []):
        parts.append(f"- {note}")
    if results.get("notes"):
        parts.append("")
    gpu = on_gpu(results)
    if results.get("kernels"):
        how = ("Median ms (CUDA events, L2 flushed); GB/s from each op's byte model (bench/<op>.py); % of the copy "
               "bandwidth above; × = the baseline's time over tinyfuse's." if gpu else
               "Median ms on the CPU: tinyfuse's kernels in Triton's interpreter, the baselines in eager PyTorch and "
               "torch.compile's aot_eager backend. These times check that every path runs; they are no measure of "
               "speed, so no bandwidth is derived from them (`tinyfuse bench --static` estimates the GPU).")
        parts += ["## Kernels", "", how, "", kernel_table(results["kernels"], gpu), ""]
    if results.get("step"):
        parts += ["## Training step", "", "16,384 tokens a step (smoke: 16); breakdown in ms, medians of "
                  "synchronised steps.", "", step_table(results["step"]), ""]
    if results.get("loader"):
        parts += ["## Loader", "", loader_table(results["loader"]), ""]
    return "\n".join(parts)


def plots(results, out_dir):
    """kernels_<op>.png: GB/s (TFLOP/s for linear_cross_entropy) of the sweep against size,
    one line per implementation and pass; step.png: tokens/s per preset. Returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [r for r in results.get("kernels", []) if r["group"] == "sweep" and r.get("ms") is not None]
    for op in dict.fromkeys(r["op"] for r in rows):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
        for ax, p in zip(axes, ("fwd", "bwd", "fwd+bwd")):
            for impl in dict.fromkeys(r["impl"] for r in rows if r["op"] == op):
                points = sorted((r["size"], r["gbps"] if r.get("gbps") is not None else r.get("tflops"))
                                for r in rows if r["op"] == op and r["pass"] == p and r["impl"] == impl)
                if points:
                    ax.plot(*zip(*points), "o-", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {p}")
            ax.set_xlabel("vocabulary" if "cross_entropy" in op else "hidden size")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("TFLOP/s" if op == "linear_cross_entropy" else "GB/s")
        if op != "linear_cross_entropy":
            for ax in axes:
                ax.axhline(results["env"]["copy_gbps"], color="grey", ls="--", lw=1)
        axes[0].legend()
        fig.suptitle(results["env"]["device"] + ("" if on_gpu(results) else
                                                  " — Triton interpreter times: a code-path check, not speed"))
        fig.tight_layout()
        path = os.path.join(out_dir, f"kernels_{op}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    steps = [r for r in results.get("step", []) if r.get("tokens_per_s") is not None]
    if steps:
        presets = list(dict.fromkeys(r["preset"] for r in steps))
        configs = list(dict.fromkeys(_step_config(r) for r in steps))
        fig, ax = plt.subplots(figsize=(11, 4))
        width = 0.8 / len(configs)
        for i, config in enumerate(configs):
            values = [next((r["tokens_per_s"] for r in steps if (r["preset"], _step_config(r)) == (p, config)), 0)
                      for p in presets]
            model, kernels, comp, graph = config
            ax.bar([j + i * width for j in range(len(presets))], values, width,
                   label=f"{'' if model == 'tinyfuse' else model.replace('transformers', 'HF') + ' '}{kernels}"
                         f"{' + compile' if comp else ''}"
                         f"{' + graph' if graph else ''}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(presets))], presets)
        ax.set_yscale("log")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"training step — {results['env']['device']}"
                     + ("" if on_gpu(results) else " (CPU, interpreter: not speed)"))
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        path = os.path.join(out_dir, "step.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _step_config(row):
    return row.get("model", "tinyfuse"), row["kernels"], row["compile"], bool(row.get("cuda_graph"))


def write(results, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results))
    return [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")] + plots(results, out_dir)


# ---------------------------------------------------------------- the static report

def static_table(result):
    """The terminal table: one line per architecture, op, pass and shape, the worst launch's
    figures."""
    lines = [f"{'arch':<6}{'op':<22}{'pass':<9}{'group':<13}{'bytes/min':>10}{'regs':>6}{'spill':>7}{'blk/SM':>7}"
             f"{'waves':>8}{'last':>6}  global accesses (bits: count)"]
    for r in sorted(result["kernels"], key=lambda r: result["arch"].index(r["arch"])):  # the order asked for
        if not r["launches"]:
            continue
        worst = max(r["launches"], key=lambda launch: launch["registers"] or 0)
        access = " ".join(f"{k}:{v}" for k, v in sorted(worst["global"].items()))
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        lines.append(f"sm_{r['arch']:<3}{r['op']:<22}{r['pass']:<9}{r['group']:<13}{ratio:>10}{worst['registers']:>6}"
                     f"{worst['local_bytes']:>7}{worst['blocks_per_sm']:>7}{worst['waves']:>8.2f}"
                     f"{worst['last_wave_busy']:>6.2f}  {access}")
    for s in result["steps"]:
        lines.append(f"step {s['preset']}: {s['launches']} launches ({s['triton_launches']} Triton), "
                     f"{len(s['syncs'])} host syncs, {len(s['casts'])} casts, {len(s['concats'])} concatenations, "
                     f"{s['allocated_bytes'] / 1e6:.1f} MB allocated")
    return "\n".join(lines)


def write_static(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "static.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path


# ---------------------------------------------------------------- compare

def _indexed(results):
    """(section, key) -> (time-like figure where lower is better, noise) for every measured row."""
    out = {}
    for r in results.get("kernels", []):
        if r.get("ms") is not None:
            out[("kernels", f"{r['op']} {r['pass']} {'×'.join(map(str, r['shape']))} {r['dtype']} {r['impl']}")] = \
                (r["ms"], r.get("noise", 0.0))
    for r in results.get("step", []):
        if r.get("tokens_per_s"):
            model = "" if r.get("model", "tinyfuse") == "tinyfuse" else f" {r['model']}"
            graph = " graph" if r.get("cuda_graph") else ""
            out[("step", f"{r['preset']}{model} kernels={r['kernels']} compile={r['compile']}{graph}")] = \
                (1.0 / r["tokens_per_s"], r.get("noise", 0.0))
    for r in results.get("loader", []):
        out[("loader", f"{r['impl']} {r['batch_size']}x{r['seq_len']}")] = (1.0 / r["tokens_per_s"], r.get("noise", 0.0))
    return out


def compare(old, new, floor=0.02):
    """Lines naming what got faster or slower: a change counts when the ratio of times moves
    further from 1 than twice the larger interquartile spread of the two runs (and at least
    `floor`). Returns (lines, counts)."""
    a, b = _indexed(old), _indexed(new)
    faster, slower, same = [], [], 0
    for key in a.keys() & b.keys():
        (t_old, n_old), (t_new, n_new) = a[key], b[key]
        ratio = t_old / t_new  # above 1: the new run is faster
        threshold = max(floor, 2 * max(n_old, n_new))
        line = f"{key[0]:<8} {key[1]:<60} {ratio:6.2f}x  (noise ±{100 * threshold:.0f}%)"
        if ratio > 1 + threshold:
            faster.append((ratio, line))
        elif ratio < 1 / (1 + threshold):
            slower.append((ratio, line))
        else:
            same += 1
    lines = []
    if old["env"].get("device") != new["env"].get("device"):
        lines.append(f"note: different devices ({old['env'].get('device')} vs {new['env'].get('device')})")
    lines += ["faster:"] + [line for _, line in sorted(faster, reverse=True)] if faster else ["faster: none"]
    lines += ["slower:"] + [line for _, line in sorted(slower)] if slower else ["slower: none"]
    only = len(a.keys() ^ b.keys())
    lines.append(f"{same} within noise; {only} measured in only one of the runs")
    return lines, {"faster": len(faster), "slower": len(slower), "same": same, "unmatched": only}


# ---------------------------------------------------------------- a staged run's summary

def summary(stages_tsv, rows_files):
    """Markdown of a staged run (bench/gpu_run.sh): each stage's outcome from stages_tsv
    (stage, name, exit code, seconds a line), the environment, then the tables of every
    row the stages' rows.jsonl files hold."""
    parts = ["# bench/gpu_run.sh", "", "| stage | what | exit | seconds |", "|---|---|---|---|"]
    if os.path.exists(stages_tsv):
        with open(stages_tsv) as f:
            for line in f:
                fields = line.rstrip("\n").split("\t")
                if len(fields) == 4:
                    code = {"0": "ok", "124": "timed out", "137": "killed"}.get(fields[2], fields[2])
                    parts.append(f"| {fields[0]} | {fields[1]} | {code} | {fields[3]} |")
    sections = {}
    for path in rows_files:
        if os.path.exists(path):
            for section, rows in read_rows(path).items():
                sections.setdefault(section, []).extend(rows)
    env = (sections.get("env") or [{}])[0]
    if env:
        parts += ["", _env_line(env)]
    if sections.get("step"):
        parts += ["", "## Training step", "", step_table(sections["step"])]
    if sections.get("kernels"):
        gpu = not str(env.get("device", "CPU")).startswith("CPU")
        parts += ["", "## Kernels", "", kernel_table(sections["kernels"], gpu)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 3:
        sys.exit("usage: python -m tinyfuse.bench.report SUMMARY.md STAGES.tsv [ROWS.jsonl ...]")
    with open(sys.argv[1], "w") as f:
        f.write(summary(sys.argv[2], sys.argv[3:]))
