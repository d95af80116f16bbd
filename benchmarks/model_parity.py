"""How close nanotune's Llama is to transformers' LlamaForCausalLM: the figures behind tests/test_model.py.

    python benchmarks/model_parity.py

The tests assert bounds (1e-5); this prints the worst differences actually seen, over 16 tiny fp32
configurations (rope_scaling none / linear / dynamic / llama3 x tied / untied embeddings x MHA / GQA)
with the same weights: the largest |logit difference|, the largest relative gradient difference of
the same next-token loss over every parameter, and, for three documents packed into one row with
`document_ids`, the largest |logit difference| from each document run alone through transformers
(per-document spans and the dense block-diagonal mask). Needs transformers (the test extra).
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from helpers import hf_llama_from, three_packed_documents, tiny_model  # noqa: E402
from test_model import ROPE_SCALINGS  # noqa: E402


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def worst_config_differences() -> tuple[float, float]:
    worst_logit, worst_grad = 0.0, 0.0
    input_ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))  # (B, T)
    for rope in ROPE_SCALINGS:
        for tied in (False, True):
            for n_kv_heads in (4, 2):
                model = tiny_model(seed=1, rope_scaling=ROPE_SCALINGS[rope], tie_word_embeddings=tied,
                                   num_key_value_heads=n_kv_heads, max_position_embeddings=32)
                hf = hf_llama_from(model)
                ours, theirs = model(input_ids), hf(input_ids).logits  # (B, T, V) each
                worst_logit = max(worst_logit, (ours - theirs).abs().max().item())
                next_token_loss(ours, input_ids).backward()
                next_token_loss(theirs, input_ids).backward()
                hf_parameters = dict(hf.named_parameters())
                for name, param in model.named_parameters():
                    reference = hf_parameters[name].grad
                    worst_grad = max(worst_grad, ((param.grad - reference).norm() / reference.norm()).item())
    return worst_logit, worst_grad


def worst_packed_difference(packed_attention: str) -> float:
    model = tiny_model(seed=2, packed_attention=packed_attention)
    hf = hf_llama_from(model)
    documents, packed, document_ids = three_packed_documents(seed=1)  # the test's documents
    logits = model(packed, document_ids=document_ids)[0]  # (24, V)
    worst, start = 0.0, 0
    for document in documents:
        alone = hf(document[None]).logits[0]  # (n, V)
        worst = max(worst, (logits[start : start + len(document)] - alone).abs().max().item())
        start += len(document)
    return worst


def main() -> None:
    worst_logit, worst_grad = worst_config_differences()
    print(f"16 configs (4 rope types x tied/untied x MHA/GQA): max |logit diff| {worst_logit:.2e}, "
          f"max relative grad diff {worst_grad:.2e}")
    for packed_attention in ("spans", "mask"):
        print(f"3 documents packed ({packed_attention}): max |logit diff| vs transformers alone "
              f"{worst_packed_difference(packed_attention):.2e}")


if __name__ == "__main__":
    main()
