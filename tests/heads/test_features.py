"""Feature extraction: encode_image(layer=...) and encode_text(pooling=..., layer=...) against HF
transformers' hidden states (tiny random LLaVA), and the ``torchvlm embed`` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from torchvlm.models.base import VLM, pool_hidden

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(llava_dir):
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    return hf, VLM.from_pretrained(llava_dir, dtype=torch.float32)


def test_encode_image_layers_match_hf_vision_hidden_states(pair):
    hf, ours = pair
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf.model.vision_tower(px, output_hidden_states=True).hidden_states  # embeddings + 2 layers
        for layer in (0, 1, 2, -1, -3):
            feats = ours.encode_image(px, layer=layer)
            assert feats.grid == (4, 4)
            torch.testing.assert_close(feats.tokens, ref[layer][:, 1:], atol=1e-5, rtol=1e-5)  # CLS dropped
            assert feats.spatial().shape == (2, 4, 4, 32)
        lm_space = ours.encode_image(px)  # default: after the connector
        expected = hf.model.multi_modal_projector(ref[hf.config.vision_feature_layer][:, 1:])
        torch.testing.assert_close(lm_space.tokens, expected, atol=1e-5, rtol=1e-5)
    assert lm_space.spatial().shape == (2, 4, 4, 64)
    with pytest.raises(ValueError, match="layer must be an int in \\[-3, 2\\]"):
        ours.encode_image(px, layer=3)


def test_encode_text_pooling_matches_hf_with_left_padding(pair):
    hf, ours = pair
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = hf.model.language_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        full = ours.encode_text(ids, mask)
        torch.testing.assert_close(full[mask.bool()], ref[-1][mask.bool()], atol=1e-4, rtol=1e-4)
        layer1 = ours.encode_text(ids, mask, layer=1)
        torch.testing.assert_close(layer1[mask.bool()], ref[1][mask.bool()], atol=1e-4, rtol=1e-4)
        last = ours.encode_text(ids, mask, pooling="last")
        first = ours.encode_text(ids, mask, pooling="first")
        mean = ours.encode_text(ids, mask, pooling="mean")
    torch.testing.assert_close(last, ref[-1][:, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first, torch.stack([ref[-1][0, 2], ref[-1][1, 0]]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mean, torch.stack([ref[-1][0, 2:].mean(0), ref[-1][1].mean(0)]), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pooling must be one of"):
        ours.encode_text(ids, mask, pooling="max")


def test_pool_hidden_right_padding():
    h = torch.arange(24, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool_hidden(h, mask, "last").tolist() == [h[0, 1].tolist(), h[1, 3].tolist()]
    assert pool_hidden(h, mask, "first").tolist() == [h[0, 0].tolist(), h[1, 0].tolist()]
    torch.testing.assert_close(pool_hidden(h, mask, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))
    assert pool_hidden(h, mask, "none") is h


# ------------------------------------------------------------------------------------------------ CLI
def _png(tmp_path):
    from torchvlm.demo.synthetic import example_scene, render

    p = tmp_path / "scene.png"
    render(example_scene()).save(p)
    return str(p)


def test_embed_cli_safetensors_and_npy(tmp_path, capsys):
    from safetensors.numpy import load_file

    from torchvlm.cli import main

    img = _png(tmp_path)
    out = tmp_path / "e.safetensors"
    assert main(["embed", "--image", img, "--image", img, "--text", "a red circle", "--text", "blue",
                 "-o", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    arrays = load_file(str(out))
    from torchvlm.demo import default_model_path

    width = json.loads((default_model_path() / "config.json").read_text())["text_config"]["hidden_size"]
    assert arrays["image_tokens"].shape == (2, 9, width) and arrays["text_embeds"].shape == (2, width)
    assert info["image_grid"] == "3x3"
    np.testing.assert_allclose(arrays["image_tokens"][0], arrays["image_tokens"][1])
    npy = tmp_path / "t.npy"
    assert main(["embed", "--image", img, "--image-layer", "-2", "--image-pooling", "mean", "-o", str(npy)]) == 0
    assert np.load(npy).shape == (1, 192)  # the vision tower's width, before the connector


def test_embed_cli_errors(tmp_path, capsys):
    from torchvlm.cli import main

    img = _png(tmp_path)
    assert main(["embed", "--image", img, "--text", "x", "-o", str(tmp_path / "both.npy")]) == 2
    assert "a .npy file holds one array" in capsys.readouterr().err
    assert main(["embed", "--text", "x", "-o", str(tmp_path / "x.pt")]) == 2
    assert "must end in .npy or .safetensors" in capsys.readouterr().err
    assert main(["embed", "--image", str(tmp_path / "missing.png"), "-o", str(tmp_path / "m.npy")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["embed", "-o", str(tmp_path / "n.npy")]) == 2
    assert "pass --image and/or --text" in capsys.readouterr().err


def test_embed_cli_layer_out_of_range_is_a_clear_error(tmp_path, capsys):
    from torchvlm.cli import main

    img = _png(tmp_path)
    assert main(["embed", "--image", img, "--image-layer", "99", "-o", str(tmp_path / "i.npy")]) == 2
    assert "layer must be an int in" in capsys.readouterr().err
    assert main(["embed", "--text", "x", "--text-layer", "99", "-o", str(tmp_path / "t.npy")]) == 2
    assert "layer must be in" in capsys.readouterr().err


def test_florence2_text_layer_is_a_torchvlm_error():
    from torchvlm.errors import TorchVLMError
    from torchvlm.models.florence2.model import Florence2Model

    # the check comes before the model is used: the CLI (torchvlm embed --text-layer 2) prints one error line
    with pytest.raises(TorchVLMError, match="encoder output only"):
        Florence2Model.hidden_states(None, torch.ones(1, 2, dtype=torch.long), layer=2)


def test_embed_gives_one_row_per_image_for_tiled_images():
    from torchvlm.features import embed
    from torchvlm.models.base import ImageFeatures

    class Proc:
        image_token = "<image>"

        def __call__(self, text, images):
            return {"pixel_values": torch.zeros(3, 3, 4, 4)}  # one image -> 3 tiles

    class Model:
        def encode_image(self, batch, layer=None):
            n = batch["pixel_values"].shape[0]
            return ImageFeatures(tokens=torch.arange(n * 4 * 2, dtype=torch.float32).reshape(n, 4, 2), grid=(2, 2))

    arrays, meta = embed(Model(), Proc(), images=["a", "b"])
    assert arrays["image_tokens"].shape == (2, 12, 2)  # 2 images x (3 tiles x 4 tokens), not 6 tile rows
    assert "image_grid" not in meta  # several tiles: no single grid
    arrays, _ = embed(Model(), Proc(), images=["a", "b"], image_pooling="mean")
    assert arrays["image_embeds"].shape == (2, 2)


def test_embed_cli_npy_with_several_arrays_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import torchvlm.api
    from torchvlm.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before a predictable error")

    monkeypatch.setattr(torchvlm.api, "load", no_load)
    img = _png(tmp_path)
    assert main(["embed", "--image", img, "--text", "x", "-o", str(tmp_path / "both.npy")]) == 2
    assert "write .safetensors" in capsys.readouterr().err
    assert main(["embed", "--text", "x", "--text", "y", "--text-pooling", "none", "-o", str(tmp_path / "t.npy")]) == 2
    assert "write .safetensors" in capsys.readouterr().err
