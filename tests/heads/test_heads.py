"""Downstream heads (torchvlm.heads): action tokens, the continuous action head, VLA training through
Trainer.for_model, the [SEG] token and the mask decoder. Backbone: the shipped 6M-parameter demo model."""

from __future__ import annotations

import random

import pytest
import torch

from torchvlm.api import load_processor
from torchvlm.demo import default_model_path
from torchvlm.demo.synthetic import random_scene, render
from torchvlm.errors import ProcessorError
from torchvlm.heads import (VLA, ActionTokenizer, ContinuousActionHead, MaskDecoder, SegmentationVLM, TensorData,
                            TokenActionHead, dice_bce_loss, mask_iou)
from torchvlm.models.base import VLM

PATH = default_model_path()


def _model():
    torch.manual_seed(0)
    return VLM.from_pretrained(PATH, dtype=torch.float32), load_processor(PATH)


def _batch(proc, prompts, seed=0):
    rng = random.Random(seed)
    images = [[render(random_scene(rng))] for _ in prompts]
    return proc(text=prompts, images=images, padding_side="right")


# ------------------------------------------------------------------------------------------------ action tokens
def test_action_tokens_round_trip_within_a_bin():
    tok = ActionTokenizer(first_id=1000, bins=256, low=[-1.0, -2.0, 0.0], high=[1.0, 2.0, 0.5])
    a = torch.rand(5000, 3) * (tok.high - tok.low) + tok.low
    ids = tok.encode(a)
    assert ids.min() >= 1000 and ids.max() <= tok.last_id == 1255
    back = tok.decode(ids)
    assert bool(((back - a).abs() <= tok.bin_width / 2 + 1e-6).all())
    assert torch.equal(tok.encode(back), ids)  # bin centres are fixed points: exact round trip of the tokens
    edges = torch.tensor([[-1.0, -2.0, 0.0], [1.0, 2.0, 0.5], [5.0, -9.0, 0.25]])
    assert tok.to_bins(edges).tolist() == [[0, 0, 0], [255, 255, 255], [255, 0, 128]]  # clipped to the range
    with pytest.raises(ProcessorError, match="outside the action range"):
        tok.decode(torch.tensor([999]))


def test_action_tokenizer_for_model_small_vocab_adds_tokens_large_uses_last_ids():
    vlm, proc = _model()
    n = len(proc.tokenizer)
    tok = ActionTokenizer.for_model(vlm, proc.tokenizer, bins=256)  # 320-token vocabulary: new ids
    assert (tok.first_id, tok.last_id) == (n, n + 255)
    assert vlm.language_model.model.embed_tokens.num_embeddings == n + 256
    assert proc.tokenizer.encode("<act_7>", add_special_tokens=False) == [n + 7]
    vlm2, _ = _model()
    last = ActionTokenizer.for_model(vlm2, bins=64, add_tokens=False)
    assert (last.first_id, last.last_id) == (n - 64, n - 1)


# ------------------------------------------------------------------------------------------------ VLA
def test_continuous_head_shapes_and_gradients():
    vlm, proc = _model()
    vla = VLA(vlm, ContinuousActionHead(vlm.text_config.hidden_size, 3, chunk=4, pooling="last"))
    batch = _batch(proc, ["USER: <image>\nreach ASSISTANT:", "USER: <image>\nreach the red one ASSISTANT:"])
    out = vla(**batch, actions=torch.zeros(2, 4, 3))
    assert out.actions.shape == (2, 4, 3) and out.loss.ndim == 0
    out.loss.backward()
    for name in ("head.mlp.1.weight", "vlm.language_model.model.layers.0.self_attn.q_proj.weight",
                 "vlm.vision_tower.encoder.layers.0.mlp.fc1.weight"):
        grad = dict(vla.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert vla.predict(**batch).shape == (2, 4, 3)
    with pytest.raises(ProcessorError, match="actions must be"):
        vla(**batch, actions=torch.zeros(2, 5))


def test_token_head_loss_gradients_and_prediction():
    vlm, proc = _model()
    tok = ActionTokenizer.for_model(vlm, proc.tokenizer, bins=256)
    vla = VLA(vlm, TokenActionHead(tok, 2))
    batch = _batch(proc, ["USER: <image>\nreach ASSISTANT:", "USER: <image>\nreach it now ASSISTANT:"])
    out = vla(**batch, actions=torch.tensor([[0.5, -0.5], [0.1, 0.9]]))
    assert out.loss > 0
    out.loss.backward()
    grad = vlm.language_model.model.embed_tokens.weight.grad  # tied head: the action rows get gradient
    assert grad[tok.first_id:].abs().sum() > 0
    pred = vla.predict(**batch)
    assert pred.shape == (2, 1, 2) and bool((pred.abs() <= 1).all())


def test_vla_trains_with_the_finetune_loop_and_reloads(tmp_path):
    pytest.importorskip("tqdm")
    from torchvlm.train import FinetuneConfig, Trainer

    vlm, proc = _model()
    vla = VLA(vlm, ContinuousActionHead(vlm.text_config.hidden_size, 2))
    batch = _batch(proc, ["USER: <image>\ngo ASSISTANT:"] * 8, seed=3)
    data = TensorData({**batch, "actions": torch.rand(8, 2) * 2 - 1})
    cfg = FinetuneConfig(model="demo", data="synthetic", output=str(tmp_path / "run"), mode="full", lr=1e-3,
                         max_steps=20, batch_size=8, seed=0, extra={"head_lr": 3e-3})
    trainer = Trainer.for_model(cfg, vla, data, collate_fn=TensorData.collate, parts=vla.parameter_parts(),
                                save_fn=lambda d: vla.save_pretrained(d, proc))
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["vision", "connector", "language", "head"]
    assert trainer.optimizer.param_groups[-1]["lr"] == 3e-3
    with torch.no_grad():
        before = vla(**TensorData.collate(data, range(8))).loss.item()
    result = trainer.run()
    assert result["train_loss"] < before * 0.8
    again = VLA.from_pretrained(result["final"], dtype=torch.float32)
    inputs = {k: v for k, v in batch.items()}
    torch.testing.assert_close(again.predict(**inputs), vla.eval().predict(**inputs), atol=1e-5, rtol=1e-5)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def forward(self, x, y):
        from types import SimpleNamespace

        return SimpleNamespace(loss=torch.nn.functional.mse_loss(self.w(x), y))


def test_for_model_without_save_fn_uses_save_pretrained_or_refuses_up_front(tmp_path):
    pytest.importorskip("tqdm")
    from torchvlm.errors import ConfigError
    from torchvlm.train import FinetuneConfig, Trainer

    data = TensorData({"x": torch.rand(4, 2), "y": torch.rand(4, 1)})

    def cfg(name):
        return FinetuneConfig(model="m", data="d", output=str(tmp_path / name), mode="full", max_steps=2,
                              batch_size=2, progress=False)

    with pytest.raises(ConfigError, match="pass save_fn="):
        Trainer.for_model(cfg("a"), _Tiny(), data, collate_fn=TensorData.collate)

    class Savable(_Tiny):
        def save_pretrained(self, folder):
            torch.save(self.state_dict(), f"{folder}/tiny.pt")

    result = Trainer.for_model(cfg("b"), Savable(), data, collate_fn=TensorData.collate).run()
    assert (tmp_path / "b" / "final" / "tiny.pt").is_file() and result["final"].endswith("final")


# ------------------------------------------------------------------------------------------------ segmentation
def test_dice_bce_and_iou():
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    good, bad = (target * 2 - 1) * 20, -(target * 2 - 1) * 20
    assert dice_bce_loss(good, target) < 0.05 < 1.5 < dice_bce_loss(bad, target)
    assert mask_iou(good > 0, target).tolist() == [1.0, 1.0]
    half = target.clone()
    half[:, 2:4] = 0
    assert mask_iou(half, target).tolist() == [0.5, 0.5]


def test_mask_decoder_shapes():
    dec = MaskDecoder(48, 32, dim=32, skip_channels=(8, 16))
    out = dec(torch.randn(2, 3, 3, 48), torch.randn(2, 32), torch.randn(2, 3, 40, 56))
    assert out.shape == (2, 40, 56)
    assert MaskDecoder(48, 32, dim=32, skip_channels=())(torch.randn(2, 3, 5, 48), torch.randn(2, 32)).shape == (2, 12, 20)


def test_segmentation_shapes_gradients_and_few_steps_reduce_loss():
    vlm, proc = _model()
    model = SegmentationVLM.create(vlm, proc.tokenizer, dim=32, skip_channels=(8, 16))
    seg = model.seg_token_id
    assert seg == 320 and vlm.language_model.model.embed_tokens.num_embeddings == 321
    batch = _batch(proc, ["USER: <image>\nSegment the red circle. [SEG] ASSISTANT:",
                          "USER: <image>\nSegment it [SEG]"])
    assert bool((batch["input_ids"] == seg).any(1).all())
    masks = torch.zeros(2, 96, 96)
    masks[:, 30:60, 20:50] = 1
    out = model(**batch, masks=masks)
    assert out.mask_logits.shape == (2, 96, 96)
    out.loss.backward()
    emb_grad = vlm.language_model.model.embed_tokens.weight.grad
    assert emb_grad[seg].abs().sum() > 0  # the [SEG] embedding learns
    assert model.decoder.mask_token.grad.abs().sum() > 0
    assert vlm.vision_tower.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(**batch, masks=masks).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9
    with pytest.raises(ProcessorError, match="segmentation token"):
        model(**_batch(proc, ["USER: <image>\nno token here ASSISTANT:"]))


def test_seg_token_save_and_load(tmp_path):
    vlm, proc = _model()
    model = SegmentationVLM.create(vlm, proc.tokenizer, dim=32, skip_channels=(8,)).eval()
    model.save_pretrained(tmp_path, proc)
    proc2 = load_processor(tmp_path)
    again = SegmentationVLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert proc2.tokenizer.encode("[SEG]", add_special_tokens=False) == [model.seg_token_id] == [again.seg_token_id]
    torch.testing.assert_close(again.vlm.language_model.model.embed_tokens.weight,
                               vlm.language_model.model.embed_tokens.weight)
    batch = _batch(proc2, ["USER: <image>\nSegment the blue square. [SEG] ASSISTANT:"], seed=4)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).mask_logits, model(**batch).mask_logits, atol=1e-5, rtol=1e-5)


def test_segmentation_create_takes_feature_dim_when_the_tower_has_no_width():
    vlm, proc = _model()
    vlm.vision_tower.config = None  # a tower whose width cannot be read: the error says to pass feature_dim=
    model = SegmentationVLM.create(vlm, proc.tokenizer, feature_layer=-1, feature_dim=192, dim=32, skip_channels=())
    assert model.decoder.settings["feature_dim"] == 192
