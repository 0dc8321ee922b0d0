"""The `scion` command: one entry point, one subcommand per job. Each subcommand is a module
of this package with a `main(argv) -> int`; they are imported only when used, so `scion --help`
and every command start fast."""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from scion.errors import ScionError

# name -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("scion.cli.pretrain", "train a model from scratch (or continue one with --resume)"),
    "plan": ("scion.cli.plan", "the memory a run needs per rank and the largest micro-batch that fits"),
    "tokenizer": ("scion.cli.tokenizer", "train a byte-level BPE tokenizer: scion tokenizer train ..."),
    "prepare": ("scion.cli.prepare", "tokenize text/JSONL/Parquet into packed token shards"),
    "generate": ("scion.cli.generate", "sample a continuation from a trained run"),
    "lazy": ("scion.cli.lazy", "attention rank k*, column mass m* and lazy layers of one or more models"),
    "report": ("scion.cli.report", "an HTML report of runs: loss, LR, throughput, samples, evals, lazy"),
    "sft": ("scion.cli.sft", "instruction-tune a run on chats or Alpaca data (full or LoRA)"),
    "chat": ("scion.cli.chat", "talk to an instruction-tuned run in the terminal"),
    "consolidate": ("scion.cli.consolidate", "write an FSDP checkpoint's weights as one safetensors file"),
    "inherit": ("scion.cli.inherit", "Inheritune: a smaller model from a reference's first blocks, trained"),
    "grow": ("scion.cli.grow", "Inheritune's Algorithm 1: train, add the reference's next blocks, repeat"),
    "experiment": ("scion.cli.experiment", "a paper's experiment end to end: scion experiment inheritune"),
    "import": ("scion.cli.import_", "turn a Hugging Face Llama or GPT-2 model into a scion run"),
    "export": ("scion.cli.export", "write a run as a Hugging Face model folder (safetensors + tokenizer)"),
    "eval": ("scion.cli.eval", "benchmark tasks (lm-eval) or loss, perplexity and bits per byte"),
    "verify": ("scion.cli.verify", "check every checkpoint of a run (checksums, completeness, contents)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: scion COMMAND [OPTIONS]   (scion COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Add --debug to any command to see the full traceback of an error."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SCION_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        return _run(name, rest)
    except ScionError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            traceback.print_exc()
        print("error: out of memory; lower --micro-batch-size or --seq-len", file=sys.stderr)
        return 1
    except Exception as e:  # an unexpected failure: one line, the traceback behind --debug
        if debug:
            traceback.print_exc()
        else:
            first = str(e).splitlines()[0] if str(e) else ""
            print(f"error: {type(e).__name__}: {first} (run again with --debug for the traceback)",
                  file=sys.stderr)
        return 1


def _run(name: str, rest: list[str]) -> int:
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except BaseException:
        # A progress bar left open would swallow the start of the error line.
        tqdm = sys.modules.get("tqdm")
        for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
            bar.close()
        raise


if __name__ == "__main__":
    sys.exit(main())
