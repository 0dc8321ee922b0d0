"""scion generate: sample a continuation from a trained run, with a KV cache."""

from __future__ import annotations

import argparse
import sys

from scion.errors import ScionError


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scion generate", description="Sample text from a trained run.")
    p.add_argument("run", help="run directory or checkpoint folder")
    p.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    p.add_argument("--checkpoint", default=None, help="step number or checkpoint name (default: latest)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=200, help="0 disables top-k")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step first (about a minute on a CPU), then decode faster")
    p.add_argument("--chat", action="store_true",
                   help="treat --prompt as a user message: apply the run's chat template, print the answer")
    p.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0 or args.num_samples <= 0:
        raise ScionError("--max-new-tokens must be >= 0 and --num-samples > 0")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ScionError("--temperature must be >= 0 and --top-p in (0, 1]")

    import torch

    from scion.cli.chat import compiled_decoder
    from scion.generate import generate_stream
    from scion.run import load_model
    from scion.train.device import resolve_device

    device = resolve_device(args.device)
    loaded = load_model(args.run, args.checkpoint, device=device)
    tok = loaded.tokenizer
    if tok is None:
        raise ScionError(f"{args.run}: the run has no tokenizer/ folder")
    ids = tok.encode(args.prompt) if args.prompt else [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    if len(ids) >= loaded.model.cfg.max_seq_len:
        raise ScionError(f"the prompt has {len(ids)} tokens; the model's context is {loaded.model.cfg.max_seq_len}")
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed if args.seed is not None else torch.seed())
    decoder = compiled_decoder(args, loaded.model)
    if args.chat:
        return _chat_once(args, loaded, generator, decoder)
    prompt = torch.tensor([ids] * args.num_samples, device=device)
    for n in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {n + 1}", flush=True)
        sys.stdout.write(args.prompt)
        for token in generate_stream(loaded.model, prompt[n:n + 1], args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k or None,
                                     top_p=args.top_p, eos_id=tok.eos_id, generator=generator,
                                     decoder=decoder):
            t = int(token[0])
            if t == tok.eos_id:
                break
            sys.stdout.write(tok.decode([t]))
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _chat_once(args, loaded, generator, decoder) -> int:
    """One answer to --prompt per sample, streamed, through the run's chat template."""
    from scion.run import resolve_checkpoint
    from scion.sft.chat import ChatSession, run_template

    if not args.prompt:
        raise ScionError("--chat needs --prompt, the user's message")
    if args.max_new_tokens == 0:
        return 0
    run_dir, _ = resolve_checkpoint(args.run, args.checkpoint)
    template = run_template(run_dir, loaded.tokenizer)
    for n in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {n + 1}", flush=True)
        session = ChatSession(loaded.model, loaded.tokenizer, template, args.system, args.max_new_tokens,
                              args.temperature, args.top_k or None, args.top_p, generator, decoder)
        for piece in session.reply(args.prompt, remember=False):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0
