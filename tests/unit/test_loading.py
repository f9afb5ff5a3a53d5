"""Strict safetensors loading (SafetensorsSource + load_weights) and atomic saving (save_weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from torchvlm.errors import CheckpointError
from torchvlm.loading import DictSource, SafetensorsSource, WeightMap, load_weights, save_weights


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))


def _ref_state():
    torch.manual_seed(0)
    m = Tiny()
    m.step.fill_(7)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _meta(cls=Tiny):
    with torch.device("meta"):
        return cls()


def _err(fn) -> str:
    with pytest.raises(CheckpointError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------ round trips
def test_round_trip_single(tmp_path):
    sd = _ref_state()
    assert save_weights(sd, tmp_path) == ["model.safetensors"]
    # readable by the reference safetensors implementation, metadata included
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("layers.1.weight"), sd["layers.1.weight"])
    m = _meta()
    load_weights(m, SafetensorsSource(tmp_path), WeightMap(), dtype=torch.float32)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert m.step.dtype == torch.int64 and int(m.step) == 7
    assert not any(p.is_meta for p in m.parameters())
    assert m.layers[0].weight.requires_grad


def test_round_trip_sharded(tmp_path):
    sd = _ref_state()
    names = save_weights(sd, tmp_path, max_shard_size=100)
    assert names[-1] == "model.safetensors.index.json" and len(names) > 3
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    assert set(index["weight_map"]) == set(sd)
    assert all(f in names for f in index["weight_map"].values())
    src = SafetensorsSource(tmp_path)
    assert sorted(src.keys()) == sorted(sd)
    assert src.file_of("lm_head.weight") == index["weight_map"]["lm_head.weight"]
    m = _meta()
    load_weights(m, src, WeightMap(), dtype=torch.float32)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # a later unsharded save replaces the shards and the index
    save_weights(sd, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_reads_reference_safetensors_and_bf16(tmp_path):
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in _ref_state().items()}
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    src = SafetensorsSource(tmp_path)
    assert src.metadata == {"format": "pt"}
    for k, v in sd.items():
        assert torch.equal(src.get(k), v) and src.get(k).dtype == v.dtype
    assert torch.equal(src.get("norm.weight", dtype=torch.float32), sd["norm.weight"].float())


def test_dtype_conversion(tmp_path):
    sd = _ref_state()
    save_weights(sd, tmp_path)
    m = _meta()
    load_weights(m, SafetensorsSource(tmp_path), dtype=torch.bfloat16)
    assert m.layers[0].weight.dtype == torch.bfloat16
    assert torch.equal(m.layers[0].weight, sd["layers.0.weight"].to(torch.bfloat16))
    assert m.norm.weight.dtype == torch.bfloat16
    assert m.step.dtype == torch.int64 and int(m.step) == 7  # non-floating tensors keep the module's dtype


def test_save_shared_noncontiguous_and_bf16(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {"a": base, "b": base, "t": base.t(), "v": base[1:], "h": base.to(torch.bfloat16), "s": torch.tensor(3.0)}
    save_weights(sd, tmp_path)
    src = SafetensorsSource(tmp_path)
    for k, v in sd.items():
        assert torch.equal(src.get(k), v), k
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("t"), base.t())


def test_save_is_atomic_and_leaves_no_temp(tmp_path, monkeypatch):
    save_weights(_ref_state(), tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    import torchvlm.loading as L

    def boom(path, *args):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(L, "_write_safetensors", boom)
    with pytest.raises(OSError):
        save_weights({"x": torch.ones(3)}, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# ------------------------------------------------------------------------------------------ strictness
def test_missing_key(tmp_path):
    sd = _ref_state()
    del sd["norm.weight"]
    save_weights(sd, tmp_path)
    msg = _err(lambda: load_weights(_meta(), SafetensorsSource(tmp_path), dtype=torch.float32))
    assert "missing weight 'norm.weight'" in msg and "model.safetensors" in msg


def test_unexpected_key(tmp_path):
    sd = _ref_state()
    sd["extra.weight"] = torch.ones(2)
    save_weights(sd, tmp_path, max_shard_size=100)
    src = SafetensorsSource(tmp_path)
    msg = _err(lambda: load_weights(_meta(), src, dtype=torch.float32))
    assert "unexpected weight 'extra.weight'" in msg and src.file_of("extra.weight") in msg


def test_wrong_shape(tmp_path):
    sd = _ref_state()
    sd["layers.2.weight"] = torch.ones(4, 5)
    save_weights(sd, tmp_path)
    msg = _err(lambda: load_weights(_meta(), SafetensorsSource(tmp_path), dtype=torch.float32))
    assert "'layers.2.weight'" in msg and "model.safetensors" in msg and "(4, 5)" in msg and "(4, 4)" in msg


def test_rename_ignore_optional(tmp_path):
    sd = _ref_state()
    ck = {("model." + k if k != "lm_head.weight" else k): v for k, v in sd.items()}
    ck["model.rotary_emb.inv_freq"] = torch.ones(2)
    del ck["lm_head.weight"]
    save_weights(ck, tmp_path)
    src = SafetensorsSource(tmp_path)
    m = _meta()
    with pytest.raises(CheckpointError, match="missing weight"):
        load_weights(m, src, WeightMap(rename=((r"^model\.", ""),), ignore=(r"rotary_emb\.inv_freq$",)),
                     dtype=torch.float32)

    wm = WeightMap(rename=((r"^model\.", ""),), ignore=(r"rotary_emb\.inv_freq$",), optional=(r"^lm_head\.weight$",))
    # optional but never materialised -> left on meta -> error naming it
    msg = _err(lambda: load_weights(_meta(), src, wm, dtype=torch.float32))
    assert "lm_head.weight" in msg and "meta" in msg
    # a model without that parameter (a tied head: the LM head reuses the embedding, as in the decoder) loads

    class TiedHead(Tiny):
        def __init__(self):
            super().__init__()
            self.lm_head = None

    m = _meta(TiedHead)
    load_weights(m, src, wm, dtype=torch.float32)
    assert torch.equal(m.norm.weight, sd["norm.weight"]) and torch.equal(m.embed.weight, sd["embed.weight"])
    # renamed key without the ignore rule -> unexpected, named by its checkpoint name
    wm2 = WeightMap(rename=((r"^model\.", ""),), optional=(r"^lm_head\.weight$",))
    msg = _err(lambda: load_weights(_meta(), src, wm2, dtype=torch.float32))
    assert "'model.rotary_emb.inv_freq'" in msg and "model.safetensors" in msg


def test_two_checkpoint_keys_to_one_module_key():
    src = DictSource({"a.weight": torch.ones(4, 4), "b.weight": torch.ones(4, 4), "bias": torch.ones(4)})
    m = _meta(lambda: nn.Linear(4, 4))
    msg = _err(lambda: load_weights(m, src, WeightMap(rename=((r"^[ab]\.", ""),)), dtype=torch.float32))
    assert "'a.weight'" in msg and "'b.weight'" in msg and "'weight'" in msg


def test_meta_buffer_left_is_error(tmp_path):
    class Scratch(Tiny):
        def __init__(self):
            super().__init__()
            self.register_buffer("scratch", torch.zeros(2), persistent=False)

    save_weights(_ref_state(), tmp_path)
    msg = _err(lambda: load_weights(_meta(Scratch), SafetensorsSource(tmp_path), dtype=torch.float32))
    assert "'scratch'" in msg and "meta" in msg


# ------------------------------------------------------------------------------------------ bad files
def test_corrupt_random_bytes(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(os.urandom(4096))
    msg = _err(lambda: SafetensorsSource(tmp_path))
    assert "model.safetensors" in msg and "corrupt" in msg


def test_corrupt_json_header(tmp_path):
    raw = b'{"a": nope}'
    (tmp_path / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    msg = _err(lambda: SafetensorsSource(tmp_path))
    assert "model.safetensors" in msg and "JSON" in msg


def test_tiny_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    assert "model.safetensors" in _err(lambda: SafetensorsSource(tmp_path))


def test_truncated_file(tmp_path):
    save_weights(_ref_state(), tmp_path)
    p = tmp_path / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    msg = _err(lambda: SafetensorsSource(tmp_path))
    assert "model.safetensors" in msg and "truncated" in msg
    p.write_bytes(data[:20])  # cut inside the header
    assert "model.safetensors" in _err(lambda: SafetensorsSource(tmp_path))


def test_index_naming_missing_shard(tmp_path):
    names = save_weights(_ref_state(), tmp_path, max_shard_size=100)
    (tmp_path / names[1]).unlink()
    msg = _err(lambda: SafetensorsSource(tmp_path))
    assert names[1] in msg and "model.safetensors.index.json" in msg


def test_index_key_absent_from_shard(tmp_path):
    names = save_weights(_ref_state(), tmp_path, max_shard_size=100)
    idx = tmp_path / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["ghost.weight"] = names[0]
    idx.write_text(json.dumps(data))
    msg = _err(lambda: SafetensorsSource(tmp_path))
    assert "'ghost.weight'" in msg and names[0] in msg


def test_bad_index_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    assert "model.safetensors.index.json" in _err(lambda: SafetensorsSource(tmp_path))


def test_only_pickle_present(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    msg = _err(lambda: SafetensorsSource(tmp_path))
    assert "model.safetensors" in msg and "model.safetensors.index.json" in msg
    assert "pytorch_model.bin" in msg and "pickle" in msg


def test_no_weights_at_all(tmp_path):
    msg = _err(lambda: SafetensorsSource(tmp_path))
    assert "model.safetensors" in msg and "pickle" not in msg


def test_single_file_path(tmp_path):
    save_weights({"w": torch.ones(2)}, tmp_path)
    src = SafetensorsSource(tmp_path / "model.safetensors")
    assert src.keys() == ["w"] and src.file_of("w") == "model.safetensors"


# ------------------------------------------------------------------------------------------ memory
_RSS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from torchvlm.loading import SafetensorsSource, load_weights

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    path, n, d, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4])
    with torch.device("meta"):
        m = nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(n)])
    src = SafetensorsSource(path)
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pass
    base = status("VmRSS")
    load_weights(m, src, dtype=dtype)
    peak = status("VmHWM")
    assert m[0].weight.dtype == dtype and not m[-1].weight.is_meta
    print(peak - base)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc/self/status")
def test_peak_rss_while_loading(tmp_path):
    n, d = 48, 1024  # 48 x 4 MiB fp32 = 192 MiB
    sd = {f"{i}.weight": torch.randn(d, d) for i in range(n)}
    save_weights(sd, tmp_path)
    ckpt_bytes = (tmp_path / "model.safetensors").stat().st_size
    del sd
    script = tmp_path / "rss.py"
    script.write_text(_RSS_SCRIPT)
    for dtype, budget in (("float32", 1.3 * ckpt_bytes), ("bfloat16", 0.65 * ckpt_bytes + 8 * 2**20)):
        out = subprocess.run(
            [sys.executable, str(script), str(tmp_path), str(n), str(d), dtype],
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        growth = int(out.stdout.strip().splitlines()[-1])
        assert growth <= budget, f"{dtype}: peak RSS grew {growth / 2**20:.0f} MiB for a {ckpt_bytes / 2**20:.0f} MiB checkpoint"


# ------------------------------------------------------------------------------------------ devices
def test_check_device():
    from torchvlm.errors import ConfigError
    from torchvlm.loading import check_device

    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^device 'foo' is not a valid torch device"):
        check_device("foo")
    with pytest.raises(ConfigError, match="not a valid torch device"):
        check_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^device 'cuda' is not available \((this PyTorch has no CUDA|no GPU visible)\)$"):
            check_device("cuda")
    else:
        n = torch.cuda.device_count()
        assert check_device("cuda") == torch.device("cuda")
        with pytest.raises(ConfigError, match=rf"device 'cuda:{n}' is not available \({n} GPU"):
            check_device(f"cuda:{n}")


def test_load_weights_rejects_bad_device_before_reading(tmp_path):
    from torchvlm.errors import ConfigError

    save_weights(_ref_state(), tmp_path)
    src = SafetensorsSource(tmp_path)
    bad = ["foo", "meta"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        m = _meta()
        with pytest.raises(ConfigError, match=f"device '{device}'") as ei:
            load_weights(m, src, dtype=torch.float32, device=device)
        assert "\n" not in str(ei.value)
        assert m.norm.weight.is_meta  # nothing was loaded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_to_cuda(tmp_path):
    sd = _ref_state()
    save_weights(sd, tmp_path)
    m = _meta()
    load_weights(m, SafetensorsSource(tmp_path), dtype=torch.bfloat16, device="cuda")
    assert m.layers[0].weight.device.type == "cuda" and m.layers[0].weight.dtype == torch.bfloat16
    assert torch.equal(m.layers[0].weight.cpu(), sd["layers.0.weight"].to(torch.bfloat16))
    assert m.step.device.type == "cuda" and int(m.step) == 7


# ------------------------------------------------------------------------------------------ lazy saving
class _CountingSource(DictSource):
    """Hands out fresh tensors and records how many handed-out tensors are still alive at each read."""

    def __init__(self, tensors):
        super().__init__(tensors, name="counting")
        self.gets: list[str] = []
        self.alive_at_get: list[int] = []
        self._refs = []

    def get(self, key, dtype=None, device=None):
        import weakref

        self.alive_at_get.append(sum(r() is not None for r in self._refs))
        self.gets.append(key)
        t = super().get(key, dtype=dtype, device=device).clone()
        self._refs.append(weakref.ref(t))
        return t


def test_save_lazy_mapping_reads_each_tensor_once_and_one_at_a_time(tmp_path):
    from torchvlm.loading import SourceTensors

    sd = _ref_state()
    src = _CountingSource(sd)
    names = save_weights(SourceTensors(src, torch.bfloat16), tmp_path, max_shard_size=100)
    assert len(names) > 2  # sharded: planning must not read tensors either
    assert sorted(src.gets) == sorted(sd)  # each tensor read exactly once
    assert max(src.alive_at_get) == 0  # the previous tensor was released before the next read
    back = SafetensorsSource(tmp_path)
    for k, v in sd.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v  # integer tensors keep their dtype
        assert torch.equal(back.get(k), want) and back.get(k).dtype == want.dtype, k


def test_save_lazy_mapping_wrong_announced_shape(tmp_path):
    from torchvlm.loading import SourceTensors

    class Liar(SourceTensors):
        def spec(self, key):
            return (1, 2), self.dtype

    msg = _err(lambda: save_weights(Liar(DictSource({"w": torch.ones(3)}), torch.float32), tmp_path))
    assert "'w'" in msg and "(1, 2)" in msg and "(3)" in msg
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_bad_index_json_names_file_as_checkpoint_error(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{\n "weight_map": \n}')
    msg = _err(lambda: SafetensorsSource(tmp_path))
    assert "model.safetensors.index.json" in msg and "invalid JSON at line 3" in msg
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    assert "JSON object" in _err(lambda: SafetensorsSource(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert "weight_map" in _err(lambda: SafetensorsSource(tmp_path))


class _QKV(nn.Module):
    def __init__(self, kv: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(4, 4), "k_proj": nn.Linear(4, kv),
                                                   "v_proj": nn.Linear(4, kv)}) for _ in range(2))


_SPLIT = WeightMap(rename=((r"^enc\.", "blocks."),),
                   split=((r"(blocks\.\d+)\.qkv\.(weight|bias)", (r"\1.q_proj.\2", r"\1.k_proj.\2", r"\1.v_proj.\2")),))


def _fused(ref: nn.Module) -> dict:
    return {f"enc.{i}.qkv.{p}": torch.cat([getattr(b[n], p) for n in ("q_proj", "k_proj", "v_proj")]).detach()
            for i, b in enumerate(ref.blocks) for p in ("weight", "bias")}


def test_split_fused_tensor_by_target_shapes(tmp_path):
    torch.manual_seed(0)
    ref = _QKV()
    save_weights(_fused(ref), tmp_path)
    m = _meta(_QKV)
    load_weights(m, SafetensorsSource(tmp_path), _SPLIT, dtype=torch.float32)
    for name, want in ref.state_dict().items():  # unequal parts (4 + 2 + 2 rows), each with its own storage
        got = m.state_dict()[name]
        assert torch.equal(got, want), name
        assert got.untyped_storage().nbytes() == want.numel() * 4, name
    assert _SPLIT.split_keys("blocks.0.qkv.weight") == ("blocks.0.q_proj.weight", "blocks.0.k_proj.weight",
                                                        "blocks.0.v_proj.weight")
    assert _SPLIT.split_keys("blocks.0.q_proj.weight") is None


def test_split_errors_name_key_and_file(tmp_path):
    torch.manual_seed(0)
    fused = _fused(_QKV())
    # parts that do not add up to the stored dim 0 (the model expects 4 + 4 + 4 rows, the checkpoint has 8)
    save_weights(fused, tmp_path / "rows")
    msg = _err(lambda: load_weights(_meta(lambda: _QKV(kv=4)), SafetensorsSource(tmp_path / "rows"), _SPLIT,
                                    dtype=torch.float32))
    assert "cannot split weight 'enc.0.qkv." in msg and "model.safetensors" in msg and "(8, 4)" in msg
    assert "(4, 4) + (4, 4) + (4, 4)" in msg
    # other dims differ
    save_weights({**fused, "enc.1.qkv.weight": torch.ones(8, 5)}, tmp_path / "cols")
    msg = _err(lambda: load_weights(_meta(_QKV), SafetensorsSource(tmp_path / "cols"), _SPLIT, dtype=torch.float32))
    assert "'enc.1.qkv.weight'" in msg and "(8, 5)" in msg
    # missing: a split key absent; unexpected: a split key whose parts the model lacks
    save_weights({k: v for k, v in fused.items() if k != "enc.1.qkv.bias"}, tmp_path / "missing")
    msg = _err(lambda: load_weights(_meta(_QKV), SafetensorsSource(tmp_path / "missing"), _SPLIT,
                                    dtype=torch.float32))
    assert "missing 3 weights" in msg and "'blocks.1.q_proj.bias'" in msg
    save_weights({**fused, "enc.2.qkv.bias": torch.ones(8)}, tmp_path / "extra")
    msg = _err(lambda: load_weights(_meta(_QKV), SafetensorsSource(tmp_path / "extra"), _SPLIT, dtype=torch.float32))
    assert "unexpected weight 'enc.2.qkv.bias'" in msg and "model.safetensors" in msg
    # a split part also given on its own
    src = DictSource({**fused, "blocks.0.k_proj.bias": torch.ones(2)})
    msg = _err(lambda: load_weights(_meta(_QKV), src, _SPLIT, dtype=torch.float32))
    assert "'enc.0.qkv.bias'" in msg and "'blocks.0.k_proj.bias'" in msg and "both map" in msg
