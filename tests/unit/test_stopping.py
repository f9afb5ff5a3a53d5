"""torchvlm.generation.stopping: stop ids, EOS, stop strings across tokens and streaming hold-back."""

from __future__ import annotations

import pytest

from torchvlm.errors import GenerationError
from torchvlm.generation.stopping import StopChecker, StopUpdate


def run(checker: StopChecker, pieces, tokens=None):
    """Feed text pieces (one per token) as a loop would; return (deltas, seq)."""
    seq = checker.sequence()
    text = ""
    deltas = []
    tokens = tokens or [100 + i for i in range(len(pieces))]
    for tok, piece in zip(tokens, pieces):
        if checker.is_stop_token(tok):
            upd = seq.update(tok)
        else:
            text += piece
            upd = seq.update(tok, text)
        assert isinstance(upd, StopUpdate)
        deltas.append(upd.text)
        if upd.finished:
            break
    else:
        deltas.append(seq.finish().text)
    assert "".join(deltas) == seq.text, "stream and final text disagree"
    return deltas, seq


def test_no_rules_streams_everything():
    deltas, seq = run(StopChecker(), ["Hel", "lo", " world"])
    assert deltas == ["Hel", "lo", " world", ""]
    assert seq.text == "Hello world" and seq.reason == "length" and seq.finished


def test_stop_string_across_token_boundaries_and_holdback():
    checker = StopChecker(stop_strings=["###"])
    deltas, seq = run(checker, ["Hello ", "#", "#", "# tail"])
    # "#" and "##" are held back (could become "###"), nothing of the stop string leaks
    assert deltas == ["Hello ", "", "", ""]
    assert seq.text == "Hello " and seq.reason == "stop_string" and seq.matched == "###"


def test_held_prefix_released_when_it_does_not_complete():
    checker = StopChecker(stop_strings=["###"])
    deltas, seq = run(checker, ["a#", "#", "b", "c"])
    assert deltas == ["a", "", "##b", "c", ""]
    assert seq.text == "a##bc" and seq.reason == "length"


def test_stop_string_inside_one_token_cuts_text():
    deltas, seq = run(StopChecker(stop_strings=["</s>", "STOP"]), ["ab", "cSTOPde", "x"])
    assert seq.text == "abc" and seq.matched == "STOP"
    assert deltas == ["ab", "c"]


def test_earliest_stop_string_wins():
    checker = StopChecker(stop_strings=["world", "lo w"])
    _, seq = run(checker, ["Hello world"])
    assert seq.text == "Hel" and seq.matched == "lo w"
    assert checker.find_stop_string("xxabab", 0) is None
    assert StopChecker(stop_strings=["ab", "abc"]).find_stop_string("xabc") == (1, "abc")


def test_overlapping_prefixes_hold_longest_suffix():
    checker = StopChecker(stop_strings=["abcd", "bcx", "<|end|>"])
    assert checker.holdback("zzabc") == 3  # "abc" prefix of "abcd"
    assert checker.holdback("zzab") == 2
    assert checker.holdback("zzb") == 1
    assert checker.holdback("zz<|en") == 4
    assert checker.holdback("zzz") == 0
    assert checker.holdback("xab", start=2) == 1  # only text after start may be held ("b", not "ab")
    assert checker.holdback("") == 0
    # a full stop string is not "held" (it is found by find_stop_string instead)
    assert StopChecker(stop_strings=["ab"]).holdback("xab") == 0


def test_stop_string_partially_repeated():
    # "aab" with stop "ab": the second "a" starts the match
    deltas, seq = run(StopChecker(stop_strings=["ab"]), ["a", "a", "b"])
    assert seq.text == "a" and deltas == ["", "a", ""]


def test_stop_token_id_not_in_output_and_releases_holdback():
    checker = StopChecker(stop_strings=["###"], stop_token_ids=[7], eos_token_ids=[2])
    deltas, seq = run(checker, ["Hi ", "#", "<stop>"], tokens=[10, 11, 7])
    assert seq.text == "Hi #" and seq.reason == "stop_token" and seq.matched == 7
    assert deltas == ["Hi ", "", "#"]


def test_eos():
    checker = StopChecker(eos_token_ids=[2, 3])
    deltas, seq = run(checker, ["a", "b", "</s>", "c"], tokens=[10, 11, 3, 12])
    assert seq.text == "ab" and seq.reason == "eos" and seq.matched == 3
    assert checker.all_token_ids == (2, 3)
    both = StopChecker(stop_token_ids=[2, 5], eos_token_ids=2)
    assert both.token_reason(2) == "eos" and both.token_reason(5) == "stop_token" and both.token_reason(1) is None
    assert both.all_token_ids == (2, 5)


def test_finished_sequence_is_inert():
    checker = StopChecker(eos_token_ids=[2])
    seq = checker.sequence()
    assert seq.update(5, "x").text == "x"
    assert seq.update(2).finished
    upd = seq.update(6, "xy")
    assert upd == StopUpdate("", True, "eos") and seq.text == "x"
    assert seq.finish() == StopUpdate("", True, "eos")


def test_text_required_for_normal_tokens():
    seq = StopChecker().sequence()
    with pytest.raises(GenerationError, match="decoded text"):
        seq.update(5)


def test_bad_rules():
    with pytest.raises(GenerationError, match="empty"):
        StopChecker(stop_strings=[""])
    with pytest.raises(GenerationError, match="strings"):
        StopChecker(stop_strings=[3])
    with pytest.raises(GenerationError, match="stop_token_ids"):
        StopChecker(stop_token_ids=["a"])
    with pytest.raises(GenerationError, match="eos_token_ids"):
        StopChecker(eos_token_ids="2")
    assert StopChecker(stop_strings="END").stop_strings == ("END",)
    assert StopChecker(stop_strings=["a", "a"]).stop_strings == ("a",)


def test_incomplete_utf8_held_back():
    checker = StopChecker()
    seq = checker.sequence()
    assert seq.update(1, "caf").text == "caf"
    assert seq.update(2, "caf\ufffd").text == ""
    assert seq.update(3, "café").text == "é"
    # byte fallback re-decodes a run of bytes: the streamed "日" turns into U+FFFDs, then comes back
    assert seq.update(4, "café 日").text == " 日"
    assert seq.update(5, "café \ufffd\ufffd\ufffd\ufffd").text == ""
    assert seq.update(6, "café 日😀").text == "😀"
    assert seq.finish().text == "" and seq.text == "café 日😀"
    # a stop-string prefix just before an unfinished character is held too
    seq = StopChecker(stop_strings=["#é"]).sequence()
    assert seq.update(1, "a#\ufffd").text == "a"
    upd = seq.update(2, "a#é!")
    assert upd.finished and seq.text == "a" and upd.text == ""
    # without the option, U+FFFD streams like any other character
    seq = StopChecker(hold_incomplete_utf8=False).sequence()
    assert seq.update(1, "x\ufffd").text == "x\ufffd"


def test_rewritten_streamed_text_does_not_block():
    # a decoder that rewrites earlier text (no U+FFFD): stream continues, stop strings still found
    seq = StopChecker(stop_strings=["END"]).sequence()
    assert seq.update(1, "a ,").text == "a ,"
    assert seq.update(2, "a, b").text == "b"
    upd = seq.update(3, "a, bEND")
    assert upd.finished and seq.text == "a, b"


def test_with_real_tokenizer_byte_fallback_and_stop_string():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    pytest.importorskip("transformers")
    from tiny import make_tokenizer

    tok = make_tokenizer()
    ids = tok.encode("The cat 日😀 is é here. The dog", add_special_tokens=False)
    for stops, expected in [((), "The cat 日😀 is é here. The dog"), (("here.",), "The cat 日😀 is é "),
                            (("😀",), "The cat 日"), (("at 日",), "The c")]:
        checker = StopChecker(stop_strings=stops, eos_token_ids=[tok.eos_token_id])
        seq = checker.sequence()
        out = []
        for i in range(1, len(ids) + 1):
            upd = seq.update(ids[i - 1], tok.decode(ids[:i], skip_special_tokens=True))
            assert "\ufffd" not in upd.text
            for s in stops:
                assert s not in "".join(out) + upd.text
            out.append(upd.text)
            if upd.finished:
                break
        else:
            out.append(seq.update(tok.eos_token_id).text)
        assert "".join(out) == seq.text == expected


def test_delta_feed_api_as_used_by_the_loop():
    # one checker per row, text deltas in, (safe, hit) out; flush on EOS / length
    c = StopChecker(["###"])
    out = []
    for d in ["Hello ", "#", "#", "# more"]:
        safe, hit = c.feed(d)
        out.append(safe)
        if hit:
            break
    assert hit and "".join(out) == "Hello " and c.text == "Hello "
    assert c.feed("x") == ("", True) and c.flush() == ""

    c = StopChecker(["###"])
    assert c.feed("ab#") == ("ab", False)
    assert c.flush() == "#"  # EOS: held-back text released
    assert c.flush() == "" and c.text == "ab#"

    c = StopChecker(["</s>"])
    assert c.feed("x</") == ("x", False)
    safe, hit = c.feed("s")  # last decoder delta at max_new_tokens
    assert (safe, hit) == ("", False)
    assert c.flush() == "</s"
    c = StopChecker()
    assert c.feed("") == ("", False) and c.flush() == "" and c.text == ""
