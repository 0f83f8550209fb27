"""Export a tiny BERT and a tiny GPT-2 (random weights, from transformers configs) to ONNX.

    python tests/tools/export_tiny_transformers.py OUT_DIR

Test-only: needs torch, transformers and onnxscript (the ``transformers-tests`` extra).
BERT goes through the TorchScript exporter at opset 17, GPT-2 through the dynamo
exporter at opset 18 (the TorchScript one lacks an op transformers' causal mask uses).
``bert_dynamic.onnx`` is the same BERT through the dynamo exporter with symbolic ``batch`` and
``sequence`` dims, as users export a text model to run at any size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cpu_torch  # noqa: F401 - first: transformers imports torchvision, which needs it on the CPU torch
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model


class TinyBert(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.m = BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class TinyGPT2(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.m = GPT2Model(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, use_cache=False, return_dict=True).last_hidden_state


def main(out: Path) -> None:
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, 128, (1, 16))
    mask = torch.ones(1, 16, dtype=torch.int64)
    torch.onnx.export(TinyBert().eval(), (ids, mask), str(out / "bert.onnx"), input_names=["input_ids", "attention_mask"],
                      output_names=["hidden"], opset_version=17, dynamo=False)
    torch.onnx.export(TinyGPT2().eval(), (ids,), str(out / "gpt2.onnx"), input_names=["input_ids"],
                      output_names=["hidden"], opset_version=18, dynamo=True)
    torch.manual_seed(0)
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("sequence", min=2, max=64)}
    torch.onnx.export(TinyBert().eval(), (ids.repeat(2, 1), mask.repeat(2, 1)), str(out / "bert_dynamic.onnx"),
                      input_names=["input_ids", "attention_mask"], output_names=["hidden"], opset_version=18,
                      dynamo=True, dynamic_shapes=(dims, dims), external_data=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
