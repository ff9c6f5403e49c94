"""``deploykit train``: pretrain a preset on the embedded corpus or your own text."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXAMPLES = """\
examples:
  deploykit train --preset micro --data embedded --time-budget 120 --out runs/micro   # the demo
  deploykit train --preset micro --data embedded --steps 2000 --out runs/micro
  deploykit train --preset nano --steps 200 --out runs/nano --json
  deploykit train --preset micro-moe --steps 500 --bf16 --out runs/micro-moe
  deploykit train --preset small --data 'corpus/*.txt' --data extra.jsonl --out runs/small
  deploykit train --out runs/micro --resume                  # continue from the last checkpoint
  deploykit train --out runs/micro --resume --steps 4000     # extend a finished run
  torchrun --nproc_per_node 2 -m deploykit train --preset micro --steps 500 --out runs/ddp
  torchrun --nproc_per_node 2 -m deploykit train --strategy fsdp --grad-checkpointing --out runs/fsdp
  torchrun --nproc_per_node 1 -m deploykit train --out runs/fsdp --resume   # another world size
  deploykit train --init runs/micro --data 'domain/*.txt' --lr 3e-4 --warmup 20 --steps 200 --out runs/domain
  deploykit train --preset small --batch-size 8 --memory-report --out /tmp/unused  # measure, then exit

The folder --out holds the latest checkpoint (a Hugging Face folder: transformers'
AutoModelForCausalLM and `deploykit generate` load it), trainer_state.{json,safetensors}
for --resume, train_log.jsonl (one JSON per step and per eval) and loss.png.
With --resume, omitted options are taken from the saved run.

Under torchrun (gloo on CPU, nccl on GPU, chosen automatically) --batch-size is the global batch,
split evenly across ranks, so a run's numbers do not depend on the world size and --resume may
use another one; only rank 0 logs and writes --out (which every node must see)."""

# Flag -> TrainConfig field. Defaults are SUPPRESSed so the namespace holds only what the user typed:
# a resumed run fills everything else from its checkpoint, a new run from TrainConfig's defaults.
_FIELDS = ("preset", "data", "tokenizer", "vocab_size", "steps", "batch_size", "block_size", "grad_accum",
           "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "bf16", "eval_interval", "eval_iters",
           "checkpoint_interval", "seed", "val_fraction", "time_budget", "stop_at", "threads", "peak_flops",
           "sample_prompt", "sample_tokens", "fp16", "grad_checkpointing", "strategy", "init")


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..model.config import PRESETS
    from ..train.config import STRATEGIES, TrainConfig

    d = TrainConfig.__dataclass_fields__  # defaults for the help text, without importing torch

    def default(name: str) -> str:
        return f"(default {d[name].default})"

    S = argparse.SUPPRESS
    p = sub.add_parser(
        "train", help="pretrain a model (one process, or many under torchrun)",
        description="Hold out validation documents, train a tokenizer on the rest (unless --tokenizer), pack "
        "both into blocks, and train a preset with AdamW, warmup + cosine lr, grad clipping and accumulation. "
        "Logs loss, lr, tokens/s and MFU; evaluates validation loss/perplexity; checkpoints atomically; "
        "--resume continues bit for bit. Ends with the eval perplexity and a greedy sample.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run folder: latest checkpoint, state, log, loss.png")
    g = p.add_argument_group("model and data")
    g.add_argument("--preset", default=S, metavar="NAME",
                   help=f"model preset: {', '.join(PRESETS)} {default('preset')}")
    g.add_argument("--data", action="append", default=S, metavar="SPEC",
                   help="'embedded' (generated default corpus), a text/JSONL file, a folder, or a quoted glob; "
                        "repeat to combine (default embedded)")
    g.add_argument("--init", type=Path, default=S, metavar="CHECKPOINT",
                   help="continued pretraining: start from this checkpoint's weights and tokenizer (fresh optimizer, "
                        "warmup); reports perplexity on its original held-out set and on --data's, before and after")
    g.add_argument("--tokenizer", type=Path, default=S, metavar="FOLDER",
                   help="use this tokenizer.json folder instead of training one on the data")
    g.add_argument("--vocab-size", type=int, default=S, help="BPE vocabulary to train (default: the preset's)")
    g.add_argument("--val-fraction", type=float, default=S, help=f"documents held out for eval, before the tokenizer sees any {default('val_fraction')}")
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=int, default=S, help=f"optimizer steps; the cosine ends here {default('steps')}")
    g.add_argument("--time-budget", type=float, default=S, metavar="SECONDS",
                   help="wall-clock budget for the whole command (from process start): the schedule is fitted "
                        "to a timed probe, re-fitted once to the first measured steps, and the run stops cleanly "
                        "(with a checkpoint) if it still runs late")
    g.add_argument("--stop-at", type=int, default=S, metavar="STEP",
                   help="stop after this step with a checkpoint, keeping the --steps schedule; --resume continues")
    g.add_argument("--batch-size", type=int, default=S, help=f"blocks per micro-batch {default('batch_size')}")
    g.add_argument("--block-size", type=int, default=S, help=f"tokens per block {default('block_size')}")
    g.add_argument("--grad-accum", type=int, default=S, help=f"micro-batches per step {default('grad_accum')}")
    g.add_argument("--lr", type=float, default=S, help=f"peak learning rate {default('lr')}")
    g.add_argument("--min-lr", type=float, default=S, help="final learning rate (default lr/10)")
    g.add_argument("--warmup", type=int, default=S, help="linear warmup steps (default 5%% of the schedule)")
    g.add_argument("--weight-decay", type=float, default=S,
                   help=f"AdamW decay on matrices; never on norms, biases, embeddings {default('weight_decay')}")
    g.add_argument("--grad-clip", type=float, default=S, help=f"max grad norm, 0 = off {default('grad_clip')}")
    g.add_argument("--seed", type=int, default=S, help=f"init, split and batch order {default('seed')}")
    g = p.add_argument_group("run")
    g.add_argument("--bf16", action="store_true", default=S, help="bf16 autocast (fp32 weights and loss)")
    g.add_argument("--fp16", action="store_true", default=S,
                   help="fp16 autocast with a GradScaler (CUDA only, under torchrun on a GPU)")
    g.add_argument("--grad-checkpointing", action="store_true", default=S,
                   help="recompute each block's activations in the backward pass: less memory, about 1/3 more compute")
    g.add_argument("--strategy", choices=STRATEGIES, default=S,
                   help="under torchrun: ddp (replicated model, averaged gradients) or fsdp (FSDP2 fully_shard: "
                        f"parameters, gradients and optimizer state sharded) {default('strategy')}")
    g.add_argument("--memory-report", action="store_true",
                   help="measure one training step's memory (parameters, gradients, optimizer state, activations) "
                        "for these settings, print it and exit without training")
    g.add_argument("--threads", type=int, default=S, help="torch threads (default: all cores)")
    g.add_argument("--eval-interval", type=int, default=S, help=f"steps between evals, 0 = end only {default('eval_interval')}")
    g.add_argument("--eval-iters", type=int, default=S, help=f"val batches per eval, 0 = all {default('eval_iters')}")
    g.add_argument("--checkpoint-interval", type=int, default=S,
                   help=f"steps between checkpoints, 0 = end only {default('checkpoint_interval')}")
    g.add_argument("--peak-flops", type=float, default=S,
                   help="peak FLOP/s for MFU (default: measured at start-up by timing a 2048³ matmul "
                        "in the training dtype on the threads used)")
    g.add_argument("--prompt", dest="sample_prompt", default=S,
                   help=f"prompt of the greedy sample printed at the end {default('sample_prompt')!s}")
    g.add_argument("--sample-tokens", type=int, default=S, help=f"tokens of that sample {default('sample_tokens')}")
    g = p.add_argument_group("output folder")
    g.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    g.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print a summary JSON on stdout (progress goes to stderr)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def build_config(args: argparse.Namespace):
    """TrainConfig from the flags the user gave; on --resume the rest comes from the checkpoint."""
    from ..train.config import TrainConfig

    given = {f: getattr(args, f) for f in _FIELDS if hasattr(args, f)}
    if "data" in given:
        given["data"] = given["data"][0] if len(given["data"]) == 1 else tuple(given["data"])
    if args.resume:
        saved = _saved_config(args.out)
        return TrainConfig.from_dict({**saved, **given, "out": args.out, "resume": True, "force": False})
    return TrainConfig(out=args.out, force=args.force, **given)


def _saved_config(out: Path) -> dict:
    from ..errors import CheckpointError
    from ..train.config import STATE_JSON

    path = out / STATE_JSON
    if not path.is_file():
        what = "does not exist" if not out.exists() else f"has no {STATE_JSON}"
        raise CheckpointError(f"--resume: {out} {what}",
                              hint="point --out at a folder written by `deploykit train`, or drop --resume")
    try:
        saved = json.loads(path.read_text())["train_config"]
        if not isinstance(saved, dict):
            raise TypeError(f"train_config is {type(saved).__name__}, not an object")
        return saved
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable training state ({e})",
                              hint="resume from an intact run folder, or start over with --force") from e


def _process_start() -> float | None:
    """``time.perf_counter()`` reading of this process's start when the process IS the command
    (``deploykit ...`` or ``python -m deploykit ...``); None otherwise, or where /proc does not say.

    --time-budget is for the whole command, and Python plus torch take a second or two to import
    before ``run`` is called. /proc/self/stat gives the start in clock ticks since boot, counted on
    CLOCK_BOOTTIME. Called in-process (``main([...])`` from tests or a notebook) the process is older
    than the command, so the budget then counts from the call.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    entry = spec.name if spec is not None else Path(sys.argv[0] if sys.argv else "").name
    if entry not in ("deploykit", "deploykit.__main__"):
        return None
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5); `fields` starts at 3
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, IndexError, ValueError, AttributeError):  # not Linux
        return None
    return time.perf_counter() - age if age >= 0 else None


def run(args: argparse.Namespace) -> int:
    from ..train import pretrain

    started = _process_start()
    if args.memory_report:
        return _memory_report(args)
    cfg = build_config(args)
    # With --json, stdout carries exactly one JSON document; human lines go to stderr.
    result = pretrain(cfg, progress=not args.no_progress, stream=sys.stderr if args.json else sys.stdout,
                      started=started)
    if args.json and result.rank == 0:
        summary = result.to_dict()
        summary["seconds"] = round(summary["seconds"], 2)
        print(json.dumps(summary))
    # Interrupted (SIGINT/SIGTERM) but saved: the shell's code for it, so scripts do not take it for done.
    return 130 if result.stopped == "interrupted" else 0


def _memory_report(args: argparse.Namespace) -> int:
    """--memory-report: one measured step of the configured model; nothing is trained or written."""
    from ..train.config import TrainConfig
    from ..train.memory import measure_memory

    given = {f: getattr(args, f) for f in _FIELDS if hasattr(args, f) and f not in ("data", "tokenizer")}
    cfg = TrainConfig(out=args.out, **given)
    model_cfg = cfg.model_config()
    if cfg.vocab_size is not None and cfg.init is None:  # the padded size a run with this BPE size would train
        model_cfg = model_cfg.replace(vocab_size=-(-cfg.vocab_size // 64) * 64)
    report = measure_memory(model_cfg, batch_size=cfg.batch_size, block_size=cfg.block_size,
                            grad_checkpointing=cfg.grad_checkpointing, bf16=cfg.bf16, seed=cfg.seed)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print("\n".join(report.lines()))
    return 0
