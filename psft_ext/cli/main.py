"""``psft``: the command line of psft_ext (also ``python -m psft_ext``)."""

import argparse
import sys

from .common import CLIError

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
  psft demo  [--quick] [--out DIR]                   SFT vs PSFT on a tiny model, with a report
  psft train --model DIR --data FILE.jsonl --output-dir DIR [--loss psft|sft] [--resume]
  psft bench [--device cpu|cuda] [--shapes NxV,...]  fused loss vs PyTorch (source checkout)

'psft COMMAND --help' lists each command's options."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="psft", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{demo,train,bench}")

    # ------------------------------------------------------------------------------ demo
    demo = sub.add_parser(
        "demo", help="SFT vs PSFT on a tiny model pre-trained on synthetic tasks (CPU)",
        description="Pre-trains a tiny Llama on synthetic tasks (copy, reverse, sort, addition), "
                    "fine-tunes two copies on a new task with SFT and with PSFT (same data, "
                    "optimizer and steps), measures in-domain accuracy, retention of the "
                    "pre-training tasks, token entropy and PSFT's clip fraction, and writes "
                    "report.md, curves.png and results.json. No downloads.")
    demo.add_argument("--quick", action="store_true",
                      help="a shorter run (about a minute on 2 CPU cores; what CI runs)")
    demo.add_argument("--out", default="psft_demo_out", help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--threads", type=int, default=None,
                      help="torch CPU threads (default: 1, fastest for this tiny model)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    # ------------------------------------------------------------------------------ train
    train = sub.add_parser(
        "train", help="fine-tune a local causal LM on a local JSONL file with PSFT or SFT",
        description="Fine-tunes a model from a local folder (AutoModelForCausalLM.from_pretrained, "
                    "with its tokenizer) on a local JSONL file whose lines are "
                    "{\"prompt\": ..., \"completion\": ...} or chat {\"messages\": [...]}; the "
                    "loss covers the completion (the assistant turns for chats). Checkpoints go to "
                    "OUTPUT_DIR/checkpoints; the finished model and metrics.json to "
                    "OUTPUT_DIR/final, which appears (by an atomic rename) only when the run "
                    "completed.")
    train.add_argument("--model", required=True, help="local model folder (config, weights, "
                                                      "tokenizer)")
    train.add_argument("--data", required=True, help="local JSONL training file")
    train.add_argument("--output-dir", required=True, help="where checkpoints and the final "
                                                           "model go")
    train.add_argument("--loss", choices=("psft", "sft"), default="psft",
                       help="psft (default) or sft (= PSFT with one step per old policy, "
                            "exactly SFT)")
    train.add_argument("--clip-low", type=float, default=0.2, help="default: %(default)s "
                                                                   "(authors' recipe)")
    train.add_argument("--clip-high", type=float, default=0.28, help="default: %(default)s")
    train.add_argument("--steps-per-old-policy", type=int, default=8,
                       help="optimizer steps per old policy (default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=8,
                       help="sequences per micro-batch (default: %(default)s, the authors' "
                            "mini-batch)")
    train.add_argument("--grad-accum", type=int, default=1,
                       help="micro-batches per optimizer step (default: %(default)s)")
    train.add_argument("--lr", type=float, default=1e-6, help="default: %(default)s")
    train.add_argument("--warmup-steps", type=int, default=10, help="default: %(default)s")
    train.add_argument("--weight-decay", type=float, default=0.1, help="default: %(default)s")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="default: %(default)s")
    train.add_argument("--epochs", type=float, default=1.0, help="default: %(default)s")
    train.add_argument("--max-steps", type=int, default=-1,
                       help="stop after this many optimizer steps (default: epochs decide)")
    train.add_argument("--max-length", type=int, default=None,
                       help="longest tokenized example allowed (default: the model's "
                            "max_position_embeddings, else 2048); longer ones are an error")
    train.add_argument("--save-steps", type=int, default=100,
                       help="checkpoint every this many steps (default: %(default)s)")
    train.add_argument("--logging-steps", type=int, default=10, help="default: %(default)s")
    train.add_argument("--seed", type=int, default=42, help="default: %(default)s")
    train.add_argument("--resume", action="store_true",
                       help="continue from the last checkpoint in OUTPUT_DIR/checkpoints")
    train.add_argument("--bf16", action="store_true",
                       help="bfloat16 mixed precision (autocast; the weights stay float32)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    # ------------------------------------------------------------------------------ bench
    bench = sub.add_parser(
        "bench", help="benchmark the fused loss (and fused linear loss) vs PyTorch",
        description="Runs benchmarks/bench_loss.py and benchmarks/bench_linear.py of the psft_ext "
                    "source tree on this device: time, peak memory and ratios of the fused "
                    "kernels vs the PyTorch reference (and Liger / torch.compile where "
                    "installed, on CUDA). Needs a source checkout (the benchmarks/ folder next to "
                    "psft_ext/, e.g. an editable install): the benchmark scripts are not part of "
                    "the installed package. Writes bench.json and bench.png to --out.")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    bench.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                       help="default: float32 on CPU, bfloat16 on CUDA")
    bench.add_argument("--shapes", default=None,
                       help="loss shapes, comma-separated NxV (default: the script's)")
    bench.add_argument("--linear-shapes", default=None,
                       help="fused-linear shapes, comma-separated NxHxV (default: the script's)")
    bench.add_argument("--no-linear", action="store_true", help="skip the fused-linear benchmark")
    bench.add_argument("--reps", type=int, default=None, help="timed runs per measurement")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    bench.add_argument("--out", default="psft_bench_out", help="output folder (default: "
                                                               "%(default)s)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__
        print(f"psft_ext {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "demo":
            from . import demo
            return demo.run(args)
        if args.command == "train":
            from . import train
            return train.run(args)
        from . import bench
        return bench.run(args)
    except CLIError as err:
        print(f"psft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"psft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
