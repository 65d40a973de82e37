"""The data a channel walk produces: tensor channel layouts, channel groups, weight layers, constants to slice.

`groups.py` builds a `ChannelGraph` from an ONNX graph; the solver reads its groups and layers, `crop.py` replays its
slices, depthwise Convs and Reshapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Layout:
    """A tensor's channel axis: segments (space id, channels) side by side, `block` features per channel."""

    segments: tuple[tuple[int, int], ...]
    block: int = 1

    @property
    def channels(self) -> int:
        return sum(n for _, n in self.segments)

    @property
    def features(self) -> int:
        return self.channels * self.block


@dataclass
class Slice:
    """Slice constant `const` (input `slot` of node `node`) along `axis` by the kept features of `layout`."""

    node: str
    slot: int
    const: str
    axis: int
    layout: Layout


@dataclass
class ChannelGroup:
    """Channels that stay or go together. `size` channels; `frozen` says why it can't be cropped (None: croppable)."""

    key: str
    size: int
    members: list[str] = field(default_factory=list)
    frozen: str | None = None

    def describe(self) -> str:
        tied = f" (tied with {', '.join(repr(m) for m in self.members[1:6])}" if len(self.members) > 1 else ""
        if tied and len(self.members) > 6:
            tied += f" and {len(self.members) - 6} more"
        return f"channel group {self.key!r} ({self.size} channels){tied + ')' if tied else ''}"


@dataclass
class Layer:
    """A weight-carrying node (Conv, Gemm, MatMul) and the layouts of its input and output channels."""

    name: str
    op: str
    weight: str
    kernel: int  # spatial positions per (in, out) channel pair (kh*kw; 1 for Gemm)
    in_layout: Layout
    out_layout: Layout
    depthwise: bool = False
    group: int = 1
    weight_count: int = 0
    kernel_shape: tuple[int, ...] = ()


@dataclass
class ChannelGraph:
    """Everything the solver and the surgery need to know about a graph's channels."""

    groups: dict[str, ChannelGroup]
    space_group: dict[int, str]  # space id → group key
    space_size: dict[int, int]
    layers: list[Layer]
    slices: list[Slice]
    depthwise_convs: dict[str, Layout]  # Conv node name → layout whose channel count is its `group` attribute
    reshapes: dict[str, tuple[int, Layout]]  # Reshape node name → (shape input slot, output layout)

    def group_of(self, space: int) -> ChannelGroup:
        return self.groups[self.space_group[space]]

    def kept_features(self, layout: Layout, keep: dict[str, np.ndarray]) -> np.ndarray:
        """Indices along a tensor's channel/feature axis that stay, given kept channel indices per group."""
        parts, offset = [], 0
        for space, n in layout.segments:
            kept = keep[self.space_group[space]]
            parts.append(offset + kept)
            offset += n
        channels = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if layout.block == 1:
            return channels.astype(np.int64)
        return (channels[:, None] * layout.block + np.arange(layout.block)[None, :]).reshape(-1).astype(np.int64)
