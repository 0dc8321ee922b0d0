"""The options of an SFT run, declared once: they are `scion sft`'s flags (lora_rank:
--lora-rank), the run's sft.yaml (what `--resume` rebuilds the run from), and the policy that
turns the source's pretraining settings into fine-tuning ones."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro
import yaml

from scion.config import DataConfig, RunConfig
from scion.errors import ScionError

OPTIONS_FILE = "sft.yaml"
REPORT_FILE = "sft-data.json"


def _spelled(metavar: str, parse, show, is_instance, choices=None):
    """A flag value written one way on the command line and held another way in the options."""
    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar=metavar, instance_from_str=lambda args: parse(args[0]), is_instance=is_instance,
        str_from_instance=lambda value: [show(value)], choices=choices)


# --lora-targets q_proj,v_proj
CommaSeparated = Annotated[list[str], _spelled(
    "NAME,NAME,...", lambda text: [t.strip() for t in text.split(",") if t.strip()], ",".join,
    lambda value: isinstance(value, list))]
# --lora-train-embeddings auto|yes|no
_AUTO_YES_NO = {"auto": None, "yes": True, "no": False}
AutoYesNo = Annotated[bool | None, _spelled(
    "{auto,yes,no}", _AUTO_YES_NO.__getitem__, {v: k for k, v in _AUTO_YES_NO.items()}.__getitem__,
    lambda value: value is None or isinstance(value, bool), choices=tuple(_AUTO_YES_NO))]


@dataclass
class SFTConfig:
    """What to fine-tune on and how (the training settings themselves are the RunConfig's)."""

    # the model to fine-tune: a scion run or checkpoint folder, or a Hugging Face model
    source: tyro.conf.Positional[str] = ""
    # Alpaca or conversation JSONL/JSON/Parquet files, folders, a saved `datasets` folder, hf:NAME[:CONFIG]
    data: list[str] = field(default_factory=list)
    # the split of an hf: data set or a saved DatasetDict
    split: str = "train"
    # chatml, alpaca or a .jinja file (None: the tokenizer's own template, else chatml)
    template: Annotated[str | None, tyro.conf.arg(name="chat-template")] = None
    # with a .jinja template: the token that ends an answer
    stop_token: str | None = None
    # the loss on the assistant's turns only, or on every token
    train_on: Literal["assistant", "all"] = "assistant"
    # several conversations per sequence (no attention across them), or one per row
    layout: Literal["pack", "pad"] = "pack"
    # conversations longer than the context: cut them, or leave them out (both reported)
    too_long: Literal["truncate", "drop"] = "truncate"
    # records missing fields: skip and report them with their line, or refuse the data
    bad_records: Literal["skip", "error"] = "skip"
    # passes over the data when --max-steps is not given
    epochs: float = 3.0
    # train rank-R LoRA adapters instead of all weights (0: full fine-tuning)
    lora_rank: int = 0
    # LoRA scale numerator (None: 2 x rank)
    lora_alpha: float | None = None
    # projections to adapt (q,k,v,o,gate,up,down _proj)
    lora_targets: CommaSeparated = field(default_factory=lambda: ["q_proj", "v_proj"])
    # dropout on the LoRA adapters' input
    lora_dropout: float = 0.0
    # with LoRA, also train the embedding and output layer (auto: when the template added tokens)
    lora_train_embeddings: AutoYesNo = None

    def validate(self) -> None:
        if not self.data:
            raise ScionError(
                "scion sft needs --data (instruction JSONL/Parquet, a saved data set or hf:NAME)"
            )
        if self.epochs <= 0:
            raise ScionError(f"--epochs must be positive, got {self.epochs}")
        if self.lora_rank < 0:
            raise ScionError(f"--lora-rank must be 0 (full fine-tuning) or positive, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise ScionError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")


def fine_tuning_config(base: RunConfig, lora: bool) -> RunConfig:
    """The fine-tuning run's settings, from the source's pretraining ones: a tenth of its learning
    rate (its full rate with LoRA, whose adapters start at zero), decaying to a tenth of that, 10
    warm-up steps, one micro-batch a step, 5% of the conversations held out; the model as it is."""
    train = base.train
    lr = train.lr if lora else train.lr / 10
    train = dataclasses.replace(train, lr=lr, min_lr=lr / 10, tokens_per_step=None, warmup_steps=10)
    return dataclasses.replace(base, data=DataConfig(val_fraction=0.05), train=train)


def save_options(options: SFTConfig, run_dir: Path, report: dict) -> None:
    """sft.yaml (what `--resume` rebuilds the run from) and sft-data.json (what the data held)."""
    (run_dir / OPTIONS_FILE).write_text(yaml.safe_dump(dataclasses.asdict(options), sort_keys=False))
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=1))


def load_options(run_dir: Path) -> SFTConfig:
    path = Path(run_dir) / OPTIONS_FILE
    try:
        values = yaml.safe_load(path.read_text())
        return SFTConfig(**values)
    except FileNotFoundError as e:
        raise ScionError(
            f"{run_dir}: not an SFT run (no {OPTIONS_FILE}); resume it with scion pretrain"
        ) from e
    except (yaml.YAMLError, TypeError) as e:
        raise ScionError(f"{path}: not a valid SFT options file ({e})") from e
