"""Export the real-model corpus with torch's default exporter (dynamo, opset 18), random seeded weights.

    python tests/tools/export_corpus.py OUT_DIR [NAME ...]

Writes ``OUT_DIR/NAME.onnx`` for each model not already there (with no names, the test corpus:
``MODELS``). Image and video models get a dynamic ``batch`` dim; text and audio models a dynamic
``batch`` and ``sequence`` dim (Whisper's encoder, whose positional table fixes its 3,000 mel frames,
a dynamic batch only). The test corpus's text and audio models keep their real widths and operator
structure with fewer layers (2), so that the corpus fits a test run; ``BENCH_MODELS``, which
``bench/run_all.py`` times, are the architectures at their real sizes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import cpu_torch  # noqa: F401 - first: torchvision imports on the CPU torch
import torch
import torchvision

Batch = torch.export.Dim("batch", min=1, max=64)  # examples have batch 2: torch specialises a dim of 1
Sequence = torch.export.Dim("sequence", min=2, max=512)


def _vision(build: Callable[[], Any], shape: tuple[int, ...]) -> tuple[Any, tuple, dict]:
    model = build().eval()
    return model, (torch.randn(*shape),), {"x": {0: Batch}}


class _Out(torch.nn.Module):
    """A model returning one tensor: ``key`` of its output (a ModelOutput or a dict)."""

    def __init__(self, model: Any, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: Any, mask: Any = None) -> Any:
        return (self.model(x) if mask is None else self.model(x, attention_mask=mask))[self.key]


def _text(kind: str, layers: int | None = 2) -> tuple[Any, tuple, dict]:
    """A transformers encoder or decoder with random weights; ``layers=None`` keeps the real depth."""
    import transformers

    config, build, depth_key, extra = {  # the config's name for its layer count differs by family
        "distilbert": (transformers.DistilBertConfig, transformers.DistilBertModel, "n_layers", {}),
        "roberta": (transformers.RobertaConfig, transformers.RobertaModel, "num_hidden_layers", {}),
        "bert": (transformers.BertConfig, transformers.BertModel, "num_hidden_layers", {}),
        "gpt2": (transformers.GPT2Config, transformers.GPT2Model, "n_layer", {"use_cache": False}),
    }[kind]
    model = build(config(**({} if layers is None else {depth_key: layers}), **extra))
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    dims = {0: Batch, 1: Sequence}
    return _Out(model.eval(), "last_hidden_state"), (ids, mask), {"input_ids": dims, "attention_mask": dims}


def _whisper() -> tuple[Any, tuple, dict]:
    import transformers

    config = transformers.WhisperConfig.from_dict({  # whisper-tiny's sizes
        "d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
        "decoder_layers": 4, "decoder_attention_heads": 6, "decoder_ffn_dim": 1536, "num_mel_bins": 80,
        "max_source_positions": 1500})
    encoder = transformers.WhisperModel(config).get_encoder().eval()
    return _Out(encoder, "last_hidden_state"), (torch.randn(2, 80, 3000),), {"input_features": {0: Batch}}


def _wav2vec2() -> tuple[Any, tuple, dict]:
    import transformers

    config = transformers.Wav2Vec2Config(num_hidden_layers=2)  # wav2vec2-base otherwise
    model = transformers.Wav2Vec2Model(config).eval()
    samples = torch.export.Dim("samples", min=800, max=160000)
    return _Out(model, "last_hidden_state"), (torch.randn(2, 16000),), {"input_values": {0: Batch, 1: samples}}


def _seg(build: Callable[..., Any]) -> Callable[[], Any]:
    return lambda: _Out(build(weights=None, weights_backbone=None, num_classes=21), "out")


M = torchvision.models
MODELS: dict[str, Callable[[], tuple[Any, tuple, dict]]] = {
    "mobilenet_v2": lambda: _vision(lambda: M.mobilenet_v2(), (2, 3, 224, 224)),
    "resnet50": lambda: _vision(lambda: M.resnet50(), (2, 3, 224, 224)),
    "googlenet": lambda: _vision(lambda: M.googlenet(aux_logits=False, init_weights=True), (2, 3, 224, 224)),
    "mnasnet1_0": lambda: _vision(lambda: M.mnasnet1_0(), (2, 3, 224, 224)),
    "lraspp_mobilenet_v3_large": lambda: _vision(_seg(M.segmentation.lraspp_mobilenet_v3_large), (2, 3, 256, 256)),
    "fcn_resnet50": lambda: _vision(_seg(M.segmentation.fcn_resnet50), (2, 3, 256, 256)),
    "swin_t": lambda: _vision(lambda: M.swin_t(), (2, 3, 224, 224)),
    "r3d_18": lambda: _vision(lambda: M.video.r3d_18(), (2, 3, 8, 112, 112)),
    "distilbert": lambda: _text("distilbert"),
    "roberta": lambda: _text("roberta"),
    "whisper_tiny_encoder": _whisper,
    "wav2vec2_base": _wav2vec2,
}
#: The architectures ``bench/run_all.py`` times beyond the test corpus, at their real sizes (the
#: corpus's Whisper-tiny encoder already is).
BENCH_MODELS: dict[str, Callable[[], tuple[Any, tuple, dict]]] = {
    "resnet18": lambda: _vision(lambda: M.resnet18(), (2, 3, 224, 224)),
    "mobilenet_v3_large": lambda: _vision(lambda: M.mobilenet_v3_large(), (2, 3, 224, 224)),
    "efficientnet_b0": lambda: _vision(lambda: M.efficientnet_b0(), (2, 3, 224, 224)),
    "efficientnet_v2_s": lambda: _vision(lambda: M.efficientnet_v2_s(), (2, 3, 224, 224)),
    "shufflenet_v2_x1_0": lambda: _vision(lambda: M.shufflenet_v2_x1_0(), (2, 3, 224, 224)),
    "regnet_y_400mf": lambda: _vision(lambda: M.regnet_y_400mf(), (2, 3, 224, 224)),
    "resnext50_32x4d": lambda: _vision(lambda: M.resnext50_32x4d(), (2, 3, 224, 224)),
    "convnext_tiny": lambda: _vision(lambda: M.convnext_tiny(), (2, 3, 224, 224)),
    "vit_b_16": lambda: _vision(lambda: M.vit_b_16(), (2, 3, 224, 224)),
    "distilbert_base": lambda: _text("distilbert", None),
    "roberta_base": lambda: _text("roberta", None),
    "bert_base": lambda: _text("bert", None),
    "gpt2": lambda: _text("gpt2", None),
}


def export(name: str, out: Path) -> None:
    torch.manual_seed(0)
    model, args, dims = {**MODELS, **BENCH_MODELS}[name]()
    names = list(dims)
    with torch.no_grad():
        program = torch.onnx.export(model, args, dynamo=True, opset_version=18, input_names=names,
                                    dynamic_shapes=tuple(dims.values()), external_data=False)
    tmp = out / f".{name}.onnx.{os.getpid()}.part"
    program.save(str(tmp), external_data=False)
    os.replace(tmp, out / f"{name}.onnx")


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[2:] or list(MODELS):
        if not (out / f"{name}.onnx").exists():
            export(name, out)
            print(f"exported {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
