"""scion chat: talk to an instruction-tuned run in the terminal, the answer streamed as it is
generated. Ctrl-D or Ctrl-C at the prompt ends the chat; Ctrl-C during an answer cuts it short."""

from __future__ import annotations

import argparse
import sys

from scion.errors import ScionError

HELP = "commands: /reset forgets the conversation, /quit (or Ctrl-D) leaves"


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="step number or checkpoint name (default: latest)")
    p.add_argument("--system", default=None, help="a system message that starts the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 disables top-k")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step first (about a minute on a CPU), then decode faster")


def compiled_decoder(args, model):
    """A `CompiledDecoder` for batch 1 when --compile was given, else None."""
    if not args.compile:
        return None
    from scion.generate import CompiledDecoder

    print("compiling the decoding step (the first answer waits for it)", file=sys.stderr, flush=True)
    return CompiledDecoder(model, batch=1)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scion chat", description="Chat with an instruction-tuned run.")
    p.add_argument("run", help="run directory (made by scion sft) or checkpoint folder")
    add_sampling_flags(p)
    args = p.parse_args(argv)
    if args.max_new_tokens <= 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ScionError("--max-new-tokens must be > 0, --temperature >= 0 and --top-p in (0, 1]")

    import torch

    from scion.run import load_model, resolve_checkpoint
    from scion.sft.chat import ChatSession, run_template
    from scion.train.device import resolve_device

    device = resolve_device(args.device)
    loaded = load_model(args.run, args.checkpoint, device=device)
    if loaded.tokenizer is None:
        raise ScionError(f"{args.run}: the run has no tokenizer/ folder")
    run_dir, _ = resolve_checkpoint(args.run, args.checkpoint)
    generator = torch.Generator(device=device).manual_seed(
        args.seed if args.seed is not None else torch.seed()
    )
    session = ChatSession(
        loaded.model,
        loaded.tokenizer,
        run_template(run_dir, loaded.tokenizer),
        args.system,
        args.max_new_tokens,
        args.temperature,
        args.top_k or None,
        args.top_p,
        generator,
        compiled_decoder(args, loaded.model),
    )
    print(
        f"chatting with {args.run} ({loaded.checkpoint.name}, context {session.context} tokens). {HELP}",
        file=sys.stderr,
        flush=True,
    )
    while True:
        try:
            user = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if not user.strip():
            continue
        if user.strip() in ("/quit", "/exit"):
            break
        if user.strip() == "/reset":
            session.reset()
            print("(conversation forgotten)", file=sys.stderr, flush=True)
            continue
        dropped = session.dropped_turns
        sys.stdout.write("assistant> ")
        sys.stdout.flush()
        try:
            for piece in session.reply(user):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [interrupted]")
        except ScionError as e:
            sys.stdout.write(f"\n(error: {e})")
        sys.stdout.write("\n")
        sys.stdout.flush()
        if session.dropped_turns > dropped:
            print(
                f"(the {session.dropped_turns - dropped} oldest turn(s) no longer fit the context and were "
                "dropped)",
                file=sys.stderr,
                flush=True,
            )
    print("bye", file=sys.stderr)
    return 0
