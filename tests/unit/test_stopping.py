"""torchvlm.generation.stopping: stop strings across tokens and streaming hold-back (the loop's feed/flush API)."""

from __future__ import annotations

import pytest

from torchvlm.errors import GenerationError
from torchvlm.generation.stopping import StopChecker


def run(checker: StopChecker, pieces):
    """Feed text deltas (one per token) as the loop does; flush at the end unless a stop string hit.

    Returns the list of safe deltas (the last one from flush when no stop string hit)."""
    deltas = []
    for piece in pieces:
        safe, hit = checker.feed(piece)
        deltas.append(safe)
        if hit:
            assert checker.finished and checker.matched is not None
            break
    else:
        deltas.append(checker.flush())
        assert checker.matched is None
    assert "".join(deltas) == checker.text, "stream and final text disagree"
    return deltas


def test_no_rules_streams_everything():
    c = StopChecker()
    assert run(c, ["Hel", "lo", " world"]) == ["Hel", "lo", " world", ""]
    assert c.text == "Hello world" and c.finished


def test_stop_string_across_token_boundaries_and_holdback():
    c = StopChecker(["###"])
    # "#" and "##" are held back (could become "###"), nothing of the stop string leaks
    assert run(c, ["Hello ", "#", "#", "# tail"]) == ["Hello ", "", "", ""]
    assert c.text == "Hello " and c.matched == "###"


def test_held_prefix_released_when_it_does_not_complete():
    c = StopChecker(["###"])
    assert run(c, ["a#", "#", "b", "c"]) == ["a", "", "##b", "c", ""]
    assert c.text == "a##bc"


def test_stop_string_inside_one_token_cuts_text():
    c = StopChecker(["</s>", "STOP"])
    assert run(c, ["ab", "cSTOPde", "x"]) == ["ab", "c"]
    assert c.text == "abc" and c.matched == "STOP"


def test_earliest_stop_string_wins():
    c = StopChecker(["world", "lo w"])
    run(c, ["Hello world"])
    assert c.text == "Hel" and c.matched == "lo w"
    assert c.find_stop_string("xxabab", 0) is None
    assert StopChecker(["ab", "abc"]).find_stop_string("xabc") == (1, "abc")


def test_overlapping_prefixes_hold_longest_suffix():
    c = StopChecker(["abcd", "bcx", "<|end|>"])
    assert c.holdback("zzabc") == 3  # "abc" prefix of "abcd"
    assert c.holdback("zzab") == 2
    assert c.holdback("zzb") == 1
    assert c.holdback("zz<|en") == 4
    assert c.holdback("zzz") == 0
    assert c.holdback("") == 0
    # a full stop string is not "held" (it is found by find_stop_string instead)
    assert StopChecker(["ab"]).holdback("xab") == 0


def test_stop_string_partially_repeated():
    # "aab" with stop "ab": the second "a" starts the match
    c = StopChecker(["ab"])
    assert run(c, ["a", "a", "b"]) == ["", "a", ""]
    assert c.text == "a"


def test_stop_string_spanning_held_text_and_new_delta():
    c = StopChecker(["<|im_end|>"])
    assert run(c, ["Paris", ".<|im", "_e", "nd|>junk"]) == ["Paris", ".", "", ""]
    assert c.text == "Paris."


def test_flush_releases_holdback_and_is_final():
    c = StopChecker(["###"])
    assert c.feed("ab#") == ("ab", False)
    assert c.flush() == "#"  # EOS / stop id: held-back text released
    assert c.flush() == "" and c.text == "ab#"
    assert c.feed("###") == ("", False)  # nothing after the end

    c = StopChecker(["###"])
    for d in ["Hello ", "#", "#"]:
        assert not c.feed(d)[1]
    assert c.feed("# more") == ("", True)
    assert c.feed("x") == ("", True) and c.flush() == "" and c.text == "Hello "

    c = StopChecker(["</s>"])
    assert c.feed("x</") == ("x", False)
    assert c.feed("s") == ("", False)  # last decoder delta at max_new_tokens
    assert c.flush() == "</s"
    c = StopChecker()
    assert c.feed("") == ("", False) and c.flush() == "" and c.text == ""


def test_constructor_as_the_loop_calls_it_and_validation():
    assert StopChecker(("END",), (), ()).stop_strings == ("END",)
    assert StopChecker("END").stop_strings == ("END",)
    assert StopChecker(None).stop_strings == ()
    # the one stop-string validator (shared with SamplingParams.validate)
    with pytest.raises(GenerationError, match="empty"):
        StopChecker([""])
    with pytest.raises(GenerationError, match="strings"):
        StopChecker([3])
    # token ids are the loop's job, not silently ignored
    with pytest.raises(GenerationError, match="stop_token_ids"):
        StopChecker(["x"], [7])
    with pytest.raises(GenerationError, match="feed"):
        StopChecker().feed(5)


def test_with_stream_decoder_whole_characters_and_stop_strings():
    """The loop's pipeline: tokenizer stream decoder -> StopChecker. The decoder emits whole characters only,
    so no U+FFFD reaches the stream without any hold-back in StopChecker, and stop strings never leak."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    pytest.importorskip("transformers")
    from tiny import make_tokenizer

    from torchvlm.processing.tokenizer import Tokenizer

    hf = make_tokenizer()
    tok = Tokenizer(hf.backend_tokenizer, {"eos_token": hf.eos_token, "bos_token": hf.bos_token})
    text = "The cat 日😀 is é here. The dog"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    for stops, expected in [((), text), (("here.",), "The cat 日😀 is é "),
                            (("😀",), "The cat 日"), (("at 日",), "The c")]:
        decoder = tok.stream_decoder()
        checker = StopChecker(stops)
        out = []
        for i in ids:
            safe, hit = checker.feed(decoder.put(i))
            assert "\ufffd" not in safe
            out.append(safe)
            for s in stops:
                assert s not in "".join(out)
            if hit:
                break
        else:
            safe, _ = checker.feed(decoder.flush())
            out.append(safe + checker.flush())
        assert "".join(out) == checker.text == expected
