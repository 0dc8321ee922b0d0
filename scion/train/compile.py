"""torch.compile for training, one transformer block at a time (regional compilation), and the
output (final norm, head and loss) as one more region.

All blocks of a model share one compiled graph, so compiling costs the time of one block (and
the output's), not of the whole network, and the module tree, parameter names and state dict stay
exactly as they were (no `_orig_mod.` prefixes). A block runs compiled for training and evaluation passes; decoding
with a KV cache and passes with an attention observer run the same block eagerly, so sampling
during training never triggers a recompilation per position.
"""

from __future__ import annotations

import torch

from scion.model import Transformer


def compile_blocks(model: Transformer, **compile_kwargs) -> Transformer:
    """Compile `model`'s blocks (plain, or wrapped for activation checkpointing) in place and
    return the model."""
    for block in model.blocks:
        if getattr(block, "_scion_compiled", False):
            continue
        eager = block.forward
        compiled = torch.compile(eager, **compile_kwargs)

        inner = getattr(block, "_checkpoint_wrapped_module", block)  # under activation checkpointing

        def forward(x, rope, kv_cache=None, pos=0, doc_mask=None, *, _attn=inner.attn, _eager=eager,
                    _compiled=compiled):
            if kv_cache is None and _attn.observer is None:
                return _compiled(x, rope, None, pos, doc_mask)
            return _eager(x, rope, kv_cache, pos, doc_mask)

        block.forward = forward
        block._scion_compiled = True
    if not getattr(model, "_scion_compiled", False):
        # The final norm, head and loss: the largest element-wise work of a step, on the
        # [tokens, vocab] logits. Only passes with targets come here (never decoding).
        model.output_loss = torch.compile(model.output_loss, **compile_kwargs)
        # Chunked, the head and loss loop over chunks eagerly (a compiled loop would unroll, its
        # compile time growing with the tokens) and each chunk's step runs compiled.
        model.loss_chunk_step = torch.compile(model.loss_chunk_step, **compile_kwargs)
        model._scion_compiled = True
    return model
