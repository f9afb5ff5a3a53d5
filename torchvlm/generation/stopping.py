"""When does a sequence stop, and how much of its text is safe to stream?

A sequence ends when

* it produces a stop token: one of the model's EOS ids or a user ``stop_token_ids`` entry. The token itself
  is not part of the output text; or
* its decoded text contains a stop string, possibly spread over several tokens. The output text is cut just
  before the (earliest) stop string, which is not part of the output either.

While streaming, text that might turn out to be the beginning of a stop string must not be sent yet: after
``"Hello ##"`` with stop string ``"###"``, only ``"Hello "`` is safe. :class:`SequenceStop` holds back the
longest suffix of the text that is a prefix of some stop string (and, by default, a trailing U+FFFD that a
byte-level tokenizer produces for an incomplete UTF-8 character) and releases it once it is clearly not a stop
string or generation ends for another reason.

Everything here is pure Python over decoded text; the generate loop decodes and calls it per sequence.

Example::

    checker = StopChecker(stop_strings=["###"], stop_token_ids=[7], eos_token_ids=[2])
    seq = checker.sequence()                     # one per batch row
    generated = []
    for tok in tokens:                           # token ids as the loop samples them
        if checker.is_stop_token(tok):
            upd = seq.update(tok)                # no text needed: the stop token is not output
        else:
            generated.append(tok)
            upd = seq.update(tok, tokenizer.decode(generated))   # full text of the generated tokens
        send(upd.text)                           # newly safe text (may be "")
        if upd.finished:
            break
    else:
        send(seq.finish().text)                  # max_new_tokens reached: flush what was held back
    seq.text, seq.reason                         # final output text and why it ended

Loops that decode incrementally can instead keep one checker per row and feed text deltas::

    checker = StopChecker(stop_strings=["###"])          # stop ids checked by the loop on device
    safe, hit = checker.feed(delta)                       # newly streamable text, stop string completed?
    rest = checker.flush()                                # on EOS / stop id / max_new_tokens: held-back text

``seq.text`` is the final text; ``seq.reason`` is ``"eos"``, ``"stop_token"``, ``"stop_string"`` or
``"length"`` (from :meth:`SequenceStop.finish`). ``seq.matched`` is the token id or stop string that ended it.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable
from dataclasses import dataclass

from torchvlm.errors import GenerationError

__all__ = ["StopChecker", "SequenceStop", "StopUpdate"]

_REPLACEMENT_CHAR = "\ufffd"


def _as_int_tuple(values: Iterable[int] | int | None, name: str) -> tuple[int, ...]:
    """Normalise None / one int / an iterable of ints to a tuple of ints (GenerationError naming ``name``)."""
    if values is None:
        return ()
    if isinstance(values, numbers.Integral) and not isinstance(values, bool):
        return (int(values),)
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise GenerationError(f"{name} must be an int or a list of ints, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise GenerationError(f"{name} must contain only ints, got {type(v).__name__}")
        out.append(int(v))
    return tuple(out)


@dataclass(frozen=True)
class StopUpdate:
    """Result of one :meth:`SequenceStop.update` / :meth:`SequenceStop.finish` call.

    Attributes:
        text: text that became safe to stream with this call (the delta; often ``""``).
        finished: True once the sequence has ended.
        reason: ``None`` while running, else ``"eos"``, ``"stop_token"``, ``"stop_string"`` or ``"length"``.
    """

    text: str
    finished: bool
    reason: str | None = None


class StopChecker:
    """Stop rules shared by all sequences of a request.

    Args:
        stop_strings: strings that end generation when they appear in the decoded text (non-empty).
        stop_token_ids: user-given token ids that end generation.
        eos_token_ids: the model's end-of-sequence ids (also end generation; reported as ``"eos"``).
        hold_incomplete_utf8: also hold back a trailing U+FFFD while streaming, since byte-level tokenizers
            decode an unfinished multi-byte character to it and replace it once the next token arrives.
    """

    def __init__(
        self,
        stop_strings: Iterable[str] | str | None = (),
        stop_token_ids: Iterable[int] | int | None = (),
        eos_token_ids: Iterable[int] | int | None = (),
        *,
        hold_incomplete_utf8: bool = True,
    ):
        if stop_strings is None:
            stop_strings = ()
        elif isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        strings = []
        for s in stop_strings:
            if not isinstance(s, str):
                raise GenerationError(f"stop strings must be strings, got {type(s).__name__}")
            if not s:
                raise GenerationError("stop strings must not be empty")
            if s not in strings:
                strings.append(s)
        self.stop_strings: tuple[str, ...] = tuple(strings)
        self.stop_token_ids: frozenset[int] = frozenset(_as_int_tuple(stop_token_ids, "stop_token_ids"))
        self.eos_token_ids: frozenset[int] = frozenset(_as_int_tuple(eos_token_ids, "eos_token_ids"))
        self.hold_incomplete_utf8 = bool(hold_incomplete_utf8)
        self._own: SequenceStop | None = None  # state for the feed()/flush() convenience API
        self._own_text = ""

    @property
    def all_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence (EOS and stop ids), sorted; e.g. for ``torch.isin`` on device."""
        return tuple(sorted(self.stop_token_ids | self.eos_token_ids))

    def token_reason(self, token_id: int) -> str | None:
        """``"eos"`` / ``"stop_token"`` if ``token_id`` ends the sequence, else ``None`` (EOS wins if both)."""
        if token_id in self.eos_token_ids:
            return "eos"
        if token_id in self.stop_token_ids:
            return "stop_token"
        return None

    def is_stop_token(self, token_id: int) -> bool:
        """True if ``token_id`` is an EOS or stop token id."""
        return token_id in self.eos_token_ids or token_id in self.stop_token_ids

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

    def holdback(self, text: str, start: int = 0) -> int:
        """Number of trailing characters of ``text[start:]`` that must not be streamed yet.

        That is the longest suffix that is a proper prefix of some stop string (it may still grow into one),
        With ``hold_incomplete_utf8``, a trailing run of U+FFFD is held too, together with any stop-string
        prefix just before it (the completed character may continue that prefix).
        """
        if start >= len(text):
            return 0
        run = 0
        if self.hold_incomplete_utf8 and text.endswith(_REPLACEMENT_CHAR):
            # U+FFFD for the bytes of an unfinished character (byte fallback emits one per byte): hold the run
            # and whatever stop-string prefix precedes it, since the completed character may continue it
            stripped = text[start:].rstrip(_REPLACEMENT_CHAR)
            run = len(text) - start - len(stripped)
            text, start = stripped, 0
        n = len(text)
        avail = n - start
        held = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, avail), held, -1):
                if text.startswith(s[:k], n - k):
                    held = k
                    break
        return held + run

    def sequence(self) -> "SequenceStop":
        """A fresh per-sequence tracker using these rules."""
        return SequenceStop(self)

    def sequences(self, n: int) -> list["SequenceStop"]:
        """``n`` fresh per-sequence trackers (one per batch row)."""
        return [SequenceStop(self) for _ in range(n)]

    # -- delta-based convenience: one StopChecker tracking one sequence's text ------------------------------

    def feed(self, delta: str) -> tuple[str, bool]:
        """Append a decoded text ``delta`` of this checker's own sequence; return ``(safe_text, hit)``.

        For loops that keep one checker per row and decode incrementally (stop/EOS token ids checked by the
        loop itself). ``safe_text`` is the newly streamable text; ``hit`` is True when a stop string completed
        (the text is then cut before it and later calls return ``("", True)``). Use :meth:`flush` when the
        sequence ends otherwise; :attr:`text` is the output so far.
        """
        if self._own is None:
            self._own = SequenceStop(self)
        if not isinstance(delta, str):
            raise GenerationError(f"feed() takes a str text delta, got {type(delta).__name__}")
        if self._own.finished:
            return "", self._own.reason == "stop_string"
        self._own_text += delta
        upd = self._own.update(None, self._own_text)
        return upd.text, upd.reason == "stop_string"

    def flush(self, reason: str = "length") -> str:
        """End this checker's own sequence (stop token, EOS or length) and return the held-back text.

        Returns ``""`` if a stop string already ended it or it was flushed before.
        """
        if self._own is None:
            self._own = SequenceStop(self)
        return self._own.finish(reason).text

    @property
    def text(self) -> str:
        """Output text of this checker's own sequence (:meth:`feed` API), cut before a stop string."""
        return self._own.text if self._own is not None else ""


class SequenceStop:
    """Stop state of one sequence: what has been streamed, whether and why it ended.

    Feed it every sampled token with :meth:`update` (with the decoded text of all generated tokens so far,
    unless the token is a stop token), and call :meth:`finish` when generation ends for another reason (token
    budget). The concatenation of all returned ``StopUpdate.text`` deltas equals the final :attr:`text`
    provided decoding is prefix-stable.

    Decoders are not always prefix-stable: byte-fallback tokenizers re-decode a whole run of byte tokens, so
    ``"日"`` can turn into ``"\ufffd\ufffd\ufffd\ufffd"`` while the next character is incomplete and come
    back once it completes. While the new text disagrees with what was streamed and its differing tail
    contains U+FFFD, nothing is released. Any other rewrite of already-streamed text (e.g. whitespace clean-up)
    cannot be retracted: streaming continues from the same character offset and stop strings are searched from
    where the texts diverge. Prefer decoding with ``clean_up_tokenization_spaces=False``.

    Attributes:
        text: the output text so far; once finished, the final text (cut before a stop string).
        emitted: number of characters already returned as safe to stream.
        finished, reason, matched: whether it ended, why, and the token id or stop string responsible.
    """

    def __init__(self, checker: StopChecker):
        self.checker = checker
        self.text = ""
        self.finished = False
        self.reason: str | None = None
        self.matched: int | str | None = None
        self._streamed = ""

    @property
    def emitted(self) -> int:
        """Number of characters returned so far as safe to stream."""
        return len(self._streamed)

    @property
    def streamed(self) -> str:
        """All text returned so far as safe to stream."""
        return self._streamed

    @property
    def pending(self) -> str:
        """Text produced but not released yet (a possible stop-string prefix or an unfinished character)."""
        if self.text.startswith(self._streamed):
            return self.text[len(self._streamed) :]
        return ""

    def _end(self, reason: str, matched: int | str | None) -> StopUpdate:
        self.finished = True
        self.reason = reason
        self.matched = matched
        delta = self.pending
        self._streamed += delta
        return StopUpdate(delta, True, reason)

    def update(self, token_id: int | None, text: str | None = None) -> StopUpdate:
        """Register the next sampled token and return the newly streamable text.

        Args:
            token_id: the sampled token id (``None`` to only check text).
            text: the decoded text of *all* generated tokens so far, including this one. Not needed (and
                ignored) when ``token_id`` is a stop/EOS token, which never becomes output text.

        A stop token ends the sequence and releases any held-back text; a stop string in ``text`` ends it and
        cuts the text before the stop string. After the sequence has finished, further calls return an empty
        update with ``finished=True``.
        """
        if self.finished:
            return StopUpdate("", True, self.reason)
        if token_id is not None:
            reason = self.checker.token_reason(int(token_id))
            if reason is not None:
                return self._end(reason, int(token_id))
        if text is None:
            raise GenerationError(f"update() needs the decoded text for non-stop token {token_id}")
        if not isinstance(text, str):
            raise GenerationError(f"update() text must be a str, got {type(text).__name__}")

        emitted = len(self._streamed)
        if text.startswith(self._streamed):
            # no stop string can start before `emitted`: that text was checked to be safe
            search_from = emitted
        else:
            diverge = len(os.path.commonprefix([self._streamed, text]))
            if _REPLACEMENT_CHAR in text[diverge:]:
                self.text = text  # an unfinished character re-decoded the tail: wait for it to complete
                return StopUpdate("", False, None)
            search_from = diverge  # streamed text was rewritten; it cannot be retracted

        found = self.checker.find_stop_string(text, search_from)
        if found is not None:
            index, stop = found
            self.text = text[:index]
            if index < emitted:
                self._streamed = self.text  # already streamed past the cut: nothing more to release
            return self._end("stop_string", stop)
        self.text = text
        safe = max(len(text) - self.checker.holdback(text, search_from), emitted)
        delta = text[emitted:safe]
        self._streamed = text[:safe] if len(text) >= emitted else self._streamed
        return StopUpdate(delta, False, None)

    def finish(self, reason: str = "length") -> StopUpdate:
        """End the sequence for a reason other than a stop token/string and flush the held-back text.

        Idempotent: on an already finished sequence returns an empty update with the original reason.
        """
        if self.finished:
            return StopUpdate("", True, self.reason)
        return self._end(reason, None)
