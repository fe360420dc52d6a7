"""``psft``: the command line of psft_ext (also ``python -m psft_ext``)."""

import argparse
import sys

from .common import DEFAULT_SEED, CLIError

DESCRIPTION = """\
psft_ext: a fused Proximal SFT (PSFT) loss for PyTorch. PSFT is SFT with PPO's clipped trust
region against an "old" policy (Zhu et al., ICLR 2026), which the authors report learns the new
task like SFT while keeping more of the model's entropy and prior capabilities. The demo below
tests that on a tiny model and reports what it finds.

Start here (CPU, no downloads, a few minutes; --quick for about one):

    psft demo

which pre-trains a tiny model on synthetic tasks, fine-tunes copies with SFT and with PSFT, and
writes a report (table, plots, JSON) to psft_demo_out/."""

EPILOG = """\
commands:
  psft demo  [--quick] [--seeds N] [--output-dir DIR]   SFT vs PSFT on a tiny model, a report
  psft train --model_name_or_path DIR --train_file FILE.jsonl --output_dir DIR [--loss psft|sft]
             [any TrainingArguments flag] [--resume_from_checkpoint last|DIR]
  psft bench [--device cpu|cuda] [--shapes NxV,...]     fused loss vs PyTorch (source checkout)

'psft COMMAND --help' lists each command's options."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``psft demo: error: ...``, status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ('{self.prog} --help' lists the "
                     f"options)\n")


def build_parser():
    parser = Parser(
        prog="psft", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{demo,train,bench}")

    # ------------------------------------------------------------------------------ demo
    demo = sub.add_parser(
        "demo", help="SFT vs PSFT on a tiny model in the paper's regime, several seeds (CPU)",
        description="Pre-trains a tiny Llama on synthetic tasks (copy, reverse, sort, addition), "
                    "then fine-tunes copies of it on a small fixed set of a new task for several "
                    "epochs, the PSFT paper's regime: SFT at two learning rates and PSFT. "
                    "Measures in-domain, out-of-domain and prior-task accuracy, token entropy "
                    "and PSFT's clip fraction over several seeds, and writes report.md, "
                    "trajectories.png, curves.png and results.json. No downloads.")
    demo.add_argument("--quick", action="store_true",
                      help="a shorter run with 2 seeds (about a minute on 2 CPU cores; what CI "
                           "runs)")
    demo.add_argument("--seeds", type=int, default=None,
                      help="number of seeds, at least 2 (default: 3; 2 with --quick)")
    add_output_dir(demo, "psft_demo_out")
    demo.add_argument("--seed", type=int, default=DEFAULT_SEED,
                      help="first seed; the others follow it (default: %(default)s)")
    demo.add_argument("--threads", type=int, default=None,
                      help="torch CPU threads (default: 1, fastest for this tiny model)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    # ------------------------------------------------------------------------------ train
    # Parsed by psft_ext.cli.train with transformers' HfArgumentParser; listed here for --help.
    sub.add_parser(
        "train", add_help=False,
        help="fine-tune a local causal LM on a local JSONL file with PSFT or SFT (every "
             "TrainingArguments flag; psft train --help)")

    # ------------------------------------------------------------------------------ bench
    bench = sub.add_parser(
        "bench", help="benchmark the fused loss (and fused linear loss) vs PyTorch",
        description="Runs benchmarks/bench_loss.py and benchmarks/bench_linear.py of the psft_ext "
                    "source tree on this device: time, peak memory and ratios of the fused "
                    "kernels vs the PyTorch reference (and Liger / torch.compile where "
                    "installed, on CUDA). Needs a source checkout (the benchmarks/ folder next to "
                    "psft_ext/, e.g. an editable install): the benchmark scripts are not part of "
                    "the installed package. Writes bench.json and bench.png to --output-dir.")
    bench.add_argument("--device", default=None, choices=("cpu", "cuda"),
                       help="default: cuda if available, else cpu")
    bench.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                       help="default: float32 on CPU, bfloat16 on CUDA")
    bench.add_argument("--shapes", default=None,
                       help="loss shapes, comma-separated NxV (default: the script's)")
    bench.add_argument("--linear-shapes", default=None,
                       help="fused-linear shapes, comma-separated NxHxV (default: the script's)")
    bench.add_argument("--no-linear", action="store_true", help="skip the fused-linear benchmark")
    bench.add_argument("--reps", type=int, default=None,
                       help="timed runs per measurement, at least 1 (default: the script's)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    add_output_dir(bench, "psft_bench_out")
    return parser


def add_output_dir(parser, default):
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default=default,
                        help="output folder (default: %(default)s)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # psft train has transformers' own parser (every TrainingArguments flag).
        from . import train
        return _guarded("train", lambda: train.main(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__
        print(f"psft_ext {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from . import demo
        return _guarded("demo", lambda: demo.run(args))
    from . import bench
    return _guarded("bench", lambda: bench.run(args))


def _guarded(command, fn):
    """Runs a subcommand: a CLIError is one line on stderr and exit status 2."""
    try:
        return fn()
    except CLIError as err:
        print(f"psft {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"psft {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
