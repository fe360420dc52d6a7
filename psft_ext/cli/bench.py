"""``psft bench``: the benchmarks of the source tree (``benchmarks/bench_loss.py`` and
``benchmarks/bench_linear.py``), run on this device, with one JSON and one plot.

The benchmark scripts are not part of the installed package (they are development tools with
their own peers and shapes); this runner imports them from the ``benchmarks/`` folder next to the
``psft_ext`` package, which exists in a source checkout (an editable install). Without it, it says
so rather than pretending.
"""

import importlib.util
import os
import sys

from .common import CLIError, write_json_atomic


def benchmarks_dir():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../psft_ext
    return os.path.join(os.path.dirname(here), "benchmarks")


def _load(name):
    folder = benchmarks_dir()
    path = os.path.join(folder, f"{name}.py")
    if not os.path.isfile(path):
        raise CLIError(f"psft bench runs the benchmark scripts of the psft_ext source tree, and "
                       f"{path} does not exist (this psft_ext is not a source checkout). Clone the "
                       f"repository and install it with pip install -e . to benchmark")
    # bench_linear imports bench_loss as a top-level module from its own folder.
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _common_argv(args):
    argv = []
    if args.device:
        argv += ["--device", args.device]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.reps:
        argv += ["--reps", str(args.reps)]
    if args.no_memory:
        argv.append("--no-memory")
    return argv


def plot(loss_rows, linear_rows, path):
    """The times and peak memories as a PNG; False (and no file) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    ok = [r for r in loss_rows if "error" not in r and r.get("fwdbwd_s") is not None]
    if ok:
        panels.append(("PSFT loss: forward+backward (ms)", ok, "fwdbwd_s", 1e3,
                       lambda r: f"{r['n']}x{r['vocab']}"))
        mem = [r for r in ok if r.get("fwdbwd_peak_bytes") is not None]
        if mem:
            panels.append(("PSFT loss: peak extra memory (MiB)", mem, "fwdbwd_peak_bytes",
                           1 / 2**20, lambda r: f"{r['n']}x{r['vocab']}"))
    ok = [r for r in linear_rows if "error" not in r and r.get("fwdbwd_s") is not None]
    if ok:
        panels.append(("fused linear: forward+backward (ms)", ok, "fwdbwd_s", 1e3,
                       lambda r: f"{r['n']}x{r['hidden']}x{r['vocab']}"))
        mem = [r for r in ok if r.get("peak_bytes") is not None]
        if mem:
            panels.append(("fused linear: peak extra memory (MiB)", mem, "peak_bytes", 1 / 2**20,
                           lambda r: f"{r['n']}x{r['hidden']}x{r['vocab']}"))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, rows, key, scale, shape_of) in zip(axes[0], panels):
        shapes = list(dict.fromkeys(shape_of(r) for r in rows))
        names = list(dict.fromkeys(r["name"] for r in rows))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            xs, ys = [], []
            for i, shape in enumerate(shapes):
                r = next((r for r in rows if r["name"] == name and shape_of(r) == shape), None)
                if r is not None:
                    xs.append(i + j * width)
                    ys.append(r[key] * scale)
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        # Log scale shows fused and reference side by side when they differ by orders of
        # magnitude; it cannot show zeros (tiny shapes round the peak memory to 0).
        if all(r[key] and r[key] > 0 for r in rows):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args):
    bench_loss = _load("bench_loss")
    bench_linear = None if args.no_linear else _load("bench_linear")
    os.makedirs(args.out, exist_ok=True)
    common = _common_argv(args)
    print("## PSFT loss: fused vs reference", flush=True)
    loss_rows = bench_loss.main(common + (["--shapes", args.shapes] if args.shapes else []))
    linear_rows = []
    if bench_linear is not None:
        print("\n## fused linear PSFT loss vs materialized logits", flush=True)
        linear_rows = bench_linear.main(
            common + (["--shapes", args.linear_shapes] if args.linear_shapes else []))
    device = args.device or ("cuda" if bench_loss.torch.cuda.is_available() else "cpu")
    env = bench_loss.environment(bench_loss.torch.device(device))
    png = os.path.join(args.out, "bench.png")
    plotted = plot(loss_rows, linear_rows, png)
    write_json_atomic(os.path.join(args.out, "bench.json"),
                      dict(environment=env, loss=loss_rows, linear=linear_rows))
    print(f"\nwrote {os.path.join(args.out, 'bench.json')}" + (f" and {png}" if plotted else ""))
    return 0
