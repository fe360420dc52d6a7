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


def _check_shapes(flag, text, form):
    """The shapes of --shapes / --linear-shapes as tuples, or a one-line error naming the flag."""
    factors = len(form.split("x"))
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            shape = ()
        if len(shape) != factors or min(shape) < 1:
            raise CLIError(f"{flag}: {item.strip()!r} is not {form} ({factors} positive integers "
                           f"joined by 'x', e.g. {'x'.join(['256', '1024', '32000'][-factors:])}"
                           f")")
        shapes.append(shape)
    return shapes


def check_arguments(args):
    """Every bad value stops here, before a benchmark runs or a file is written."""
    import torch
    if args.shapes is not None:
        _check_shapes("--shapes", args.shapes, "NxV")
    if args.linear_shapes is not None:
        _check_shapes("--linear-shapes", args.linear_shapes, "NxHxV")
    if args.reps is not None and args.reps < 1:
        raise CLIError(f"--reps must be at least 1, got {args.reps}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise CLIError(f"--output-dir {args.output_dir} exists and is not a folder")
    if args.device == "cuda":
        from .. import build_info
        if torch.version.cuda is None:
            raise CLIError(f"--device cuda: this torch ({torch.__version__}) is a CPU build")
        if not torch.cuda.is_available():
            raise CLIError("--device cuda: torch sees no GPU")
        if not build_info().get("cuda"):
            raise CLIError("--device cuda: psft_ext was built without its CUDA kernels "
                           "(reinstall it with nvcc on the PATH)")


# One colour per contender, the same in every panel.
PALETTE = ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown",
           "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


def figure(loss_rows, linear_rows, title):
    """Time and peak memory per shape and contender: one small panel per shape and measurement,
    linear axes from zero, the values written on the bars, one colour per contender in every
    panel. None without a row to draw."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def shape_of(r):
        return "x".join(str(r[k]) for k in ("n", "hidden", "vocab") if k in r)

    measures = []
    for what, rows, keys in (
            ("PSFT loss", loss_rows, (("fwdbwd_s", "fwd+bwd (ms)", 1e3),
                                      ("fwdbwd_peak_bytes", "peak extra memory (MiB)",
                                       1 / 2**20))),
            ("fused linear", linear_rows, (("fwdbwd_s", "fwd+bwd (ms)", 1e3),
                                           ("peak_bytes", "peak extra memory (MiB)",
                                            1 / 2**20)))):
        ok = [r for r in rows if "error" not in r]
        for key, unit, scale in keys:
            have = [r for r in ok if r.get(key) is not None]
            if have:
                measures.append((f"{what}, {unit}", have, key, scale))
    if not measures:
        return None
    names = list(dict.fromkeys(r["name"] for _, rows, _, _ in measures for r in rows))
    color = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    columns = max(len(dict.fromkeys(shape_of(r) for r in rows)) for _, rows, _, _ in measures)
    fig, axes = plt.subplots(len(measures), columns, figsize=(3.4 * columns, 2.9 * len(measures)),
                             squeeze=False)
    for row_axes, (label, rows, key, scale) in zip(axes, measures):
        shapes = list(dict.fromkeys(shape_of(r) for r in rows))
        for ax, shape in zip(row_axes, shapes):
            here = [r for r in rows if shape_of(r) == shape]
            values = [r[key] * scale for r in here]
            bars = ax.bar(range(len(here)), values, color=[color[r["name"]] for r in here])
            ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7)
            ax.set_xticks(range(len(here)))
            ax.set_xticklabels([r["name"] for r in here], rotation=30, ha="right", fontsize=7)
            ax.set_ylim(0, max(values) * 1.18 or 1.0)  # all zero: an axis of 0..1
            ax.set_title(f"{label}\n{shape}", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
        for ax in row_axes[len(shapes):]:
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot(loss_rows, linear_rows, path, title):
    """The figure as a PNG; False (and no file) without matplotlib or without a row to draw."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    fig = figure(loss_rows, linear_rows, title)
    if fig is None:
        return False
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def run(args):
    check_arguments(args)
    bench_loss = _load("bench_loss")
    bench_linear = None if args.no_linear else _load("bench_linear")
    os.makedirs(args.output_dir, exist_ok=True)
    common = _common_argv(args)
    print("## PSFT loss: fused vs reference", flush=True)
    loss_rows = bench_loss.main(common + (["--shapes", args.shapes] if args.shapes else []))
    linear_rows = []
    if bench_linear is not None:
        print("\n## fused linear PSFT loss vs materialized logits", flush=True)
        linear_rows = bench_linear.main(
            common + (["--shapes", args.linear_shapes] if args.linear_shapes else []))
    torch = bench_loss.torch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = bench_loss.environment(device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    where = env.get("gpu") or f"CPU ({env['cpu']}, {env['cpu_threads']} threads)"
    title = f"psft bench: {where}, {dtype}, torch {env['torch']}, {env['date']}"
    png = os.path.join(args.output_dir, "bench.png")
    plotted = plot(loss_rows, linear_rows, png, title)
    json_path = os.path.join(args.output_dir, "bench.json")
    write_json_atomic(json_path, dict(environment=env, dtype=dtype, loss=loss_rows,
                                      linear=linear_rows))
    print(f"\nwrote {json_path}" + (f" and {png}" if plotted else ""))
    return 0
