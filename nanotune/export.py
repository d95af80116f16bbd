"""A training checkpoint as a model you can use: a HF-format folder (or a PEFT adapter) from checkpoints/step_N.

    python -m nanotune.export runs/sft/checkpoints/step_400 --out runs/sft/step_400_hf

`checkpoints/step_N` holds distributed-checkpoint shards of what trained (for LoRA, the adapters
only), which only a run can read. This rebuilds the run's model from its `config.toml` (the base
model, the vocabulary, LoRA), loads the step's weights into it (safely: no code from the files
runs) and writes what the run's `final/` would have held at that step: weights or adapter,
tokenizer, chat template and `training_config.toml`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .build import build_model, configure_trainable, load_tokenizer
from .cli import run_main, setup_logging
from .config import ConfigError, PreferenceDataConfig, PretrainDataConfig, PromptDataConfig, SFTDataConfig, load_config
from .distributed import Run
from .safe_dcp import load_state_safely
from .train import save_final

DATA_CLASSES = (SFTDataConfig, PretrainDataConfig, PreferenceDataConfig, PromptDataConfig)


def load_run_config(run_dir: Path):
    """The `config.toml` a run wrote, read with the data section of the entry point that wrote it."""
    path = run_dir / "config.toml"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (a checkpoint's run folder holds the run's config.toml)")
    last_error = None
    for data_class in DATA_CLASSES:
        try:
            return load_config(["--config", str(path), "--checkpoint.resume=false"], data_class=data_class)
        except ConfigError as error:
            last_error = error
    raise last_error


def load_model_weights(step_folder: Path, model: torch.nn.Module) -> None:
    """The model part of a training checkpoint into `model` (what trained; the rest stays as built)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    trainable_only = any(not p.requires_grad for p in model.parameters())
    options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    state = {"model": get_model_state_dict(model, options=options)}
    load_state_safely(state, step_folder / "state")
    set_model_state_dict(model, state["model"], options=options)


def export_checkpoint(step_folder: str | Path, out: str | Path) -> Path:
    """Write the model of `run_dir/checkpoints/step_N` to `out` as the run's final/ would be."""
    step_folder, out = Path(step_folder), Path(out)
    if not (step_folder / "state").is_dir():
        raise ConfigError(f"{step_folder}: not a training checkpoint (expected checkpoints/step_N with a state/ folder)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: is a non-empty folder; give a new or empty --out")
    config = load_run_config(step_folder.parent.parent)
    tokenizer = load_tokenizer(config)
    model = build_model(config, tokenizer)
    configure_trainable(model, config)
    load_model_weights(step_folder, model)
    chat_template = None
    if isinstance(config.data, SFTDataConfig):
        from .data.template_check import resolve_template, saved_chat_template
        from .data.templates import generation_stop_ids

        template = resolve_template(config.data.template, tokenizer, check=False)
        model.config.eos_token_id = generation_stop_ids(template, tokenizer)
        chat_template = saved_chat_template(template, tokenizer)
    save_final(model.eval(), tokenizer, out.parent, Run(), config, chat_template, name=out.name)
    return out


def main(argv: list[str] | None = None) -> Path:
    setup_logging()
    parser = argparse.ArgumentParser(description="Write a training checkpoint as a HF-format folder (or adapter).")
    parser.add_argument("checkpoint", type=Path, help="RUN_DIR/checkpoints/step_N")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (new or empty)")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_main(main)
