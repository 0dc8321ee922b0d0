"""fp8 training (`--precision fp8`): the Linear layers' matrix products in float8, through torchao.

torchao's `convert_to_float8_training` swaps each chosen `nn.Linear` for its `Float8Linear`,
which casts the input, the weight and the output gradient to float8 with dynamic tensorwise
scales in each of its three products (torchao's default recipe), and keeps the weight itself in
full precision under the same name: checkpoints, resume and export see the parameters of a bf16
run. Everything else (embeddings, norms, attention, the output layer and its loss) runs as in
bf16, under autocast. As in torchtitan, the conversion comes first, before activation
checkpointing, torch.compile and FSDP (`scion.train.parallel.parallelize`), and it leaves out the
output layer and every Linear whose dimensions are not multiples of 16 (float8 tensor cores need
them).

The passes without gradients (validation, sampling, decoding) take the plain product of the
same weights under autocast instead, as the exported model computes it: torchao's float8 tensors
are for training and do not run under `torch.inference_mode`.

Float8 tensor cores start at compute capability 8.9 (Ada: L4, L40S; Hopper: H100, H200).
SCION_FP8_EMULATE=1 is for tests: torchao then emulates the float8 products in plain PyTorch on
any device (slow, eager only), so that the conversion, the training step and the checkpoints can
be checked without such a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import nn

from scion.errors import ScionError

MIN_CAPABILITY = (8, 9)
INSTALL = "pip install 'scion[fp8]' (or pip install torchao)"
EMULATE_ENV = "SCION_FP8_EMULATE"
# Left in bf16, as torchtitan leaves them: the output layer's logits feed the loss directly.
SKIPPED = ("lm_head",)


def emulated() -> bool:
    return os.environ.get(EMULATE_ENV, "").strip() == "1"


def check_supported(device: torch.device) -> None:
    """Refuse, in one line naming the fix, a device or an installation without fp8 training."""
    if not emulated():
        if device.type != "cuda":
            raise ScionError(f"--precision fp8 needs an NVIDIA GPU of compute capability 8.9 or later "
                             f"(L4, L40S, H100, H200); this run is on {device.type}: use --precision bf16")
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < MIN_CAPABILITY:
            raise ScionError(f"--precision fp8 needs float8 tensor cores (compute capability 8.9 or later: L4, "
                             f"L40S, H100, H200); {torch.cuda.get_device_name(device)} is {major}.{minor}: "
                             "use --precision bf16")
    torchao_float8()


def torchao_float8():
    """torchao's float8 package, once it is known to be installed and to match this torch."""
    if importlib.util.find_spec("torchao") is None:
        raise ScionError(f"--precision fp8 trains through torchao, which is not installed: {INSTALL}")
    try:
        import torchao
        from torchao import float8
    except Exception as e:  # an API of torch that this torchao expects is missing
        raise ScionError(f"torchao does not import beside torch {torch.__version__} ({type(e).__name__}: {e}); "
                         "install the torchao release made for this torch, or upgrade torch") from e
    # torchao checks the torch it was built for at import, and says so only in a log line.
    reason = str(getattr(torchao, "_skip_reason", None) or "")
    if "incompatible torch version" in reason:
        raise ScionError(f"torchao {torchao.__version__} is too new for torch {torch.__version__} "
                         f"({reason.rstrip('.')}): upgrade torch, or install the torchao release made for it")
    return float8


def convertible(module: nn.Module, name: str) -> bool:
    """Whether fp8 training converts this layer: a Linear other than the output layer, both of
    whose dimensions are multiples of 16."""
    return (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in SKIPPED
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_float8(model: nn.Module, fsdp_all_gather: bool = False) -> list[str]:
    """Swap `model`'s convertible Linear layers for torchao's Float8Linear, in place; the names of
    those converted. `fsdp_all_gather`: FSDP gathers the weights already cast to float8 (half the
    bytes of bf16), which pays when FSDP spans several ranks."""
    float8 = torchao_float8()
    converted: list[str] = []

    def chosen(module: nn.Module, name: str) -> bool:
        if convertible(module, name):
            converted.append(name)
            return True
        return False

    config = float8.Float8LinearConfig(emulate=emulated(), enable_fsdp_float8_all_gather=fsdp_all_gather)
    float8.convert_to_float8_training(model, config=config, module_filter_fn=chosen)
    for name in converted:  # torchao's layer, plus the plain product outside training (see above)
        model.get_submodule(name).__class__ = training_float8_linear()
    if not converted:
        raise ScionError("--precision fp8: no Linear layer of this model has both dimensions a multiple of 16, "
                         "so none would run in float8; use --precision bf16")
    return converted


@functools.cache
def training_float8_linear() -> type:
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    class TrainingFloat8Linear(Float8Linear):
        """torchao's Float8Linear while gradients are computed, or when FSDP's float8 all-gather
        has handed it the weight in float8 already; the plain product otherwise."""

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            # Both are guards torch.compile specialises on: no graph break.
            if torch.is_grad_enabled() or isinstance(self.weight, Float8TrainingTensor):
                return super().forward(input)
            return nn.functional.linear(input, self.weight, self.bias)

    return TrainingFloat8Linear
