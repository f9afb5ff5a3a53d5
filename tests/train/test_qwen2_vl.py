"""Fine-tuning a second family: a tiny random Qwen2-VL (dynamic resolution, multimodal rope, the connector is the
vision tower's patch merger) with its own chat template and processor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "parity"))

import torchvlm  # noqa: E402
from torchvlm.train import ConversationDataset, FinetuneConfig, Trainer  # noqa: E402


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from test_qwen_vl import _config
    from test_qwen_vl_processor import SPECIALS, save_qwen_processor

    path = tmp_path_factory.mktemp("qwen2_vl")
    tok = save_qwen_processor(path, "qwen2_vl").tokenizer
    cfg = _config("qwen2_vl")
    cfg.text_config.vocab_size = len(tok)
    cfg.text_config.pad_token_id, cfg.text_config.bos_token_id, cfg.text_config.eos_token_id = 0, None, None
    cfg.vision_config.patch_size = 14
    cfg.image_token_id, cfg.video_token_id = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    cfg.vision_start_token_id, cfg.vision_end_token_id = tok.convert_tokens_to_ids(list(SPECIALS[:2]))
    torch.manual_seed(0)
    transformers.Qwen2VLForConditionalGeneration(cfg).save_pretrained(path)
    return path


def test_qwen2_vl_labels_and_training(qwen_dir, colour_data, tmp_path):
    _, train, _ = colour_data
    proc = torchvlm.load_processor(qwen_dir)
    ds = ConversationDataset(train, proc)
    enc = ds.encoded[0]
    (a, b), = enc.spans
    assert proc.tokenizer.decode(enc.input_ids[a:b], skip_special_tokens=False).startswith("It is red.<|im_end|>")
    cfg = dict(model=str(qwen_dir), data=str(train), max_steps=5, batch_size=4, progress=False)
    lora = Trainer(FinetuneConfig(output=str(tmp_path / "lora"), mode="lora", lr=1e-2, **cfg))
    lora.run()
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "lora" / "train_log.jsonl").read_text().splitlines())
              if r["type"] == "train"]
    assert losses[-1] < losses[0] - 0.1, losses
    projector = Trainer(FinetuneConfig(output=str(tmp_path / "proj"), mode="projector", lr=1e-2, **cfg))
    names = {n for n, p in projector.model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("vision_tower.merger.") for n in names)
    assert [g["name"] for g in projector.optimizer.param_groups] == ["connector"]
    projector.run()
