"""Swin Transformer body returning stages 2-4, numerically mmdetection 3.3's ``SwinTransformer(out_indices=(1, 2, 3))``.

torchvision's Swin blocks are not used: for a feature map no larger than the window torchvision turns the
shift off, where mmdetection pads the map up to the window and shifts anyway (with its mask), and the two
merge patches in different channel orders. Detection inputs of any size must give mmdetection's numbers,
so the blocks are written out here, with readable names (``swin_weights`` maps mmdetection's onto them):

* patch embedding: 4x4 stride-4 convolution (input padded bottom/right to a multiple of 4), then LayerNorm;
* each block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; the attention pads the map bottom/right to a
  multiple of the window, odd blocks roll it by ``-window // 2`` and mask windows that straddle the roll
  (-100 between regions, as mmdetection), add a learned relative position bias per head;
* patch merging: pad to even sizes, gather each 2x2 neighbourhood channel-major (index ``c * 4 + dy * 2 + dx``,
  the order of mmdetection's ``nn.Unfold``), LayerNorm over the 4C values, linear to 2C without bias;
* a LayerNorm on each returned stage (``norm1``..``norm3``), features returned as NCHW.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import stochastic_depth

from ..config import SwinConfig


def relative_position_index(window: int) -> Tensor:
    """[w*w, w*w] index into the bias table for each (query, key) pair of one window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a relative position bias per head."""

    relative_position_index: Tensor  # a buffer

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # saved with the weights, as mmdetection does (its checkpoints carry it)
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, windows: Tensor, mask: Tensor | None) -> Tensor:
        """windows [B, nW, N, C] (N = window**2); mask [nW, N, N] of 0 / -100 or None."""
        b, nw, n, c = windows.shape
        q, k, v = self.qkv(windows).view(b, nw, n, 3, self.num_heads, c // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.num_heads).permute(2, 0, 1)  # [heads, N, N]
        if mask is not None:
            bias = bias + mask[:, None]  # [nW, heads, N, N]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # [B, nW, heads, N, hd]
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _to_windows(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] (H, W multiples of window) -> [B, nW, window**2, C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def _from_windows(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    b, _, _, c = windows.shape
    x = windows.view(b, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> Tensor:
    """[nW, N, N]: -100 between tokens that the roll brought from different regions of the padded map, else 0."""
    region = torch.zeros(h, w, device=device)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (rows, cols) in enumerate((r, c) for r in bounds for c in bounds):
        region[rows, cols] = i
    ids = _to_windows(region.view(1, h, w, 1), window).view(-1, window * window)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, shifted: bool, drop_path: float) -> None:
        super().__init__()
        self.window = window
        self.shift = window // 2 if shifted else 0
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def _attention(self, x: Tensor, mask: Tensor | None) -> Tensor:
        _, h, w, _ = x.shape
        ws = self.window
        x = F.pad(x, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        hp, wp = x.shape[1:3]
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), dims=(1, 2))
        x = _from_windows(self.attn(_to_windows(x, ws), mask), ws, hp, wp)
        if self.shift:
            x = torch.roll(x, (self.shift, self.shift), dims=(1, 2))
        return x[:, :h, :w]

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + stochastic_depth(self._attention(self.norm1(x), mask), self.drop_path, "row", self.training)
        return x + stochastic_depth(self.mlp(self.norm2(x)), self.drop_path, "row", self.training)


class PatchMerging(nn.Module):
    """2x2 neighbourhoods to one token: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h, w = x.shape[1:3]
        # channel-major within the neighbourhood: c * 4 + dy * 2 + dx
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, drop_paths: list[float],
                 downsample: bool) -> None:
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, shifted=i % 2 == 1, drop_path=drop_paths[i]) for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        """The stage's output (before patch merging); ``self.downsample`` is applied by the caller."""
        ws = self.window
        hp, wp = -(-x.shape[1] // ws) * ws, -(-x.shape[2] // ws) * ws
        mask = shifted_window_mask(hp, wp, ws, ws // 2, x.device) if len(self.blocks) > 1 else None
        for block in self.blocks:
            x = block(x, mask if block.shift else None)
        return x


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.projection = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        p = self.patch
        images = F.pad(images, (0, (p - w % p) % p, 0, (p - h % p) % p))
        return self.norm(self.projection(images).permute(0, 2, 3, 1))  # [B, H/4, W/4, C]


class SwinBody(nn.Module):
    """Swin Transformer returning stages 2-4 (strides 8, 16, 32; channels 2C, 4C, 8C), each layer-normed.

    ``frozen_stages`` as mmdetection's Swin: -1 trains everything, 0 freezes the patch embedding, k > 0 also
    stages 1..k (and their output norms), which then stay in eval mode (no stochastic depth).
    """

    out_indices = (1, 2, 3)

    def __init__(self, spec: SwinConfig, drop_path_rate: float = 0.0, frozen_stages: int = -1) -> None:
        """``spec``: a resolved shape (``config.resolved_swin``), every number given."""
        super().__init__()
        self.patch_embed = PatchEmbed(spec.embed_dim)
        # stochastic depth grows with depth (on the CPU also while a checkpoint builds the model on "meta")
        rates = torch.linspace(0, drop_path_rate, sum(spec.depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(spec.depths, spec.num_heads)):
            first = sum(spec.depths[:i])
            self.stages.append(SwinStage(spec.embed_dim * 2**i, depth, heads, spec.window_size,
                                         rates[first:first + depth], downsample=i < 3))
        self.out_channels = [spec.embed_dim * 2**i for i in self.out_indices]
        for i, channels in zip(self.out_indices, self.out_channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        for m in self.modules():  # mmdetection's initialisation when no pretrained weights are given
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.frozen_stages = frozen_stages
        for p in self._frozen_parameters():
            p.requires_grad_(False)

    def _frozen_modules(self) -> list[nn.Module]:
        modules: list[nn.Module] = [self.patch_embed] if self.frozen_stages >= 0 else []
        for i in range(self.frozen_stages):
            modules.append(self.stages[i])
            if i in self.out_indices:
                modules.append(getattr(self, f"norm{i}"))
        return modules

    def _frozen_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._frozen_modules() for p in m.parameters()]

    def train(self, mode: bool = True) -> "SwinBody":
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.patch_embed(images)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
            downsample = stage.downsample
            if isinstance(downsample, nn.Module):
                x = downsample(x)
        return outs
