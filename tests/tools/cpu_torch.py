"""``import cpu_torch`` before torchvision or transformers, in the export scripts beside it.

torchvision's wheel registers fake kernels for its CUDA ops (``torchvision::nms``) when it is imported,
and the CPU build of torch refuses them, so importing torchvision fails; transformers imports it for
its image utilities, so ``from transformers import BertModel`` fails too. No model the exporters
build needs those ops: registering fake kernels is made a no-op.
"""

from __future__ import annotations

import torch

torch.library.register_fake = lambda *a, **k: (lambda f: f)
