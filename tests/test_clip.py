import math
import os

import pytest
import torch
import torch.nn.functional as F

from models.clip import CLIPGeometry
from models.errors import WeightsError
from models.weights import OPENAI_SHA256, build_clip, load_clip, resize_position_grid
from tests.clip_factory import (GEOMETRIES, clip_shapes, make_clip_state_dict,
                                write_state_dict, write_torchscript)

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")
TINY = dict(vision_width=64, vision_layers=3, patch=8, grid=3, text_width=64, text_layers=2,
            embed_dim=48)


# ---------------------------------------------------------------------------------------------
# An independent, straightforward CLIP forward on the raw state dict (sequence-first, explicit
# softmax attention), used as the reference.

def _ln(x, sd, p):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * sd[p + ".weight"] + sd[p + ".bias"]


def _act(x, activation):
    if activation == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _block(x, sd, p, heads, activation, causal):
    t, b, c = x.shape
    h = _ln(x, sd, p + "ln_1")
    qkv = h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
    q, k, v = qkv.split(c, dim=-1)
    hd = c // heads

    def split(z):  # [T, B, C] -> [B, H, T, hd]
        return z.reshape(t, b, heads, hd).permute(1, 2, 0, 3)

    att = split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd)
    if causal:
        mask = torch.full((t, t), float("-inf")).triu(1)
        att = att + mask
    out = att.softmax(-1) @ split(v)                        # [B, H, T, hd]
    out = out.permute(2, 0, 1, 3).reshape(t, b, c)
    x = x + out @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = _ln(x, sd, p + "ln_2")
    h = _act(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"], activation)
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def reference_image(sd, images, layers, activation, pos=None):
    sd = {k: v.double() for k, v in sd.items()}
    images = images.double()
    w = sd["visual.conv1.weight"]
    patch = w.shape[-1]
    x = F.conv2d(images, w, stride=patch).flatten(2).permute(2, 0, 1)   # [G*G, B, V]
    cls = sd["visual.class_embedding"].expand(1, x.shape[1], -1)
    x = torch.cat([cls, x]) + (sd["visual.positional_embedding"] if pos is None
                               else pos.double())[:, None]
    x = _ln(x, sd, "visual.ln_pre")
    heads = max(x.shape[-1] // 64, 1)
    n = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    taken = []
    for i in range(n):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}.", heads, activation, False)
        if i + 1 in layers:
            taken.append(x[1:].permute(1, 0, 2))
    g = _ln(x[0], sd, "visual.ln_post") @ sd["visual.proj"]
    return g, taken


def reference_text(sd, tokens, activation):
    sd = {k: v.double() for k, v in sd.items()}
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    x = x.permute(1, 0, 2)
    heads = max(x.shape[-1] // 64, 1)
    n = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(n):
        x = _block(x, sd, f"transformer.resblocks.{i}.", heads, activation, True)
    x = _ln(x.permute(1, 0, 2), sd, "ln_final")
    return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ sd["text_projection"]


def _tokens(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        body = torch.randint(1, 49000, (4 + 5 * i,), generator=g).tolist()
        row = [49406] + body + [49407]
        rows.append(row + [0] * (77 - len(row)))
    return torch.tensor(rows)


# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    sd32 = make_clip_state_dict(seed=1, **TINY)
    sd16 = {k: v.half() for k, v in sd32.items()}
    write_state_dict(d / "sd32.pt", sd32)
    write_state_dict(d / "sd16.pt", sd16)
    write_torchscript(d / "archive.pt", sd16)
    return d, sd32


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_three_file_kinds_agree_and_match_reference(clip_files, activation):
    d, sd = clip_files
    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    tokens = _tokens()
    outs = []
    for name in ("sd32.pt", "sd16.pt", "archive.pt"):
        m = load_clip(d / name, image_size=24, activation=activation)
        assert all(p.dtype == torch.float32 for p in m.parameters())
        assert not any(p.requires_grad for p in m.parameters())
        g, toks = m.encode_image(images, [1, 3])
        outs.append((g, toks, m.encode_text(tokens)))
    for g, toks, t in outs[1:]:
        torch.testing.assert_close(g, outs[0][0], rtol=0, atol=0)
        torch.testing.assert_close(t, outs[0][2], rtol=0, atol=0)
        for a, b in zip(toks, outs[0][1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    g_ref, toks_ref = reference_image(sd, images, [1, 3], activation)
    g, toks, t = outs[0]
    assert g.shape == (2, 48) and toks[0].shape == (2, 9, 64)
    torch.testing.assert_close(g.double(), g_ref, rtol=0, atol=1e-5)
    for a, b in zip(toks, toks_ref):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-5)
    torch.testing.assert_close(t.double(), reference_text(sd, tokens, activation),
                               rtol=0, atol=1e-5)


def test_resized_grid_matches_interpolate_and_reference(clip_files):
    d, sd = clip_files
    m = load_clip(d / "sd32.pt", image_size=40)   # grid 3 -> 5
    assert m.grid_size == 5
    pos = sd["visual.positional_embedding"]
    grid = pos[1:].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(5, 5), mode="bicubic", antialias=True,
                         align_corners=False).permute(0, 2, 3, 1).reshape(25, -1)
    got = m.visual.positional_embedding.detach()
    torch.testing.assert_close(got[0], pos[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1:], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(resize_position_grid(pos, 5), got, rtol=0, atol=0)
    images = torch.randn(1, 3, 40, 40)
    g, toks = m.encode_image(images, [2])
    g_ref, toks_ref = reference_image(sd, images, [2], "gelu", pos=got)
    torch.testing.assert_close(g.double(), g_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(toks[0].double(), toks_ref[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="image_size"):
        m.encode_image(torch.randn(1, 3, 24, 24), [1])


def test_text_embedding_entry_cut_equals_full(clip_files):
    d, _ = clip_files
    m = load_clip(d / "sd32.pt", image_size=24)
    tokens = _tokens(4, seed=3)
    emb = m.token_embedding(tokens)
    eot = tokens.argmax(-1)
    full = m.encode_text_embeddings(emb, eot)
    cut = m.encode_text_embeddings(emb[:, : int(eot.max()) + 1], eot)
    # exact in real arithmetic (causal mask); float32 kernels of another length may differ in
    # the last bits (1.1e-6 seen on one CPU), a wrong cut by O(1)
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(m.encode_text(tokens), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="context length"):
        m.encode_text_embeddings(torch.zeros(1, 78, 64), torch.tensor([3]))


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14", "ViT-L-14-336"])
def test_geometry_inference_on_meta(name):
    vw, vl, patch, grid, tw, tl, dim = GEOMETRIES[name]
    sd = make_clip_state_dict(device="meta", vision_width=vw, vision_layers=vl, patch=patch,
                              grid=grid, text_width=tw, text_layers=tl, embed_dim=dim)
    g = CLIPGeometry.from_state_dict(sd)
    assert (g.vision_width, g.vision_layers, g.patch_size, g.grid_size) == (vw, vl, patch, grid)
    assert (g.text_width, g.text_layers, g.embed_dim) == (tw, tl, dim)
    assert (g.context_length, g.vocab_size) == (77, 49408)
    assert g.vision_heads == vw // 64 and g.text_heads == tw // 64
    assert g.native_image_size == {"ViT-B-16": 224, "ViT-L-14": 224, "ViT-L-14-336": 336}[name]
    with torch.device("meta"):
        from models.clip import CLIP
        model = CLIP(g, image_size=518 if patch == 14 else 512)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {k: tuple(v) for k, v in clip_shapes(vision_width=vw, vision_layers=vl, patch=patch,
                                                grid=model.grid_size, text_width=tw,
                                                text_layers=tl, embed_dim=dim).items()}
    assert own == want
    assert model.grid_size == (37 if patch == 14 else 32)


def test_golden_image_features():
    case = torch.load(os.path.join(GOLDEN, "case.pt"), weights_only=True)
    exp = torch.load(os.path.join(GOLDEN, "expected.pt"), weights_only=True)
    m = load_clip(os.path.join(GOLDEN, "clip_tiny_fp16.pt"), image_size=224,
                  activation="gelu")
    g, toks = m.encode_image(case["images"], case["layers"])
    torch.testing.assert_close(g, exp["global"], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack(toks, 1), exp["tokens"], rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Bad input

def test_missing_file_names_path_and_download(tmp_path):
    with pytest.raises(WeightsError) as e:
        load_clip(tmp_path / "ViT-B-16.pt")
    msg = str(e.value)
    assert "ViT-B-16.pt" in msg and OPENAI_SHA256["ViT-B-16.pt"] in msg and str(tmp_path) in msg
    with pytest.raises(WeightsError, match="ViT-L-14-336px.pt"):
        load_clip(tmp_path / "mine.pt")


def test_garbage_file(tmp_path):
    p = tmp_path / "garbage.pt"
    p.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="neither a TorchScript archive nor a state dict"):
        load_clip(p)
    q = tmp_path / "list.pt"
    torch.save([1, 2, 3], q)
    with pytest.raises(WeightsError, match="state dict"):
        load_clip(q)


def test_missing_key_and_wrong_shape(tmp_path):
    sd = make_clip_state_dict(**TINY)
    bad = dict(sd)
    del bad["visual.ln_post.bias"]
    write_state_dict(tmp_path / "a.pt", bad)
    with pytest.raises(WeightsError, match=r"missing keys: visual\.ln_post\.bias"):
        load_clip(tmp_path / "a.pt", image_size=24)
    bad = dict(sd)
    bad["transformer.resblocks.0.mlp.c_fc.bias"] = torch.zeros(7)
    write_state_dict(tmp_path / "b.pt", bad)
    with pytest.raises(WeightsError, match=r"wrong shapes: transformer\.resblocks\.0\.mlp"):
        load_clip(tmp_path / "b.pt", image_size=24)
    bad = dict(sd)
    bad["visual.extra"] = torch.zeros(1)
    write_state_dict(tmp_path / "c.pt", bad)
    with pytest.raises(WeightsError, match=r"unexpected keys: visual\.extra"):
        load_clip(tmp_path / "c.pt", image_size=24)
    del sd["visual.conv1.weight"]
    write_state_dict(tmp_path / "d.pt", sd)
    with pytest.raises(WeightsError, match="visual.conv1.weight"):
        load_clip(tmp_path / "d.pt", image_size=24)


def test_checksum_of_known_names(tmp_path, clip_files):
    d, sd = clip_files
    p = tmp_path / "ViT-L-14-336px.pt"
    write_state_dict(p, sd)
    with pytest.raises(WeightsError, match="truncated or damaged"):
        load_clip(p, image_size=24)
    m = load_clip(p, image_size=24, verify=False)
    assert m.embed_dim == 48


def test_bad_arguments(clip_files):
    d, sd = clip_files
    with pytest.raises(ValueError, match="activation"):
        load_clip(d / "sd32.pt", activation="relu")
    with pytest.raises(ValueError, match="multiple of the CLIP patch size"):
        build_clip(sd, image_size=30)
    m = load_clip(d / "sd32.pt", image_size=24)
    with pytest.raises(ValueError, match="out of range"):
        m.encode_image(torch.zeros(1, 3, 24, 24), [4])
