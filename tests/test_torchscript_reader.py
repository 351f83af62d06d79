"""models.torchscript_reader: TorchScript archives read to state dicts without running code."""

from __future__ import annotations

import os
import pickle
import re
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from models.torchscript_reader import (ArchiveFormatError, UnsafeArchiveError,
                                       is_torchscript_archive, read_torchscript_state_dict)
from tests.clip_factory import TINY_GEOMETRY, make_clip_state_dict, write_torchscript


# ---------------------------------------------------------------- helpers

def _jit_state_dict(path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def _assert_same(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for key, value in ref.items():
        assert ours[key].dtype == value.dtype, key
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


def _save_script(module: nn.Module, path: Path, trace_input=None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = (torch.jit.trace(module, trace_input) if trace_input is not None
                    else torch.jit.script(module))
        torch.jit.save(scripted, str(path))
    return path


def _prefix(path) -> str:
    with zipfile.ZipFile(path) as zf:
        return next(n for n in zf.namelist() if n.endswith("/data.pkl")).split("/")[0]


def _rewrite(src, dst, replace: dict[str, bytes | None]) -> Path:
    """Copy a torch zip, replacing (or with None dropping) records named relative to the
    top folder; names in ``replace`` that the source lacks are added."""
    prefix = _prefix(src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            if rel in replace:
                if replace[rel] is not None:
                    zout.writestr(info.filename, replace[rel])
            else:
                zout.writestr(info.filename, zin.read(info))
        for rel, data in replace.items():
            if data is not None and f"{prefix}/{rel}" not in zin.namelist():
                zout.writestr(f"{prefix}/{rel}", data)
    return Path(dst)


def _write_zip(path, records: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data)
    return Path(path)


# Hand-written pickle (protocol 2) opcodes, for archives torch no longer writes and attacks.
def _s(text: str) -> bytes:
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _i(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _g(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _call(module: str, name: str, *args: bytes) -> bytes:
    return _g(module, name) + _tup(*args) + b"R"


def _storage(stype: str, key: str, numel: int, module: str = "torch") -> bytes:
    return _tup(_s("storage"), _g(module, stype), _s(key), _s("cpu"), _i(numel)) + b"Q"


def _tensor(storage: bytes, offset: int, size, stride) -> bytes:
    return _call("torch._utils", "_rebuild_tensor_v2", storage, _i(offset),
                 _tup(*map(_i, size)), _tup(*map(_i, stride)), b"\x89",
                 _g("collections", "OrderedDict") + b")R")


def _record(cls: str, attrs: dict[str, bytes]) -> bytes:
    """A scripted module the way torch.jit.save writes it: NEWOBJ, then BUILD with a dict."""
    return (_g("__torch__.model", cls) + b")\x81}(" + b"".join(_s(k) + v for k, v in
                                                          attrs.items()) + b"ub")


def _pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


# ---------------------------------------------------------------- archives torch writes

@pytest.fixture(scope="module")
def clip_archives(tmp_path_factory):
    d = tmp_path_factory.mktemp("ts_clip")
    sd = make_clip_state_dict(seed=0, **TINY_GEOMETRY)
    paths = {"fp32": d / "clip32.pt", "fp16": d / "clip16.pt"}
    write_torchscript(paths["fp32"], sd)
    write_torchscript(paths["fp16"], {k: v.half() for k, v in sd.items()})
    return paths


@pytest.mark.parametrize("kind", ["fp32", "fp16"])
def test_clip_layout_matches_jit_load(clip_archives, kind):
    path = clip_archives[kind]
    ref = _jit_state_dict(path)
    ours = read_torchscript_state_dict(path)
    _assert_same(ours, ref)
    assert {"visual.conv1.weight", "transformer.resblocks.0.attn.in_proj_weight",
            "input_resolution", "vocab_size"} <= set(ours)
    assert ours["visual.conv1.weight"].dtype == (torch.float16 if kind == "fp16"
                                                 else torch.float32)
    assert ours["vocab_size"].dtype == torch.int64
    with zipfile.ZipFile(path) as zf:  # the installed torch writes the typed-storage form
        data = zf.read(f"{_prefix(path)}/data.pkl")
    assert (b"ctorch\nHalfStorage\n" if kind == "fp16" else b"ctorch\nFloatStorage\n") in data


class _Tree(nn.Module):
    """Scripted nn.Module tree with views of one storage, a transposed buffer and
    non-tensor attributes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        base = torch.randn(12)
        self.register_buffer("transposed", base.view(3, 4).t())  # non-contiguous view
        self.head = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.GELU(), nn.Linear(3, 2))
        self.first = nn.Parameter(base[2:6])  # offset view
        self.second = nn.Parameter(base[6:].view(2, 3))
        self.blocks = nn.ModuleList([nn.Linear(2, 2, bias=False), nn.Linear(2, 2)])
        self.register_buffer("steps", torch.tensor([1, 2, 3]))
        self.register_buffer("flags", torch.tensor([True, False]))
        self.register_buffer("brain", torch.ones(2, dtype=torch.bfloat16))
        self.register_buffer("empty", torch.zeros(0, 3).half())
        self.scale = 0.5
        self.label = "tree"
        self.sizes: list[int] = [1, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(x) * self.scale + float(len(self.label) + len(self.sizes))
        for block in self.blocks:
            y = block(y)
        return y


def test_scripted_module_tree_and_shared_storage(tmp_path):
    path = _save_script(_Tree(), tmp_path / "tree.pt")
    ref = _jit_state_dict(path)
    ours = read_torchscript_state_dict(path)
    _assert_same(ours, ref)
    assert "blocks.0.bias" not in ours  # a None parameter is no entry
    first, second, transposed = ours["first"], ours["second"], ours["transposed"]
    assert first.storage_offset() == 2 and second.storage_offset() == 6
    assert not transposed.is_contiguous()
    assert (first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
            == transposed.untyped_storage().data_ptr())
    assert all(not t.requires_grad for t in ours.values())


class _Block(nn.Module):
    def __init__(self, attn_mask=None):
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.attn_mask = attn_mask  # a plain attribute, as in OpenAI's ResidualAttentionBlock

    def forward(self, x):
        mask = self.attn_mask
        return self.ln(x) + (mask.sum() if mask is not None else 0)


class _Traced(nn.Module):
    def __init__(self):
        super().__init__()
        self.text = _Block(torch.triu(torch.full((3, 3), -1.0), 1))
        self.visual = _Block()

    def forward(self, x):
        return self.text(x) + self.visual(x)


def test_traced_module_matches_jit_load(tmp_path):
    path = _save_script(_Traced(), tmp_path / "traced.pt", trace_input=torch.randn(2, 4))
    _assert_same(read_torchscript_state_dict(path), _jit_state_dict(path))


def test_torch_save_zip_of_a_state_dict(tmp_path):
    sd = {"a": torch.randn(3, 2).half(), "b": torch.arange(4), "c": nn.Parameter(torch.ones(2))}
    torch.save(sd, tmp_path / "sd.pt")
    assert not is_torchscript_archive(tmp_path / "sd.pt")
    ours = read_torchscript_state_dict(tmp_path / "sd.pt")
    _assert_same(ours, {k: v.detach() for k, v in sd.items()})


def test_is_torchscript_archive(clip_archives, tmp_path):
    assert is_torchscript_archive(clip_archives["fp32"])
    assert is_torchscript_archive(str(clip_archives["fp16"]))
    (tmp_path / "text.pt").write_text("not a zip")
    assert not is_torchscript_archive(tmp_path / "text.pt")
    assert not is_torchscript_archive(tmp_path / "missing.pt")
    _write_zip(tmp_path / "plain.zip", {"a/readme.txt": b"x"})
    assert not is_torchscript_archive(tmp_path / "plain.zip")


def test_code_and_constants_are_never_read(clip_archives, tmp_path):
    src = clip_archives["fp32"]
    bomb = _pickle(_call("builtins", "exec", _s(f"open({str(tmp_path / 'ran')!r}, 'w')")))
    with zipfile.ZipFile(src) as zf:
        code = [n.split("/", 1)[1] for n in zf.namelist() if "/code/" in n]
    dst = _rewrite(src, tmp_path / "odd.pt", {"constants.pkl": bomb,
                                              **{rel: b"raise SystemExit" for rel in code}})
    _assert_same(read_torchscript_state_dict(dst), read_torchscript_state_dict(src))
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------- hand-built old forms

def test_hand_built_typed_storage_archive(tmp_path):
    values = torch.arange(10, dtype=torch.float16) / 4
    body = _record("CLIP", {
        "weight": _tensor(_storage("HalfStorage", "0", 10), 2, (2, 3), (1, 2)),
        "training": b"\x89",
        "visual": _record("VisionTransformer", {
            "proj": _tensor(_storage("HalfStorage", "0", 10), 0, (10,), (1,)),
            "training": b"\x89"}),
    })
    records = {"old/data.pkl": _pickle(body), "old/data/0": values.numpy().tobytes(),
               "old/version": b"3\n", "old/constants.pkl": _pickle(b")"),
               "old/code/__torch__/model.py": b""}
    path = _write_zip(tmp_path / "old.pt", records)
    assert is_torchscript_archive(path)
    sd = read_torchscript_state_dict(path)
    assert list(sd) == ["weight", "visual.proj"]
    assert sd["weight"].dtype == torch.float16
    assert torch.equal(sd["weight"], values.as_strided((2, 3), (1, 2), 2))
    assert torch.equal(sd["visual.proj"], values)
    assert (sd["weight"].untyped_storage().data_ptr()
            == sd["visual.proj"].untyped_storage().data_ptr())

    # The same archive written on a big-endian machine.
    swapped = values.numpy().byteswap().tobytes()
    big = _write_zip(tmp_path / "big.pt", dict(records, **{"old/data/0": swapped,
                                                          "old/byteorder": b"big"}))
    _assert_same(read_torchscript_state_dict(big), sd)


@pytest.mark.parametrize("stype,module,dtype", [
    ("UntypedStorage", "torch.storage", torch.uint8), ("float16", "torch", torch.float16),
    ("LongStorage", "torch", torch.int64), ("BFloat16Storage", "torch", torch.bfloat16)])
def test_other_storage_forms(tmp_path, stype, module, dtype):
    values = torch.arange(6).to(dtype)
    body = _record("M", {"x": _tensor(_storage(stype, "7", 6, module), 0, (2, 3), (3, 1))})
    raw = values.view(torch.uint8).numpy().tobytes()
    path = _write_zip(tmp_path / "m.pt", {"m/data.pkl": _pickle(body), "m/data/7": raw})
    sd = read_torchscript_state_dict(path)
    assert sd["x"].dtype == dtype and torch.equal(sd["x"], values.view(2, 3))


# ---------------------------------------------------------------- malicious archives

def _payload(module: str, name: str, target: Path) -> bytes:
    if name == "system":
        return _call(module, name, _s(f"touch '{target}'"))
    return _call(module, name, _s(f"open({str(target)!r}, 'w').close()"))


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"),
                                         ("builtins", "exec"), ("builtins", "eval")])
def test_forbidden_global_is_refused_without_side_effect(clip_archives, tmp_path, module,
                                                         name):
    if name == "system" and os.name != "posix":
        pytest.skip("shell payload needs a POSIX shell")
    # The payload is real: plain pickle runs it (in a child process, touching tmp_path only).
    control = tmp_path / "control.pkl"
    control.write_bytes(_pickle(_payload(module, name, tmp_path / "control")))
    subprocess.run([sys.executable, "-c", "import pickle, sys; "
                    "pickle.loads(open(sys.argv[1], 'rb').read())", str(control)],
                   check=True, timeout=60)
    assert (tmp_path / "control").exists()

    evil = _pickle(_payload(module, name, tmp_path / "pwned"))
    path = _rewrite(clip_archives["fp16"], tmp_path / "evil.pt", {"data.pkl": evil})
    with pytest.raises(UnsafeArchiveError) as info:
        read_torchscript_state_dict(path)
    message = str(info.value)
    assert f"{module}.{name}" in message and str(path) in message and "\n" not in message
    assert not (tmp_path / "pwned").exists()


def test_payload_nested_in_a_torch_module_is_refused(clip_archives, tmp_path):
    target = tmp_path / "pwned"
    weight = _tensor(_storage("FloatStorage", "0", 4), 0, (4,), (1,))
    attack_in_state = _record("CLIP", {"weight": weight,
                                       "evil": _payload("posix", "system", target)})
    # __reduce__ style: the module class called with an argument that is itself a call.
    attack_in_args = (_g("__torch__.model", "CLIP")
                      + _tup(_payload("builtins", "exec", target)) + b"R")
    for i, body in enumerate([attack_in_state, attack_in_args]):
        path = _rewrite(clip_archives["fp32"], tmp_path / f"evil{i}.pt",
                        {"data.pkl": _pickle(body)})
        with pytest.raises(UnsafeArchiveError, match=r"posix\.system|builtins\.exec"):
            read_torchscript_state_dict(path)
    assert not target.exists()


@pytest.mark.parametrize("module,name", [
    ("builtins", "getattr"), ("__builtin__", "eval"), ("subprocess", "Popen"), ("nt", "system"),
    ("torch", "load"), ("torch.nn.modules.linear", "Linear"), ("torch.jit", "load"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("collections", "OrderedDict.fromkeys"),
    ("torch.jit._pickle", "build_tensor_from_id"), ("torch.serialization", "load")])
def test_any_other_global_is_refused(tmp_path, module, name):
    for i, ref in enumerate([_g(module, name),  # GLOBAL and protocol 4 STACK_GLOBAL
                             b"\x8c" + bytes([len(module)]) + module.encode() + b"\x8c"
                             + bytes([len(name)]) + name.encode() + b"\x93"]):
        path = _write_zip(tmp_path / f"g{i}.pt", {"a/data.pkl": b"\x80\x04" + ref + b"."})
        with pytest.raises(UnsafeArchiveError, match=re.escape(f"'{module}.{name}'")):
            read_torchscript_state_dict(path)


def test_tampering_with_storages_or_tensors_is_refused(tmp_path):
    data = torch.zeros(4).numpy().tobytes()
    storage = _storage("FloatStorage", "0", 4)
    grow = b"N}" + _s("numel") + _i(1 << 20) + b"s\x86b"  # BUILD (None, {slot: value})
    tensor_state = b"N}" + _s("tensor") + b"N" + b"s\x86b"
    for i, body in enumerate([storage + b"q\x00" + grow + b"0",
                              _tensor(storage, 0, (4,), (1,)) + tensor_state + b"0"]):
        path = _write_zip(tmp_path / f"t{i}.pt", {"a/data.pkl": _pickle(_record("M", {}) + body),
                                                  "a/data/0": data})
        with pytest.raises(UnsafeArchiveError, match="modify"):
            read_torchscript_state_dict(path)


@pytest.mark.parametrize("offset,size,stride", [(3, (2,), (1,)), (0, (2, 3), (3, 1)),
                                                (0, (2,), (-1,))])
def test_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride):
    body = _record("M", {"x": _tensor(_storage("FloatStorage", "0", 4), offset, size, stride)})
    path = _write_zip(tmp_path / "oob.pt", {"a/data.pkl": _pickle(body),
                                            "a/data/0": bytes(16)})
    with pytest.raises(ArchiveFormatError, match="past the end of|bad tensor geometry"):
        read_torchscript_state_dict(path)


# ---------------------------------------------------------------- broken files

def test_truncated_archive(clip_archives, tmp_path):
    raw = clip_archives["fp32"].read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(raw[: len(raw) // 2])
    assert not is_torchscript_archive(path)
    with pytest.raises(ArchiveFormatError) as info:
        read_torchscript_state_dict(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_other_broken_archives(clip_archives, tmp_path):
    src = clip_archives["fp32"]
    broken = {
        "no_data_pkl": _rewrite(src, tmp_path / "a.pt", {"data.pkl": None}),
        "missing_storage": _rewrite(src, tmp_path / "b.pt", {"data/0": None}),
        "short_storage": _rewrite(src, tmp_path / "c.pt", {"data/0": b"\0" * 8}),
        "bad_pickle": _rewrite(src, tmp_path / "d.pt", {"data.pkl": b"\x80\x02(J"}),
        "bad_byteorder": _rewrite(src, tmp_path / "e.pt", {"byteorder": b"middle"}),
        "not_a_module": _rewrite(src, tmp_path / "f.pt", {"data.pkl": pickle.dumps([1], 2)}),
    }
    (tmp_path / "g.pt").write_text("hello")
    broken["not_a_zip"] = tmp_path / "g.pt"
    broken["missing"] = tmp_path / "nothing.pt"
    for why, path in broken.items():
        with pytest.raises(ArchiveFormatError) as info:
            read_torchscript_state_dict(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), why


# ---------------------------------------------------------------- load_clip: never executed

@pytest.fixture
def jit_calls(monkeypatch):
    """Records every torch.jit.load call (and still performs it)."""
    calls = []
    real = torch.jit.load

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", spy)
    return calls


def test_load_clip_reads_archives_without_jit(clip_archives, jit_calls):
    from models.weights import build_clip, load_clip

    sd = make_clip_state_dict(seed=0, **TINY_GEOMETRY)
    for kind in ("fp32", "fp16"):
        model = load_clip(clip_archives[kind], image_size=32)
        reference = build_clip({k: v.half() if kind == "fp16" else v for k, v in sd.items()},
                               image_size=32)
        for key, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
    assert jit_calls == []


def test_load_clip_refuses_a_malicious_archive(clip_archives, tmp_path, jit_calls):
    from models.errors import WeightsError
    from models.weights import load_clip

    evil = _pickle(_payload("os", "system", tmp_path / "pwned"))
    path = _rewrite(clip_archives["fp16"], tmp_path / "ViT-B-16-mirror.pt", {"data.pkl": evil})
    with pytest.raises(WeightsError) as info:
        load_clip(path, image_size=32)
    message = str(info.value)
    assert "os.system" in message and str(path) in message and "\n" not in message
    assert "SHA-256" in message
    assert not (tmp_path / "pwned").exists() and jit_calls == []


def test_only_a_verified_openai_file_falls_back_to_jit(clip_archives, tmp_path, monkeypatch,
                                                        jit_calls, caplog):
    """An archive the restricted reader cannot parse reaches torch.jit.load only when its
    SHA-256 is one of OpenAI's published files (simulated here by listing this file's)."""
    import logging

    import models.weights as weights
    from models.errors import WeightsError

    def cannot_parse(path):
        raise ArchiveFormatError(f"'{path}' holds a form this reader does not know")

    monkeypatch.setattr(weights, "read_torchscript_state_dict", cannot_parse)
    path = clip_archives["fp16"]
    with pytest.raises(WeightsError, match="does not know"):
        weights.load_clip(path, image_size=32)
    assert jit_calls == []                                         # unverified: refused

    digest = weights.sha256_of(path)
    monkeypatch.setitem(weights.OPENAI_SHA256, "ViT-B-16.pt", digest)
    with caplog.at_level(logging.INFO, logger="models"):
        model = weights.load_clip(path, image_size=32)
    assert jit_calls == [str(path)]
    assert any("torch.jit.load" in r.getMessage() and "ViT-B-16.pt" in r.getMessage()
               for r in caplog.records)
    sd = make_clip_state_dict(seed=0, **TINY_GEOMETRY)
    reference = weights.build_clip({k: v.half() for k, v in sd.items()}, image_size=32)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_load_clip_truncated_archive_is_the_same_one_line(clip_archives, tmp_path, jit_calls):
    from models.errors import WeightsError
    from models.weights import load_clip

    raw = clip_archives["fp32"].read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsError) as info:
        load_clip(path, image_size=32)
    message = str(info.value)
    assert "neither a TorchScript archive nor a state dict" in message and "\n" not in message
    assert jit_calls == []
