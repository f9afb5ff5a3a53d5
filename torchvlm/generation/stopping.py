"""Stop strings across tokens, and how much of a sequence's text is safe to stream.

The generate loop ends a sequence on an EOS / stop token id itself (on device); this module handles stop
*strings*, which may be spread over several tokens. The output text is cut just before the (earliest) stop
string, which is not part of the output.

While streaming, text that might turn out to be the beginning of a stop string must not be sent yet: after
``"Hello ##"`` with stop string ``"###"``, only ``"Hello "`` is safe. :class:`StopChecker` holds back the
longest suffix of the text that is a proper prefix of some stop string and releases it once it is clearly
not a stop string, or when the sequence ends for another reason (:meth:`StopChecker.flush`).

It is fed text deltas from the tokenizer's stream decoder, which only ever emits whole characters, so no
half-decoded UTF-8 (U+FFFD) hold-back is needed here. One checker tracks one sequence::

    checker = StopChecker(["###"])
    for token in tokens:
        safe, hit = checker.feed(decoder.put(token))   # newly streamable text, did a stop string complete?
        send(safe)
        if hit:
            break
    else:
        send(checker.feed(decoder.flush())[0] + checker.flush())   # EOS / length: release the held text
"""

from __future__ import annotations

from collections.abc import Iterable

from torchvlm.errors import GenerationError

from .sampling import normalize_stop

__all__ = ["StopChecker"]


class StopChecker:
    """Stop-string matching and streaming hold-back for one sequence.

    Args:
        stop_strings: strings that end the sequence when they appear in its text (validated by
            :func:`~torchvlm.generation.sampling.normalize_stop`: one string or a list of non-empty strings).
        stop_token_ids, eos_token_ids: accepted for call compatibility and must be empty: token ids are
            checked by the generate loop, which calls :meth:`flush` when one ends the sequence.

    Attributes:
        stop_strings: the stop strings, as a tuple.
        matched: the stop string that ended the sequence, else ``None``.
        finished: True once a stop string was found or :meth:`flush` was called.
    """

    def __init__(
        self,
        stop_strings: Iterable[str] | str | None = (),
        stop_token_ids: Iterable[int] = (),
        eos_token_ids: Iterable[int] = (),
    ):
        if stop_token_ids or eos_token_ids:
            raise GenerationError(
                "StopChecker matches stop strings only; stop_token_ids / eos_token_ids are checked by the "
                "generate loop"
            )
        self.stop_strings: tuple[str, ...] = normalize_stop(
            list(stop_strings) if isinstance(stop_strings, Iterable) and not isinstance(stop_strings, str)
            else stop_strings
        )
        self.matched: str | None = None
        self.finished = False
        self._emitted = ""  # text returned as safe so far
        self._pending = ""  # text received but held back (a possible stop-string prefix)

    def find_stop_string(self, text: str, start: int = 0) -> tuple[int, str] | None:
        """Earliest stop string occurrence in ``text`` at index ``>= start``: ``(index, stop_string)`` or None.

        When several stop strings begin at the same index, the longest is reported.
        """
        best: tuple[int, str] | None = None
        for s in self.stop_strings:
            i = text.find(s, start)
            if i < 0:
                continue
            if best is None or i < best[0] or (i == best[0] and len(s) > len(best[1])):
                best = (i, s)
        return best

    def holdback(self, text: str) -> int:
        """Number of trailing characters of ``text`` that must not be streamed yet: the longest suffix that is
        a proper prefix of some stop string (it may still grow into one). A complete stop string is not
        "held"; :meth:`find_stop_string` finds it."""
        n = len(text)
        held = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, n), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held

    def feed(self, delta: str) -> tuple[str, bool]:
        """Append the decoded text ``delta`` of the sequence; return ``(safe_text, hit)``.

        ``safe_text`` is the newly streamable text. ``hit`` is True when a stop string completed: the text is
        cut before it, the sequence is finished and later calls return ``("", True)``. After :meth:`flush`,
        later calls return ``("", False)``.
        """
        if not isinstance(delta, str):
            raise GenerationError(f"feed() takes a str text delta, got {type(delta).__name__}")
        if self.finished:
            return "", self.matched is not None
        # Text already returned was checked: no stop string can start in it, only in the held-back part.
        text = self._pending + delta
        found = self.find_stop_string(text)
        if found is not None:
            index, self.matched = found
            self.finished = True
            self._pending = ""
            self._emitted += text[:index]
            return text[:index], True
        keep = self.holdback(text)
        safe = text[: len(text) - keep]
        self._pending = text[len(text) - keep :]
        self._emitted += safe
        return safe, False

    def flush(self) -> str:
        """End the sequence (stop token, EOS or length) and return the held-back text.

        Returns ``""`` if a stop string already ended it or it was flushed before.
        """
        if self.finished:
            return ""
        self.finished = True
        rest, self._pending = self._pending, ""
        self._emitted += rest
        return rest

    @property
    def text(self) -> str:
        """The sequence's output text so far (held-back text included), cut before a stop string."""
        return self._emitted + self._pending
