"""render_chat_template vs HF apply_chat_template."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (tiny.py)

import tiny  # noqa: E402
from torchvlm.errors import ProcessorError  # noqa: E402
from torchvlm.processing.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat_template  # noqa: E402
from torchvlm.processing.tokenizer import Tokenizer  # noqa: E402

CHATS = [
    [{"role": "user", "content": "Hello there"}],
    [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "image", "image": np.zeros(3)}]},
    ],
    [{"role": "user", "content": "  spaced é日😀  "}],
]

EXTRA_TEMPLATES = [
    # tojson without HTML escaping, with options; namespace; loop controls
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{{ m | tojson }}|{{ {'a': '<b>', 'z': 1} | tojson(indent=2, sort_keys=True) }}"
    "{% if loop.index > 5 %}{% break %}{% endif %}{% endfor %}{{ ns.n }}",
    # whitespace control: trim_blocks / lstrip_blocks
    "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.role }}]\n    {% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}GEN{% endif %}",
    "{{ bos_token }}{{ messages | length }}{{ eos_token }}{{ pad_token }}{{ unk_token }}",
]


@pytest.fixture(scope="module", params=["llama", "gemma"])
def toks(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("ct")
    hf = tiny.make_tokenizer(("<image>",), kind=request.param)
    hf.save_pretrained(d)
    return hf, Tokenizer.from_pretrained(d)


def _render(tok: Tokenizer, template, chat, gen):
    return render_chat_template(template, chat, add_generation_prompt=gen, **tok.special_tokens_map)


def test_checkpoint_template_matches_hf(toks):
    hf, ours = toks
    for chat in CHATS:
        if hf.bos_token == "<bos>" and len(chat) == 3:
            pass  # gemma template alternates user/model: this chat is valid (u, a, u)
        for gen in (True, False):
            want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert _render(ours, ours.chat_template, chat, gen) == want


@pytest.mark.parametrize("template", EXTRA_TEMPLATES)
def test_extra_templates_match_hf(toks, template):
    hf, ours = toks
    for chat in CHATS:
        want = hf.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=True)
        assert _render(ours, template, chat, True) == want


def test_errors_become_processor_error(toks):
    hf, ours = toks
    bad_roles = [{"role": "assistant", "content": "hi"}]
    if hf.bos_token == "<bos>":  # gemma template raises on wrong alternation
        with pytest.raises(ProcessorError, match="roles must alternate"):
            _render(ours, ours.chat_template, bad_roles, True)
    with pytest.raises(ProcessorError, match="syntax error"):
        render_chat_template("{% for %}", CHATS[0])
    with pytest.raises(ProcessorError, match="boom"):
        render_chat_template("{{ raise_exception('boom') }}", CHATS[0])
    with pytest.raises(ProcessorError, match="unsafe"):
        render_chat_template("{{ messages.__class__.__mro__ }}", CHATS[0])
    with pytest.raises(ProcessorError, match=r"messages\[0\]"):
        render_chat_template(None, ["not a dict"])


def test_default_template():
    out = render_chat_template(None, CHATS[1], add_generation_prompt=True)
    assert out == "user: <image>\nWhat is this?\nassistant: A cat.\nuser: And <image>\n\nassistant:"
    assert render_chat_template(DEFAULT_CHAT_TEMPLATE, CHATS[0], add_generation_prompt=False) == "user: Hello there\n"
    out = render_chat_template(None, CHATS[1][:1], image_token="<img>")
    assert out.startswith("user: <img>\n")


def test_values_reduced_to_plain_data():
    """Builtin subclasses become exact builtins (no custom __str__), numpy scalars become Python numbers."""
    import enum

    from torchvlm.processing.chat_template import normalize_messages

    class Role(str, enum.Enum):
        USER = "user"

        def __str__(self) -> str:
            return "WRONG"

    class N(enum.IntEnum):
        TWO = 2

    (m,) = normalize_messages([{"role": Role.USER, "content": "x", "n": N.TWO, "f": np.float64(0.5),
                                "b": np.bool_(True), "t": (1, np.int32(3))}])
    assert m == {"role": "user", "content": "x", "n": 2, "f": 0.5, "b": True, "t": (1, 3)}
    assert [type(m[k]) for k in ("role", "n", "f", "b")] == [str, int, float, bool]
    assert render_chat_template("{{ messages[0]['role'] }}", [{"role": Role.USER, "content": "x"}]) == "user"


def test_strftime_now_available():
    out = render_chat_template("{{ strftime_now('%Y') }}", CHATS[0])
    assert out.isdigit() and len(out) == 4


def test_text_only_processor_matches_hf_tokenizer(toks, tmp_path):
    """Processor.from_pretrained on a text LM dir -> plain Processor; messages like HF apply_chat_template."""
    import json

    import torch

    from torchvlm.processing.processor import Processor

    hf, _ = toks
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma" if hf.bos_token == "<bos>" else "llama"}))
    proc = Processor.from_pretrained(tmp_path)
    assert type(proc) is Processor and proc.image_processor is None
    chats = [[{"role": "user", "content": "Hello there"}],
             [{"role": "user", "content": "The capital of France is what city?"}]]
    side, hf.padding_side = hf.padding_side, "left"
    try:
        want = hf.apply_chat_template(chats, tokenize=True, return_dict=True, add_generation_prompt=True,
                                      padding=True, return_tensors="pt")
    finally:
        hf.padding_side = side
    got = proc(messages=chats)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    got = proc(text=["Hello world!", "hi"], padding_side="right")
    want = hf(["Hello world!", "hi"], padding=True, padding_side="right", return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    with pytest.raises(ProcessorError, match="takes no images"):
        proc(text="hi", images=[np.zeros((4, 4, 3), dtype=np.uint8)])
    assert proc.decode(got["input_ids"][1]) == hf.decode(want["input_ids"][1], skip_special_tokens=True)
