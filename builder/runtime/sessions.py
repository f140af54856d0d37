"""Token streams that one model polls from another, so the LLM's weights live in one process.

The decode model `llm` holds the weights. The entry points (`ensemble`, `ensemble_stream`) hold none: each opens a session
on `llm` with the prompt (a plain, non-decoupled BLS call), then polls it until the answer ends. The
sequence decodes in `llm`'s running batch at full speed; the first poll is answered with the first
token, each later one with every token chosen since, once ``interval_s`` has passed since the last
answer (or at the end): a cadence, not a token count, so a fast model streams few large chunks (each
poll is a round trip) and a slow one every token as it comes. When the stream's client goes away the
poller cancels the session instead of polling it: the decode scheduler drops its sequence at the next step.
Plain BLS calls only: Triton 2.51's decoupled BLS (`exec(decoupled=True)`) lost stubs under the soak.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tokenizers import Tokenizer

from .errors import RequestError
from .text import TextStream

# A finished session nobody polls any more (its poller died) is dropped after this long.
ABANDONED_AFTER_S = 60.0


@dataclass(frozen=True)
class Chunk:
    """What one poll gets: the tokens and text since the last poll, and whether the answer ended."""

    tokens: list[int]
    text: str
    finished: bool
    error: BaseException | None = None


class TokenSession:
    """One sequence's tokens, buffered between polls. ``token``/``finish``/``fail`` come from the decode
    scheduler's thread; ``poll`` from `execute`; whichever comes second delivers the chunk."""

    def __init__(self, tokenizer: Tokenizer, on_closed: Callable[[], None], interval_s: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._interval_s = interval_s  # least time between chunks after the first (the end goes at once)
        self._last_sent: float | None = None
        self._text = TextStream(tokenizer)
        self._tokens: list[int] = []
        self._delta = ""
        self._finished = False
        self._error: BaseException | None = None
        self._waiter: Callable[[Chunk], None] | None = None
        self._on_closed = on_closed
        self.ended_at: float | None = None
        self.cancelled = False  # read by the decode scheduler before each step (DecodeJob.is_cancelled)

    def token(self, token: int) -> None:
        with self._lock:
            self._tokens.append(token)
            self._delta += self._text.push(token)
            self._deliver()

    def finish(self) -> None:
        with self._lock:
            self._delta += self._text.flush()
            self._finished, self.ended_at = True, time.monotonic()
            self._deliver()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self._error, self.ended_at = error, time.monotonic()
            self._deliver()

    def cancel(self) -> None:
        """The poller's client went away: the session closes and the decode scheduler drops its sequence before its next step."""
        with self._lock:
            self.cancelled, self.ended_at = True, time.monotonic()
        self._on_closed()

    def poll(self, deliver: Callable[[Chunk], None]) -> None:
        """``deliver`` is called once, now or when the next token (or the end) comes."""
        with self._lock:
            if self._waiter is not None:
                raise RequestError("session: already being polled")
            self._waiter = deliver
            self._deliver()

    def _deliver(self) -> None:
        ended = self._finished or self._error is not None
        now = time.monotonic()
        due = self._last_sent is None or now - self._last_sent >= self._interval_s
        if self._waiter is None or not ((self._tokens and due) or ended):
            return
        self._last_sent = now
        chunk = Chunk(self._tokens, self._delta, self._finished, self._error)
        waiter, self._waiter, self._tokens, self._delta = self._waiter, None, [], ""
        if ended:
            self._on_closed()
        waiter(chunk)


class SessionTable:
    """Open sessions by id. A session leaves when its last chunk is delivered, or when it ended
    :data:`ABANDONED_AFTER_S` ago and nobody collected it."""

    def __init__(self, tokenizer: Tokenizer, interval_s: float = 0.0) -> None:
        self._tokenizer, self._interval_s = tokenizer, interval_s
        self._lock = threading.Lock()
        self._sessions: dict[int, TokenSession] = {}

    def open(self, session_id: int) -> TokenSession:
        with self._lock:
            self._drop_abandoned()
            if session_id in self._sessions:
                raise RequestError(f"session {session_id}: already open")
            session = TokenSession(self._tokenizer, lambda: self._close(session_id), self._interval_s)
            self._sessions[session_id] = session
            return session

    def get(self, session_id: int) -> TokenSession:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise RequestError(f"session {session_id}: unknown or already ended")
        return session

    def cancel(self, session_id: int) -> None:
        """Cancels the session if it is still open (it may have ended meanwhile: then nothing is left to stop)."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is not None:
            session.cancel()

    def __len__(self) -> int:
        return len(self._sessions)

    def fail_all(self, error: BaseException) -> None:
        """The model is unloading: every open session's poller gets ``error`` instead of waiting forever."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.fail(error)

    def _close(self, session_id: int) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def _drop_abandoned(self) -> None:
        now = time.monotonic()
        for session_id, session in list(self._sessions.items()):
            if session.ended_at is not None and now - session.ended_at > ABANDONED_AFTER_S:
                del self._sessions[session_id]
