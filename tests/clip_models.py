"""A tiny randomly initialised 3-D CNN exported to ONNX in the clip-backbone contract (tests, benchmarks).

Its features are meaningless; it is a real ONNX video model with input (N, 3, T, H, W) (or
(N, T, 3, H, W)) and output (N, D), which is all the clip featurizer relies on.
"""

from __future__ import annotations

import json
from pathlib import Path


def export_tiny_backbone(
    path: Path,
    *,
    feature_dim: int = 64,
    clip_frames: int = 8,
    size: int = 32,
    layout: str = "NCTHW",
    metadata: dict | None = None,
    seed: int = 0,
) -> Path:
    import onnx
    import torch
    from torch import nn

    class Tiny3dCnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv3d(3, 8, kernel_size=3, stride=(1, 2, 2), padding=1),
                nn.ReLU(),
                nn.Conv3d(8, 16, kernel_size=3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool3d(1),
                nn.Flatten(),
                nn.Linear(16, feature_dim),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if layout == "NTCHW":
                x = x.permute(0, 2, 1, 3, 4)
            return self.net(x)

    torch.manual_seed(seed)
    model = Tiny3dCnn().eval()
    shape = (2, 3, clip_frames, size, size) if layout == "NCTHW" else (2, clip_frames, 3, size, size)
    torch.onnx.export(
        model,
        (torch.randn(*shape),),
        str(path),
        input_names=["clip"],
        output_names=["feature"],
        dynamic_axes={"clip": {0: "batch"}, "feature": {0: "batch"}},
        dynamo=False,
    )
    proto = onnx.load(str(path))
    meta = (
        {"clip_frames": clip_frames, "stride": 4, "size": size, "layout": layout}
        if metadata is None
        else metadata
    )
    entry = proto.metadata_props.add()
    entry.key, entry.value = "mgstream.clip", json.dumps(meta)
    onnx.save(proto, str(path))
    return path
