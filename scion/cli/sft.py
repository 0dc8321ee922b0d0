"""scion sft: instruction-tune a pretrained run (or an imported Hugging Face model)."""

from __future__ import annotations

from pathlib import Path

from scion.cli.options import (
    add_run_flags,
    base_parser,
    explicit_train_fields,
    finish_training,
    parse_recipe,
    progress_choice,
    refuse_changed_options,
    refuse_out_with_resume,
)
from scion.config import RunConfig
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
    add_run_flags(p, out="run directory for the fine-tuned model", run="SFT run")
    p.add_argument("--config", default=None, help="YAML file with model/data/train sections")

    from scion.sft.options import SFTConfig, fine_tuning_config, load_options

    pre, _ = p.parse_known_args(argv)
    if pre.help:
        parse_recipe(p, argv, SFTConfig())
    preloaded = None  # the source model, when it had to be loaded to read its settings
    if pre.resume:
        if not is_run(pre.resume):
            raise ScionError(f"{pre.resume}: not a scion run (no config.yaml); nothing to resume")
        refuse_out_with_resume(pre.out, pre.resume)
        saved = load_options(pre.resume)
        args, cfg, options = parse_recipe(p, argv, saved, base=load_config(pre.resume))
        refuse_changed_options(options, saved, "--resume reads the data and options the run started with")
        out = Path(pre.resume)
    else:
        if not pre.out:
            raise ScionError("scion sft needs --out, the run directory for the fine-tuned model")
        from scion.sft.recipe import source_config

        def fine_tuning(options: SFTConfig) -> RunConfig:  # the settings start from the source's
            nonlocal preloaded
            if not options.source:
                raise ScionError("scion sft needs a source run: scion sft RUN_DIR --data FILE --out RUN_DIR2")
            base, preloaded = source_config(options.source)
            return fine_tuning_config(base, options.lora_rank > 0)

        args, cfg, options = parse_recipe(p, argv, SFTConfig(), derive=fine_tuning)
        out = Path(pre.out)

    from scion.sft.recipe import sft

    run_dir, trainer = sft(
        cfg,
        options,
        out,
        resume=bool(args.resume),
        overwrite=args.overwrite,
        explicit=explicit_train_fields(argv),
        progress=progress_choice(args),
        preloaded=preloaded,
    )
    return finish_training(trainer, run_dir, f"talk to it: scion chat {run_dir}")
