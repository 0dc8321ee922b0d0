"""scion sft: instruction-tune a pretrained run (or an imported Hugging Face model)."""

from __future__ import annotations

import sys
from pathlib import Path

from scion.cli.options import (
    add_progress_flag,
    base_parser,
    explicit_train_fields,
    parse_config,
    progress_choice,
    refuse_out_with_resume,
    stopped_early,
)
from scion.errors import ScionError
from scion.run import is_run, load_config

EXAMPLES = """
examples:
  scion sft runs/a --data chats.jsonl --out runs/a-sft              # ChatML, loss on answers, packed
  scion sft runs/a --data alpaca.parquet --out runs/a-sft --lora-rank 8 --lora-targets q_proj,v_proj
  scion sft runs/a --data hf:tatsu-lab/alpaca --out runs/a-sft --chat-template alpaca --max-steps 500
  scion sft --resume runs/a-sft                                      # continue from the latest checkpoint
  scion chat runs/a-sft                                              # talk to it

Training flags are those of scion pretrain (--max-steps, --lr, --micro-batch-size, --checkpoint-every,
--seq-len, ...), starting from the source run's own settings with a tenth of its learning rate
(its full rate with LoRA) and, unless --max-steps is given, --epochs passes over the data.
"""



def main(argv: list[str]) -> int:
    p = base_parser("scion sft", "Fine-tune a pretrained model on instructions or conversations." + EXAMPLES)
    p.add_argument(
        "source", nargs="?", help="scion run directory or checkpoint folder (or a Hugging Face model)"
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="Alpaca or conversation JSONL/JSON/Parquet files, folders, a saved `datasets` folder, hf:NAME",
    )
    p.add_argument("--out", help="run directory for the fine-tuned model")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this SFT run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--config", default=None, help="YAML file with model/data/train sections")
    p.add_argument(
        "--chat-template",
        default=None,
        help="chatml, alpaca or a .jinja file (default: the tokenizer's own template, else chatml)",
    )
    p.add_argument("--stop-token", default=None, help="with a .jinja template: the token that ends an answer")
    p.add_argument(
        "--train-on",
        choices=["assistant", "all"],
        default="assistant",
        help="loss on the assistant's turns only (default), or on every token",
    )
    p.add_argument(
        "--layout",
        choices=["pack", "pad"],
        default="pack",
        help="pack several conversations per sequence (no attention across them), or one per row",
    )
    p.add_argument(
        "--too-long",
        choices=["truncate", "drop"],
        default="truncate",
        help="conversations longer than the context: cut them, or leave them out (both reported)",
    )
    p.add_argument(
        "--bad-records",
        choices=["skip", "error"],
        default="skip",
        help="records missing fields: skip and report them with their line, or refuse the data",
    )
    p.add_argument(
        "--epochs", type=float, default=3.0, help="passes over the data when --max-steps is not given"
    )
    p.add_argument(
        "--lora-rank", type=int, default=0, help="train rank-R LoRA adapters instead of all weights"
    )
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x rank)")
    p.add_argument(
        "--lora-targets",
        default="q_proj,v_proj",
        help="comma-separated projections to adapt (q,k,v,o,gate,up,down _proj)",
    )
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument(
        "--lora-train-embeddings",
        choices=["auto", "yes", "no"],
        default="auto",
        help="with LoRA, also train the embedding and output layer (auto: when tokens were added)",
    )
    add_progress_flag(p)

    pre, _ = p.parse_known_args(argv)
    preloaded = None
    if pre.help:
        base = None
    elif pre.resume:
        if not is_run(pre.resume):
            raise ScionError(f"{pre.resume}: not a scion run (no config.yaml); nothing to resume")
        refuse_out_with_resume(pre.out, pre.resume)
        base = load_config(pre.resume)
    else:
        if not pre.source:
            raise ScionError("scion sft needs a source run: scion sft RUN_DIR --data FILE --out RUN_DIR2")
        if not pre.out:
            raise ScionError("scion sft needs --out, the run directory for the fine-tuned model")
        from scion.sft.recipe import fine_tuning_config

        base, preloaded = _source_config(pre.source)
        base = fine_tuning_config(base, lora=pre.lora_rank > 0)
    args, cfg = parse_config(p, argv, base=base)

    from scion.sft.recipe import SFTConfig, load_options, sft

    if args.resume:
        out = Path(args.resume)
        options = load_options(out)
        if args.data:
            raise ScionError("--resume reads the data the run started with; drop --data")
    else:
        out = Path(args.out)
        train_embeddings = {"auto": None, "yes": True, "no": False}[args.lora_train_embeddings]
        options = SFTConfig(
            source=str(args.source),
            data=list(args.data or []),
            template=args.chat_template,
            stop_token=args.stop_token,
            train_on=args.train_on,
            layout=args.layout,
            too_long=args.too_long,
            bad_records=args.bad_records,
            epochs=args.epochs,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
            lora_dropout=args.lora_dropout,
            lora_train_embeddings=train_embeddings,
        )
    progress = progress_choice(args)
    run_dir, trainer = sft(
        cfg,
        options,
        out,
        resume=bool(args.resume),
        overwrite=args.overwrite,
        explicit=explicit_train_fields(argv),
        progress=progress,
        preloaded=preloaded,
    )
    if trainer.world.main:
        state = trainer.state
        val = f", best val loss {state.best_val_loss:.4f}" if state.best_val_loss is not None else ""
        print(f"\nrun directory: {run_dir} (step {state.step}{val})", file=sys.stderr)
        print(f"talk to it: scion chat {run_dir}", file=sys.stderr)
    from scion.train.parallel import shutdown

    shutdown()
    if trainer.stop_reason:
        return stopped_early(trainer.stop_reason, trainer.resume_hint)
    return 0


def _source_config(source: str):
    """The source's config (the base the training flags override), and the model itself when it
    had to be imported to know it."""
    from scion.run import is_scion_source, resolve_checkpoint

    path = Path(source)
    if is_scion_source(path):
        run_dir, _ = resolve_checkpoint(path)
        return load_config(run_dir), None
    if not path.exists() and not source.startswith("hf:"):
        raise ScionError(f"{source}: no such run, checkpoint or Hugging Face model folder")
    from scion.source import load_source
    from scion.train.device import resolve_device

    preloaded = load_source(source, resolve_device("auto"))
    return preloaded.config, preloaded

