"""The embedded demo model: the synthetic generator is deterministic and right by construction, the shipped
weights answer held-out questions (a seed never used in training), and ``torchvlm generate`` uses them when
no ``--model`` is given (docs/demo-model.md)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import torchvlm
from torchvlm.demo import DEMO_MODEL, default_model_path
from torchvlm.demo import synthetic as syn

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "demo.png"
#: held-out questions of the guard test: seed 2000 (training uses 1-3, the script's evaluation 1000)
TEST_SEED, N_QUESTIONS = 2000, 50


def _pixel_answers(scene: syn.Scene, image) -> dict:
    """Re-derive a scene's facts from its spec and check them against the pixels: each shape's colour sits at
    its slot centre, and the word (when any) leaves dark pixels in the top-left corner."""
    px = image.load()
    for s, (jx, jy) in zip(scene.shapes, scene.jitter):
        fx, fy = syn.POSITIONS[s.position]
        k = syn.IMAGE_SIZE / syn.REF_SIZE
        x, y = round(fx * syn.IMAGE_SIZE + jx * k), round(fy * syn.IMAGE_SIZE + jy * k)
        assert px[x, y] == syn.COLOURS[s.colour], (s, px[x, y])
    dark = sum(1 for x in range(32) for y in range(32) if sum(px[x, y]) < 150)
    assert (dark > 20) == (scene.word is not None)
    return {"kinds": Counter(s.kind for s in scene.shapes), "colours": Counter(s.colour for s in scene.shapes)}


def _expected(scene: syn.Scene, question: str) -> str:
    """The answer to one question, derived independently of :func:`syn.questions`."""
    shapes = scene.shapes
    if question == "How many shapes are there?":
        return str(len(shapes))
    if question == "What word is written?":
        return scene.word
    words = question.rstrip("?").split()
    if question.startswith("What colour is the "):
        (match,) = [s for s in shapes if s.kind == words[-1]]
        return match.colour
    if question.startswith("Where is the "):
        (match,) = [s for s in shapes if s.colour == words[-2] and s.kind == words[-1]]
        return match.position
    if question.startswith("What shape is "):
        (match,) = [s for s in shapes if s.colour == words[-1]]
        return match.kind
    if question.startswith("Is there "):
        return "yes" if any(s.colour == words[-2] and s.kind == words[-1] for s in shapes) else "no"
    if question.endswith(" shapes are there?"):
        return str(sum(s.colour == words[2] for s in shapes))
    if question.startswith("How many "):
        return str(sum(s.kind + "s" == words[2] for s in shapes))
    raise AssertionError(question)


def test_generator_is_deterministic(tmp_path):
    a, b = syn.eval_questions(10, 7), syn.eval_questions(10, 7)
    assert [(x["question"], x["answer"]) for x in a] == [(x["question"], x["answer"]) for x in b]
    assert all(x["image"].tobytes() == y["image"].tobytes() for x, y in zip(a, b))
    assert [x["question"] for x in syn.eval_questions(10, 8)] != [x["question"] for x in a]
    p1 = syn.write_split(tmp_path / "1", "train", 12, seed=3)
    p2 = syn.write_split(tmp_path / "2", "train", 12, seed=3)
    assert p1.read_text() == p2.read_text()
    assert all((tmp_path / "1" / "train" / f.name).read_bytes() == f.read_bytes()
               for f in (tmp_path / "2" / "train").iterdir())


def test_type_weights_bias_the_question_types(tmp_path):
    def first_types(path):
        out = Counter()
        for line in path.read_text().splitlines():
            row = json.loads(line)
            q = row["conversations"][0]["value"].removeprefix("<image>\n")
            out[next(t for t, qq, _ in syn.questions(syn.Scene.from_dict(row["scene"])) if qq == q)] += 1
        return out

    plain = first_types(syn.write_split(tmp_path / "a", "t", 300, seed=4, max_turns=1))
    biased = first_types(syn.write_split(tmp_path / "b", "t", 300, seed=4, max_turns=1,
                                         type_weights={"count": 0.1, "word": 0.1}))
    assert biased["count"] < plain["count"] / 3 and biased["word"] < plain["word"] / 3
    assert biased["position"] > plain["position"]


def test_answers_are_right_by_construction(tmp_path):
    items = syn.eval_questions(100, 11)
    assert Counter(x["type"] for x in items) == {t: 20 for t in syn.QUESTION_TYPES}
    extra = Counter()
    for x in items:
        _pixel_answers(x["scene"], x["image"])
        assert x["answer"] == _expected(x["scene"], x["question"]), x["question"]
        for t, q, a in syn.questions(x["scene"], syn.EXTRA_QUESTION_TYPES):
            assert a == _expected(x["scene"], q), q
            extra[t, a if t == "exists" else ""] += 1
    # the training aids: every kind counted, yes and no equally often
    assert extra["count_kind", ""] == 3 * len(items) and extra["exists", "yes"] == extra["exists", "no"] > 0
    # the training files: every answer follows from the stored scene, the image matches the scene
    path = syn.write_split(tmp_path, "train", 30, seed=5)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        scene = syn.Scene.from_dict(row["scene"])
        from PIL import Image

        with Image.open(tmp_path / row["image"]) as im:
            _pixel_answers(scene, im.convert("RGB"))
        conv = row["conversations"]
        assert conv[0]["value"].startswith("<image>\n") and len(conv) % 2 == 0
        for q, a in zip(conv[::2], conv[1::2]):
            assert a["value"] == _expected(scene, q["value"].removeprefix("<image>\n"))


@pytest.fixture(scope="module")
def demo():
    return torchvlm.load(default_model_path())


def _accuracy(demo, n: int, seed: int) -> tuple[float, dict]:
    model, processor = demo
    right, total = Counter(), Counter()
    for x in syn.eval_questions(n, seed):
        got = torchvlm.generate(model, processor, x["question"], images=[x["image"]], max_new_tokens=8)
        total[x["type"]] += 1
        right[x["type"]] += syn.normalize_answer(got) == x["answer"]
    return sum(right.values()) / n, {t: f"{right[t]}/{total[t]}" for t in total}


def test_shipped_model_is_small_and_keeps_its_measured_accuracy(demo):
    """Guards the shipped weights on questions the script never asks: 42/50 (84%) measured when they were
    committed (docs/demo-model.md)."""
    assert sum(f.stat().st_size for f in default_model_path().iterdir()) <= 25 * 2**20
    accuracy, per_type = _accuracy(demo, N_QUESTIONS, TEST_SEED)
    assert accuracy >= 0.78, per_type


def test_shipped_model_accuracy_on_the_scripts_200_questions(demo):
    """The issue's target, >= 90% on the 200 held-out questions that ``scripts/train_demo.py`` evaluates (seed
    1000): 182/200 (91.0%) measured as loaded here, 181/200 in float32. Three questions of slack (177) allow for
    the rounding of other CPUs' bfloat16 kernels; a real regression costs far more."""
    accuracy, per_type = _accuracy(demo, 200, 1000)
    assert accuracy >= 177 / 200, per_type


def test_cli_generate_without_model_uses_the_demo(capsys):
    from torchvlm.cli import build_parser, main

    assert build_parser().parse_args(["generate", "--prompt", "hi"]).model is None
    model, processor = torchvlm.load(default_model_path())
    for question in ("What colour is the circle?", "What word is written?"):
        assert main(["generate", "--image", str(EXAMPLE), "--prompt", question]) == 0
        printed = capsys.readouterr().out.strip()
        assert printed == torchvlm.generate(model, processor, question, images=[str(EXAMPLE)]).strip()
        assert printed in (*syn.COLOURS, *syn.WORDS)  # one word of the demo's world


def test_serve_defaults_to_the_demo_name():
    from torchvlm.cli import build_parser
    from torchvlm.serve.cli import config_from_args

    ns = build_parser().parse_args(["serve"])
    assert ns.model is None and config_from_args(ns).served_model_name == DEMO_MODEL
