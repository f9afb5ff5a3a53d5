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


class WithRope(nn.Module):
    """Has a non-persistent buffer that only exists after _init_buffers."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("inv_freq", torch.empty(2), persistent=False)
        self.calls = []

    def _init_buffers(self, device):
        self.calls.append(torch.device(device))
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, 4, 2, dtype=torch.float32, device=device) / 4))


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


def test_dtype_conversion_and_keep_dtype(tmp_path):
    sd = _ref_state()
    save_weights(sd, tmp_path)
    m = _meta()
    load_weights(m, SafetensorsSource(tmp_path), dtype=torch.bfloat16, keep_dtype=lambda k: k.startswith("norm."))
    assert m.layers[0].weight.dtype == torch.bfloat16
    assert torch.equal(m.layers[0].weight, sd["layers.0.weight"].to(torch.bfloat16))
    assert m.norm.weight.dtype == torch.float32 and torch.equal(m.norm.weight, sd["norm.weight"])
    assert m.step.dtype == torch.int64


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

    def boom(path, tensors, metadata):
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

    class Tied(Tiny):
        def tie_weights(self):
            self.lm_head.weight = nn.Parameter(torch.empty(10, 4)) if self.embed.weight.is_meta else self.embed.weight

    m = _meta(Tied)
    wm = WeightMap(rename=((r"^model\.", ""),), ignore=(r"rotary_emb\.inv_freq$",), optional=(r"^lm_head\.weight$",))
    load_weights(m, src, wm, dtype=torch.float32)
    assert m.lm_head.weight is m.embed.weight
    assert torch.equal(m.norm.weight, sd["norm.weight"])
    # optional but never materialised -> left on meta -> error naming it
    msg = _err(lambda: load_weights(_meta(), src, wm, dtype=torch.float32))
    assert "lm_head.weight" in msg and "meta" in msg
    # renamed key without the ignore rule -> unexpected, named by its checkpoint name
    wm2 = WeightMap(rename=((r"^model\.", ""),), optional=(r"^lm_head\.weight$",))
    msg = _err(lambda: load_weights(_meta(Tied), src, wm2, dtype=torch.float32))
    assert "'model.rotary_emb.inv_freq'" in msg and "model.safetensors" in msg


def test_two_checkpoint_keys_to_one_module_key():
    src = DictSource({"a.weight": torch.ones(4, 4), "b.weight": torch.ones(4, 4), "bias": torch.ones(4)})
    m = _meta(lambda: nn.Linear(4, 4))
    msg = _err(lambda: load_weights(m, src, WeightMap(rename=((r"^[ab]\.", ""),)), dtype=torch.float32))
    assert "'a.weight'" in msg and "'b.weight'" in msg and "'weight'" in msg


def test_init_buffers_hook_called(tmp_path):
    save_weights({"proj.weight": torch.ones(4, 4), "proj.bias": torch.zeros(4)}, tmp_path)
    m = _meta(WithRope)
    assert m.inv_freq.is_meta
    load_weights(m, SafetensorsSource(tmp_path), dtype=torch.float32, device="cpu")
    assert m.calls == [torch.device("cpu")]
    assert not m.inv_freq.is_meta and torch.allclose(m.inv_freq, torch.tensor([1.0, 0.01]))


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
