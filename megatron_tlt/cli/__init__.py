"""`megatron-tlt` command line: one subcommand per job.

    megatron-tlt demo [CONFIG.yaml] [key=value ...]        the tiny CPU pipeline (the README's main command)
    megatron-tlt train CONFIG.yaml [key=value ...]         GRPO training (also under torchrun)
    megatron-tlt plot RUN_DIR                              PNGs of a run's metrics
    megatron-tlt convert hf-to-tlt --input HF_DIR --output CKPT_DIR
    megatron-tlt convert tlt-to-hf --input CKPT_DIR --output HF_DIR
    megatron-tlt generate --model PATH --prompts FILE.jsonl --out FILE.jsonl [--n N] [--temperature T] ...
    megatron-tlt train-drafter --model PATH --data FILE.jsonl --out DRAFTER_DIR [--steps N] [--lr LR] ...
    megatron-tlt export-drafter --drafter DRAFTER_DIR --policy MODEL_PATH --out HF_DIR
    megatron-tlt plan CONFIG.yaml [key=value ...] [--device-gb 80] [--world-size N]   per-rank memory, fits or not

Each subcommand imports its module only when it runs, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import sys

from megatron_tlt.cli.logs import setup_logging


def _config_args(args) -> tuple:
    """`[CONFIG.yaml] [key=value ...]`: a first argument with '=' is an override, not a file."""
    if args.config is not None and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, args.overrides


def _demo(args) -> int:
    from megatron_tlt.cli.demo import run_demo

    run_demo(*_config_args(args))
    return 0


def _train(args) -> int:
    from megatron_tlt.config import load_config
    from megatron_tlt.train import train

    train(load_config(*_config_args(args)))
    return 0


def _plot(args) -> int:
    from megatron_tlt.plot import plot_run

    for path in plot_run(args.run_dir):
        print(f"wrote {path}")
    return 0


def _in_parallel_state(run):
    """`run()` for a command that loads a model: in the initialised parallel state (the caller's), else in a
    default one (torchrun's environment, or a single process) started here and destroyed afterwards."""
    from megatron_tlt.parallel import destroy_parallel, get_parallel_state, init_parallel

    try:
        get_parallel_state()
        started = False
    except RuntimeError:
        init_parallel()
        started = True
    try:
        return run()
    finally:
        if started:
            destroy_parallel()


def _convert(args) -> int:
    from megatron_tlt.checkpoint import convert

    if args.direction == "hf-to-tlt":
        _in_parallel_state(lambda: convert.hf_to_tlt(args.input, args.output))
    else:
        convert.tlt_to_hf(args.input, args.output)
    print(f"wrote {args.output}")
    return 0


def _generate(args) -> int:
    from megatron_tlt.cli.generate import run_generate

    return _in_parallel_state(lambda: run_generate(args))


def _train_drafter(args) -> int:
    from megatron_tlt.cli.train_drafter import run_train_drafter

    return _in_parallel_state(lambda: run_train_drafter(args))


def _export_drafter(args) -> int:
    from megatron_tlt.checkpoint.loading import load_model
    from megatron_tlt.drafter.io import export_drafter
    from megatron_tlt.parallel import get_parallel_state

    _in_parallel_state(lambda: export_drafter(args.drafter, args.out, load_model(args.policy, tp_group=get_parallel_state().tp_group)))
    print(f"wrote {args.out}")
    return 0


def _plan(args) -> int:
    from megatron_tlt.cli.plan import run_plan

    return _in_parallel_state(lambda: run_plan(*_config_args(args), args.device_gb, args.world_size))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-tlt", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the tiny end-to-end pipeline on CPU")
    d.add_argument("config", nargs="?", default=None, help="YAML preset (default: the embedded tiny config)")
    d.add_argument("overrides", nargs="*", help="key=value config overrides")
    d.set_defaults(fn=_demo)

    t = sub.add_parser("train", help="GRPO-family RL training (single process or under torchrun)")
    t.add_argument("config", nargs="?", default=None, help="YAML preset (examples/configs/)")
    t.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. run.steps=100 run.resume=true")
    t.set_defaults(fn=_train)

    pl = sub.add_parser("plot", help="write reward / response-length / time-breakdown PNGs of a run")
    pl.add_argument("run_dir")
    pl.set_defaults(fn=_plot)

    c = sub.add_parser("convert", help="convert checkpoints between Hugging Face and megatron_tlt")
    c.add_argument("direction", choices=["hf-to-tlt", "tlt-to-hf"])
    c.add_argument("--input", required=True)
    c.add_argument("--output", required=True)
    c.set_defaults(fn=_convert)

    g = sub.add_parser("generate", help="sample completions for a jsonl of prompts with the rollout engine")
    g.add_argument("--model", required=True, help="HF model directory or megatron_tlt checkpoint (with tokenizer files)")
    g.add_argument("--prompts", required=True, help='jsonl: one {"prompt": ...} or {"input_ids": [...]} per line')
    g.add_argument("--out", required=True, help="jsonl written with one row per sample")
    g.add_argument("--drafter", default=None, help="drafter checkpoint for speculative decoding")
    g.add_argument("--spec", choices=["off", "chain", "tree", "adaptive"], default="off", help="speculative decoding mode")
    g.add_argument("--drafts", choices=["coupled", "topk"], default="coupled",
                   help="SD drafts: first children under the target's position noise (coupled), or the drafter's top-k")
    g.add_argument("--precision", choices=["auto", "fp8"], default="auto",
                   help="fp8: the linears' weights in e4m3 with block scales, activations quantized per token (FP8 rollouts)")
    g.add_argument("--fp8-gemm", choices=["auto", "scaled_mm", "triton", "reference"], default="auto",
                   help="FP8 GEMM path (auto: the fastest this device has; the path taken is logged)")
    g.add_argument("--batch-invariant", action="store_true",
                   help="attention per query in fp32: bf16 samples identical whatever the batch or SD (slower)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-seq-len", type=int, default=None, help="prompt + response tokens (default: the context window)")
    g.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV-cache memory: sets how many requests run at once")
    g.add_argument("--cuda-graphs", choices=["auto", "off", "eager", "capture"], default="auto",
                   help="decode/verify as CUDA graphs (auto: on a GPU)")
    g.set_defaults(fn=_generate)

    t = sub.add_parser("train-drafter", help="warm up an EAGLE drafter offline on policy samples")
    t.add_argument("--model", required=True, help="HF model directory or megatron_tlt checkpoint (the policy)")
    t.add_argument("--data", required=True, help='jsonl: {"input_ids": [...], "response_ids": [...]} per line; '
                   "rows without response_ids get a response generated by the policy")
    t.add_argument("--out", required=True, help="drafter directory to write")
    t.add_argument("--steps", type=int, default=500, help="trainer steps (one packed micro-batch each)")
    t.add_argument("--arch", choices=("eagle3", "eagle"), default="eagle3", help="drafter head (drafter.arch)")
    t.add_argument("--ttt-steps", type=int, default=3, help="eagle3: training-time test steps (drafter.ttt_steps)")
    t.add_argument("--ttt-hidden-weight", type=float, default=1.0,
                   help="eagle3: weight of the auxiliary hidden-state regression (drafter.ttt_hidden_weight; 0: EAGLE-3's loss)")
    t.add_argument("--draft-vocab-size", type=int, default=None,
                   help="eagle3: draft over the N most frequent tokens of the data (own LM head, exported with d2t / t2d)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=0.5)
    t.add_argument("--max-tokens-per-micro-batch", type=int, default=4096)
    t.add_argument("--max-new-tokens", type=int, default=256, help="response limit for generated responses")
    t.add_argument("--temperature", type=float, default=0.0, help="for generated responses; 0 = greedy")
    t.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV-cache memory for generation")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=50, help="print mean loss and top-1 agreement every N steps")
    t.set_defaults(fn=_train_drafter)

    x = sub.add_parser("export-drafter", help="write an EAGLE-3 drafter as the directory SGLang and vLLM serve")
    x.add_argument("--drafter", required=True, help="drafter directory (from train-drafter or a run)")
    x.add_argument("--policy", required=True, help="the policy it drafts for (HF dir or megatron_tlt checkpoint): its embedding and LM head")
    x.add_argument("--out", required=True, help="HF directory to write (config.json + model.safetensors)")
    x.set_defaults(fn=_export_drafter)

    m = sub.add_parser("plan", help="per-rank memory of a run (weights, gradients, optimizer, activations, rollout) and whether it fits")
    m.add_argument("config", nargs="?", default=None, help="YAML preset (examples/configs/)")
    m.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. parallel.pipeline_parallel_size=2")
    m.add_argument("--device-gb", type=float, default=80.0, help="memory of one device (GiB)")
    m.add_argument("--world-size", type=int, default=None, help="devices in all (default: TP x PP, one DP replica)")
    m.set_defaults(fn=_plan)
    return p


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    # Our own errors (bad config, bad checkpoint, bad data) are one clear line, not a traceback.
    from megatron_tlt.errors import UserError

    try:
        return args.fn(args)
    except UserError as e:
        print(f"megatron-tlt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
