"""How far a QLoRA adapter merged into the full-precision base is from the model it was trained as.

    python benchmarks/qlora_merge_gap.py                # ~5 minutes on 2 CPU cores
    python benchmarks/qlora_merge_gap.py --pt-steps 300 --sft-steps 120

The tiny recipe of configs/: pretrain configs/tiny_pt.toml from scratch, then QLoRA SFT with
configs/tiny_sft.toml over it (every linear of the blocks in NF4, r=16 adapters). Then, on the
tcm_qg conversations, the reply-token loss of

  base fp32                the pretrained model as saved
  base NF4                 the same, every block linear quantised and dequantised
  QLoRA as trained         base NF4 + adapter: `merge.py lora --into-dequantized` gives this model
  merged into fp32 base    base fp32 + adapter: `merge.py lora` (the default) and PEFT give this one

and the NF4 round-trip error of the base's linear weights, ||W - dq(q(W))|| / ||W||, and the
largest logit difference between the last two models.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pt-steps", type=int, default=150)
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--conversations", type=int, default=120, help="conversations scored")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import torch

    import train_pt
    import train_sft
    from nanotune.checkpoint import load_pretrained
    from nanotune.data.formats import read_conversations
    from nanotune.evaluate import conversation_loss
    from nanotune.lora import load_adapter
    from nanotune.quant import NF4Linear, QuantizeOnLoad, dequantize_nf4, quantize_nf4
    from nanotune.tokenizer import Tokenizer

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qlora_gap_"))
    quiet = ["--log.progress_bar=false", "--log.every_steps=50"]
    if not (workdir / "pt" / "final" / "config.json").exists():
        train_pt.main(["--config", str(ROOT / "configs" / "tiny_pt.toml"), f"--output_dir={workdir / 'pt'}",
                       f"--train.max_steps={args.pt_steps}", "--checkpoint.every_steps=0", "--eval.every_steps=0",
                       f"--tokenizer.path={ROOT / 'examples/tcm_qg/tokenizer/tokenizer.model'}",
                       f"--data.train_files={ROOT / 'examples/tcm_qg/data/corpus.txt'}", *quiet])
    base = workdir / "pt" / "final"
    adapter = workdir / "sft" / "final"
    if not (adapter / "adapter_config.json").exists():
        train_sft.main(["--config", str(ROOT / "configs" / "tiny_sft.toml"), f"--output_dir={workdir / 'sft'}",
                        f"--model.path={base}", "--lora.quantize_base=nf4", "--lora.r=16", "--lora.alpha=32",
                        "--lora.targets=all-linear", f"--train.max_steps={args.sft_steps}",
                        f"--tokenizer.path={ROOT / 'examples/tcm_qg/tokenizer/tokenizer.model'}",
                        f"--data.train_files={ROOT / 'examples/tcm_qg/data/tcm_qg.json'}", "--eval.every_steps=0",
                        *quiet])

    tokenizer = Tokenizer.from_file(base)
    conversations = read_conversations(ROOT / "examples/tcm_qg/data/tcm_qg.json", format="tcm_qg")
    conversations = conversations[-args.conversations:]

    def loss(model) -> float:
        return conversation_loss(model, tokenizer, conversations, "llama2", progress=False)["loss"]

    full = load_pretrained(base)
    nf4 = load_pretrained(base, quantizer=QuantizeOnLoad())
    squared_error, squared_norm = 0.0, 0.0
    for name, module in full.named_modules():
        if isinstance(nf4.get_submodule(name), NF4Linear):
            w = module.weight.detach()
            squared_error += float((w - dequantize_nf4(quantize_nf4(w))).pow(2).sum())
            squared_norm += float(w.pow(2).sum())
    figures = {"base fp32": loss(full), "base NF4": loss(nf4)}
    as_trained, merged = load_adapter(nf4, adapter), load_adapter(full, adapter)
    figures["QLoRA as trained (= --into-dequantized)"] = loss(as_trained)
    figures["merged into fp32 base (default)"] = loss(merged)
    ids = torch.randint(0, full.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = as_trained.eval()(ids), merged.eval()(ids)
    print(f"NF4 round-trip error of the linear weights: {(squared_error / squared_norm) ** 0.5:.4f} (relative RMS)")
    for label, value in figures.items():
        print(f"{label:42s} loss {value:.4f}")
    print(f"logits, as trained vs merged into fp32: max |diff| {(a - b).abs().max():.4f}, "
          f"mean |diff| {(a - b).abs().mean():.4f} (logit std {a.std():.3f})")
    print(f"next-token argmax agreement: {(a.argmax(-1) == b.argmax(-1)).float().mean():.3f}")


if __name__ == "__main__":
    main()
