#!/usr/bin/env python3
"""Reference checkpoints and forward passes for picie's ViT backbones (src/model/vit/).

No weights are downloaded: every tensor is random (seeded), saved in the authors' state-dict
layout (DINO's `dino_deitsmall{8,16}_pretrain.pth`, DINOv2's `dinov2_vits14[_reg4]_pretrain.pth`:
`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1,norm2,
mlp.fc1,mlp.fc2,ls2}.*`, `norm.*`, and for DINOv2 `mask_token` and `register_tokens`). The
reference forward is the authors' token pipeline (patch embedding, class token, positional
embedding interpolated by their own `interpolate_pos_encoding`, copied below, registers, blocks,
`get_intermediate_layers(norm=True)`) with timm's `Block` for the transformer blocks: an
implementation independent of picie's, with the same tensor names.

  make-vit-fixtures.py tiny OUT_DIR   the small fixtures committed under fixtures/vit/
  make-vit-fixtures.py real OUT_DIR   ViT-S/8, ViT-S/16, DINOv2 ViT-S/14 (+reg4) at their real
                                      sizes, each reference but the registers' checked against
                                      timm's own VisionTransformer (some 350 MB, not committed; then
                                      PICIE_VIT_REAL=OUT_DIR cargo test --test vit)

Each variant NAME writes NAME.pth (the checkpoint), NAME.json (its architecture, as picie's
VitSpec reads it) and NAME.reference.safetensors (`taps.{size}.{tap}`: 1 x dim x gh x gw, the
four tapped blocks after the final norm, for each input size). The input of size H x W is
x[i] = ((i * 7919) % 1000) / 999 - 0.5 over the flat 1 x 3 x H x W array, as the Rust tests
make it.

Needs torch, timm and safetensors (pip install torch timm safetensors, from PyPI).
"""

import json
import math
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import Block

# name: family, patch, dim, depth, heads, pos grid (M: the checkpoint's pos_embed is M*M + 1
# tokens), layer scale, registers, input sizes (H, W), weight dtype in the file.
REAL = {
    # DINO ViT-S/8 and ViT-S/16: trained at 224, so M = 28 and 14; 224 x 224 takes the
    # authors' early return (no interpolation), the other size interpolates.
    "dino-vits8": ("dino", 8, 384, 12, 6, 28, False, 0, [(224, 224), (176, 240)], torch.float32),
    "dino-vits16": ("dino", 16, 384, 12, 6, 14, False, 0, [(224, 224), (176, 240)], torch.float32),
    # DINOv2 ViT-S/14: pos_embed for 518 x 518 (M = 37), layer scale, a mask token.
    "dinov2-vits14": ("dinov2", 14, 384, 12, 6, 37, True, 0, [(224, 224), (182, 238)], torch.float32),
    "dinov2-vits14-reg": ("dinov2", 14, 384, 12, 6, 37, True, 4, [(224, 224), (182, 238)], torch.float32),
}
TINY = {
    # Small enough to commit (f16 in the file, the reference computed from the same rounded
    # values): the first size is the stored grid, square (the early return), the second
    # shrinks one axis and stretches the other.
    "tiny-dino-p8": ("dino", 8, 32, 4, 2, 6, False, 0, [(48, 48), (40, 72)], torch.float16),
    "tiny-dinov2-p14-reg": ("dinov2", 14, 32, 4, 2, 4, True, 4, [(56, 56), (42, 84)], torch.float16),
}
LN_EPS = 1e-6
MLP_RATIO = 4
INTERPOLATE_OFFSET = 0.1


def tap_blocks(depth):
    """Four evenly spaced blocks, the last one last (picie's vit::tap_blocks)."""
    return [(k + 1) * depth // 4 - 1 for k in range(4)]


# ---- the authors' positional-embedding interpolation, verbatim but for `self`

def dino_interpolate_pos_encoding(pos_embed, patch_size, x, w, h):
    """facebookresearch/dino vision_transformer.py, VisionTransformer.interpolate_pos_encoding."""
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    # we add a small number to avoid floating point error in the interpolation
    # see discussion at https://github.com/facebookresearch/dino/issues/8
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode='bicubic',
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def dinov2_interpolate_pos_encoding(pos_embed, patch_size, x, w, h, interpolate_offset=INTERPOLATE_OFFSET,
                                    interpolate_antialias=False):
    """facebookresearch/dinov2 dinov2/models/vision_transformer.py, DinoVisionTransformer.interpolate_pos_encoding
    (the hub models use interpolate_offset=0.1, interpolate_antialias=False)."""
    previous_dtype = x.dtype
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    M = int(math.sqrt(N))  # Recover the number of patches in each dimension
    assert N == M * M
    kwargs = {}
    if interpolate_offset:
        sx = float(w0 + interpolate_offset) / M
        sy = float(h0 + interpolate_offset) / M
        kwargs["scale_factor"] = (sx, sy)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=interpolate_antialias,
        **kwargs,
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


# ---- checkpoints

def random_state_dict(family, patch, dim, depth, heads, grid, layer_scale, registers, seed):
    """Every tensor random (biases, norms and layer scales too, so that a transposed or
    swapped tensor shows), at scales that keep the activations in range."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    hidden = MLP_RATIO * dim
    sd = {
        "cls_token": normal(1, 1, dim, std=0.5),
        "pos_embed": normal(1, grid * grid + 1, dim, std=0.5),
        "patch_embed.proj.weight": normal(dim, 3, patch, patch, std=1 / math.sqrt(3 * patch * patch)),
        "patch_embed.proj.bias": normal(dim, std=0.1),
    }
    if family == "dinov2":
        # Used by DINOv2's masked-image training only; picie ignores it.
        sd["mask_token"] = normal(1, dim, std=0.5)
        if registers:
            sd["register_tokens"] = normal(1, registers, dim, std=0.5)
    for i in range(depth):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"] = normal(dim, std=0.1, mean=1.0)
        sd[b + "norm1.bias"] = normal(dim, std=0.1)
        sd[b + "attn.qkv.weight"] = normal(3 * dim, dim, std=1 / math.sqrt(dim))
        sd[b + "attn.qkv.bias"] = normal(3 * dim, std=0.1)
        sd[b + "attn.proj.weight"] = normal(dim, dim, std=1 / math.sqrt(dim))
        sd[b + "attn.proj.bias"] = normal(dim, std=0.1)
        if layer_scale:
            sd[b + "ls1.gamma"] = normal(dim, std=0.2, mean=0.5)
        sd[b + "norm2.weight"] = normal(dim, std=0.1, mean=1.0)
        sd[b + "norm2.bias"] = normal(dim, std=0.1)
        sd[b + "mlp.fc1.weight"] = normal(hidden, dim, std=1 / math.sqrt(dim))
        sd[b + "mlp.fc1.bias"] = normal(hidden, std=0.1)
        sd[b + "mlp.fc2.weight"] = normal(dim, hidden, std=1 / math.sqrt(hidden))
        sd[b + "mlp.fc2.bias"] = normal(dim, std=0.1)
        if layer_scale:
            sd[b + "ls2.gamma"] = normal(dim, std=0.2, mean=0.5)
    sd["norm.weight"] = normal(dim, std=0.1, mean=1.0)
    sd["norm.bias"] = normal(dim, std=0.1)
    return sd


# ---- the reference forward

def reference_taps(sd, family, patch, dim, depth, heads, layer_scale, registers, x):
    blocks = []
    for i in range(depth):
        blk = Block(dim, heads, mlp_ratio=MLP_RATIO, qkv_bias=True, init_values=1e-5 if layer_scale else None,
                    norm_layer=partial(nn.LayerNorm, eps=LN_EPS))
        prefix = f"blocks.{i}."
        blk.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
        blocks.append(blk.eval())
    # prepare_tokens: B, nc, w, h = x.shape (the authors' "w" is the height)
    B, _, w, h = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    gh, gw = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat((sd["cls_token"].expand(B, -1, -1), t), dim=1)
    interpolate = dino_interpolate_pos_encoding if family == "dino" else dinov2_interpolate_pos_encoding
    t = t + interpolate(sd["pos_embed"], patch, t, w, h)
    if registers:
        t = torch.cat((t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]), dim=1)
    taps = []
    wanted = tap_blocks(depth)
    for i, blk in enumerate(blocks):
        t = blk(t)
        if i in wanted:
            out = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], LN_EPS)
            out = out[:, 1 + registers:]
            taps.append(out.reshape(B, gh, gw, dim).permute(0, 3, 1, 2).contiguous())
    return taps


def test_input(h, w):
    i = torch.arange(3 * h * w, dtype=torch.int64)
    return (((i * 7919) % 1000).float() / 999.0 - 0.5).reshape(1, 3, h, w)


def check_against_timm(name, sd, spec, taps):
    """At the stored grid (square: no interpolation anywhere) the reference must equal timm's
    own VisionTransformer built for the same checkpoint: the token pipeline above is right."""
    import timm
    family, patch, dim, depth, heads, grid, layer_scale, registers = spec
    if registers:
        return  # timm stores register models' positional embedding without the class token
    arch = {("dino", 8): "vit_small_patch8_224", ("dino", 16): "vit_small_patch16_224",
            ("dinov2", 14): "vit_small_patch14_dinov2"}[(family, patch)]
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=grid * patch,
                              init_values=1e-5 if layer_scale else None).eval()
    model.load_state_dict({k: v for k, v in sd.items() if k != "mask_token"}, strict=True)
    x = test_input(grid * patch, grid * patch)
    with torch.no_grad():
        ours = reference_taps(sd, family, patch, dim, depth, heads, layer_scale, registers, x)
        theirs = model.forward_intermediates(x, indices=tap_blocks(depth), norm=True, intermediates_only=True)
    for a, b in zip(ours, theirs):
        diff = (a - b).abs().max().item()
        assert diff < 1e-4, f"{name}: reference and timm differ by {diff}"
    print(f"{name}: reference matches timm at {grid * patch}x{grid * patch}")


def make(name, variant, out_dir, seed):
    family, patch, dim, depth, heads, grid, layer_scale, registers, sizes, dtype = variant
    spec = (family, patch, dim, depth, heads, grid, layer_scale, registers)
    sd = random_state_dict(*spec, seed=seed)
    # The file holds `dtype`; the reference runs on exactly those values, in f32.
    stored = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    torch.save(stored, out_dir / f"{name}.pth")
    sd = {k: v.float() for k, v in stored.items()}
    reference = {}
    with torch.no_grad():
        for s, (h, w) in enumerate(sizes):
            taps = reference_taps(sd, *spec[:5], layer_scale, registers, test_input(h, w))
            for t, tap in enumerate(taps):
                reference[f"taps.{s}.{t}"] = tap.contiguous()
    save_file(reference, str(out_dir / f"{name}.reference.safetensors"))
    (out_dir / f"{name}.json").write_text(json.dumps({
        "family": family, "patch": patch, "dim": dim, "depth": depth, "heads": heads,
        "mlp_hidden": MLP_RATIO * dim, "pos_grid": grid, "layer_scale": layer_scale,
        "registers": registers, "sizes": sizes,
    }, indent=2) + "\n")
    if dim == 384:
        check_against_timm(name, sd, spec, None)
    print(f"{name}: {len(stored)} tensors, sizes {sizes}")


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("tiny", "real"):
        sys.exit(__doc__)
    out_dir = Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    variants = TINY if sys.argv[1] == "tiny" else REAL
    for seed, (name, variant) in enumerate(variants.items()):
        make(name, variant, out_dir, seed)


if __name__ == "__main__":
    main()
