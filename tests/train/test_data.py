"""Training data: parsing, assistant-only labels, batches, and clear errors on bad data (file:line)."""

from __future__ import annotations

import json
import shutil

import pytest
from train_util import write_jsonl
from PIL import Image

import torchvlm
from torchvlm.train import ConversationDataset, DataError, collate, read_samples

# LLaVA-style template whose generation prompt ends with a newline (the tiny BPE never merges across one), so no merge
# crosses a turn boundary and the label spans can be checked exactly
SPACED_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}:\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% if loop.last and add_generation_prompt %}ASSISTANT:\n{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def processor(llava_dir):
    return torchvlm.load_processor(llava_dir)


@pytest.fixture(scope="module")
def spaced_processor(llava_dir, tmp_path_factory):
    d = shutil.copytree(llava_dir, tmp_path_factory.mktemp("spaced") / "m")
    (d / "chat_template.jinja").write_text(SPACED_TEMPLATE)
    proc = torchvlm.load_processor(d)
    assert proc.chat_template == SPACED_TEMPLATE
    return proc


def _images(d, n):
    for i in range(n):
        Image.new("RGB", (40, 30), (20 * i, 100, 200)).save(d / f"p{i}.png")


def _multi(d):
    """A multi-turn, multi-image sample in each format (conversations with <image>, messages with parts)."""
    _images(d, 3)
    return [
        {"images": ["p0.png", "p1.png", "p2.png"], "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\n<image>\nCompare them."},
            {"from": "gpt", "value": "The first is darker."},
            {"from": "human", "value": "And this one? <image>"},
            {"from": "gpt", "value": "It is the brightest."}]},
        {"messages": [
            {"role": "user", "content": [{"type": "image", "image": "p0.png"}, {"type": "text", "text": "Hi?"}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "text", "text": "Again"}, {"type": "image", "image": "p2.png"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Same."}]}]},
    ]


def test_labels_are_exactly_the_assistant_turns(spaced_processor, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", _multi(tmp_path))
    ds = ConversationDataset(tmp_path / "d.jsonl", spaced_processor)
    tok = spaced_processor.tokenizer
    expected = [["The first is darker.</s>\n", "It is the brightest.</s>\n"], ["Hello.</s>\n", "Same.</s>\n"]]
    for enc, answers in zip(ds.encoded, expected):
        got = [tok.decode(enc.input_ids[a:b], skip_special_tokens=False) for a, b in enc.spans]
        assert got == answers
        labels = enc.labels()
        assert all(label == -100 for j, label in enumerate(labels) if not any(a <= j < b for a, b in enc.spans))
        image_id = spaced_processor.image_token_id
        assert all(label == -100 for t, label in zip(enc.input_ids, labels) if t == image_id)
    # images sit where the placeholders were: 3 images in sample 0, 2 in sample 1
    batch = collate(ds, [0, 1])
    n_image_tokens = (batch["input_ids"] == spaced_processor.image_token_id).sum(1).tolist()
    per_image = spaced_processor.num_image_tokens(32, 32)
    assert n_image_tokens == [3 * per_image, 2 * per_image]
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    # right padding: the shorter row ends with pad / mask 0 / label -100
    short = int(batch["attention_mask"].sum(1).argmin())
    n = int(batch["attention_mask"][short].sum())
    assert batch["attention_mask"][short, n:].eq(0).all() and batch["labels"][short, n:].eq(-100).all()
    assert batch["input_ids"][short, n:].eq(tok.pad_token_id).all()
    for row, enc in enumerate(ds.encoded):
        assert batch["labels"][row, : enc.length].tolist() == enc.labels()


def test_boundary_token_merged_by_bpe_counts_as_the_answer(processor, tmp_path):
    """The default tiny template ends the prompt with 'ASSISTANT:' and the answer starts with ' It': BPE merges
    ':' + ' ' into one token, which then belongs to the answer span (the only difference allowed)."""
    write_jsonl(tmp_path / "d.jsonl", _multi(tmp_path))
    ds = ConversationDataset(tmp_path / "d.jsonl", processor)
    tok = processor.tokenizer
    enc = ds.encoded[0]
    got = [tok.decode(enc.input_ids[a:b], skip_special_tokens=False) for a, b in enc.spans]
    assert [g.lstrip(":").strip() for g in got] == ["The first is darker.</s>", "It is the brightest.</s>"]


def test_json_list_and_jsonl_read_the_same(tmp_path):
    rows = _multi(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows, indent=2))
    a, b = read_samples(tmp_path / "a.jsonl"), read_samples(tmp_path / "b.json")
    assert [s.messages for s in a] == [s.messages for s in b]
    assert [s.where.rsplit(":", 1)[1] for s in a] == ["1", "2"]
    assert b[1].where.endswith(f"b.json:{(tmp_path / 'b.json').read_text().splitlines().index('  {', 2) + 1}")


def _error(processor, tmp_path, rows=None, text=None, name="d.jsonl", **kw):
    p = tmp_path / name
    p.write_text(text) if text is not None else write_jsonl(p, rows)
    with pytest.raises(DataError) as e:
        ConversationDataset(p, processor, **kw)
    return str(e.value)


def _ok(i, **extra):
    return {"image": "p0.png", "conversations": [{"from": "human", "value": f"<image>\nQ{i}"},
                                                 {"from": "gpt", "value": "A."}], **extra}


def test_bad_data_errors_name_the_file_and_line(processor, tmp_path):
    _images(tmp_path, 1)
    f = str(tmp_path / "d.jsonl")
    msg = _error(processor, tmp_path, [_ok(0), {**_ok(1), "image": "nope.png"}])
    assert msg.startswith(f"{f}:2:") and "image file not found" in msg and "nope.png" in msg
    msg = _error(processor, tmp_path, text=json.dumps(_ok(0)) + "\n\n" + '{"image": "p0.png", "conv\n')
    assert msg.startswith(f"{f}:3:") and "broken JSON line" in msg
    msg = _error(processor, tmp_path, text='[\n' + json.dumps(_ok(0)) + ',\n {"image": 1,,}\n]', name="d.json")
    assert msg.startswith(f"{tmp_path / 'd.json'}:3:") and "broken JSON" in msg
    msg = _error(processor, tmp_path, [_ok(0), _ok(1), {"image": "p0.png", "conversations": []}])
    assert msg.startswith(f"{f}:3:") and "empty conversation" in msg
    msg = _error(processor, tmp_path, [{"conversations": [{"from": "human", "value": "hi"}]}])
    assert msg.startswith(f"{f}:1:") and "no assistant" in msg
    msg = _error(processor, tmp_path, [{"conversations": [{"from": "bot", "value": "hi"}]}])
    assert "unknown role 'bot'" in msg
    # placeholders vs images
    msg = _error(processor, tmp_path, [_ok(0), {**_ok(1), "conversations": [
        {"from": "human", "value": "<image> <image> two?"}, {"from": "gpt", "value": "A."}]}])
    assert msg.startswith(f"{f}:2:") and "tokenization mismatch: 2 image placeholder(s)" in msg and "1 image(s)" in msg


def test_too_long_samples(processor, tmp_path):
    _images(tmp_path, 1)
    long_answer = {"image": "p0.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "the quick brown fox " * 10}]}
    f = str(tmp_path / "d.jsonl")
    msg = _error(processor, tmp_path, [_ok(0), long_answer], max_length=60)
    assert msg.startswith(f"{f}:2:") and "more than max_length=60" in msg and "--truncate" in msg
    # truncation keeps the image and cuts the answer
    write_jsonl(tmp_path / "d.jsonl", [_ok(0), long_answer])
    ds = ConversationDataset(tmp_path / "d.jsonl", processor, max_length=60, truncate=True,
                             media_token_ids=(processor.image_token_id,))
    assert ds.encoded[1].length == 60 < ds.encoded[1].full_length and ds.encoded[1].spans[-1][1] == 60
    batch = collate(ds, [0, 1])
    assert batch["input_ids"].shape[1] == 60 and batch["labels"][1, -1] != -100
    # ... but never cuts an image
    msg = _error(processor, tmp_path, [_ok(0), long_answer], max_length=10, truncate=True,
                 media_token_ids=(processor.image_token_id,))
    assert msg.startswith(f"{f}:1:") and "would cut an image" in msg


def test_template_that_rewrites_earlier_turns_is_refused(llava_dir, tmp_path):
    """A template that renders an assistant turn differently once later turns follow (as templates that strip
    earlier reasoning do) cannot give exact labels: a loud tokenization mismatch naming the sample."""
    d = shutil.copytree(llava_dir, tmp_path / "m")
    (d / "chat_template.jinja").write_text(SPACED_TEMPLATE.replace(
        "{{ message['content'] }}", "{{ message['content'] if loop.last or message['role'] != 'assistant' else '...' }}"))
    proc = torchvlm.load_processor(d)
    rows = [{"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "Answer one."},
                               {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "Answer two."}]}]
    msg = _error(proc, tmp_path, rows)
    assert msg.startswith(f"{tmp_path / 'd.jsonl'}:1: tokenization mismatch") and "assistant turn 1" in msg
    assert "does not render turns incrementally" in msg
