"""The session buffer between `ensemble_stream` and `llm` (mmtb_runtime.sessions), without a server."""

from __future__ import annotations

import threading
from pathlib import Path
from unittest import mock

import pytest

from builder.runtime import sessions
from builder.runtime.errors import RequestError
from builder.runtime.sessions import Chunk, SessionTable
from builder.runtime.text import load_tokenizer


@pytest.fixture()
def table(built_repository: Path) -> SessionTable:
    return SessionTable(load_tokenizer(str(built_repository / "llm" / "1" / "tokenizer.json")))


def collect() -> tuple[list[Chunk], object]:
    got: list[Chunk] = []
    return got, got.append


def test_a_poll_gets_every_token_since_the_last_and_the_end_closes_the_session(table: SessionTable) -> None:
    session = table.open(7)
    for token in (72, 105):
        session.token(token)
    got, deliver = collect()
    session.poll(deliver)
    assert [c.tokens for c in got] == [[72, 105]] and not got[0].finished
    session.poll(deliver)  # waits: nothing new yet
    assert len(got) == 1
    session.token(33)
    assert got[1].tokens == [33]
    session.finish()
    session.poll(deliver)
    assert got[2] == Chunk([], "", True)
    assert len(table) == 0  # the last chunk delivered: gone
    with pytest.raises(RequestError, match="session 7: unknown or already ended"):
        table.get(7)


def test_text_deltas_add_up_to_the_decoded_answer(table: SessionTable, built_repository: Path) -> None:
    tokenizer = load_tokenizer(str(built_repository / "llm" / "1" / "tokenizer.json"))
    ids = tokenizer.encode("Grüße, 東京!").ids
    session = table.open(1)
    got, deliver = collect()
    for token in ids:
        session.token(token)
        session.poll(deliver)  # byte-level tokens can split a character: its delta waits for the rest
    session.finish()
    session.poll(deliver)
    assert "".join(c.text for c in got) == "Grüße, 東京!"
    assert [t for c in got for t in c.tokens] == ids


def test_an_error_reaches_the_waiting_poll(table: SessionTable) -> None:
    session = table.open(3)
    got, deliver = collect()
    session.poll(deliver)
    session.fail(RuntimeError("decode failed"))
    assert isinstance(got[0].error, RuntimeError) and len(table) == 0


def test_one_poll_at_a_time_and_ids_are_unique(table: SessionTable) -> None:
    session = table.open(5)
    session.poll(lambda chunk: None)
    with pytest.raises(RequestError, match="already being polled"):
        session.poll(lambda chunk: None)
    with pytest.raises(RequestError, match="session 5: already open"):
        table.open(5)


def test_a_session_nobody_collects_is_dropped_after_it_ends(table: SessionTable) -> None:
    table.open(9).finish()  # its poller went away
    with mock.patch.object(sessions.time, "monotonic", return_value=sessions.time.monotonic() + sessions.ABANDONED_AFTER_S + 1):
        table.open(10)
    assert len(table) == 1


def test_tokens_from_the_scheduler_thread_and_polls_interleave_without_loss(table: SessionTable) -> None:
    session = table.open(11)
    got, deliver = collect()

    def decode() -> None:
        for token in range(300):
            session.token(100 + token % 100)
        session.finish()

    thread = threading.Thread(target=decode)
    thread.start()
    while not (got and got[-1].finished):
        arrived = threading.Event()

        def deliver_and_wake(chunk: Chunk, arrived: threading.Event = arrived) -> None:
            deliver(chunk)
            arrived.set()

        session.poll(deliver_and_wake)
        assert arrived.wait(5)
    thread.join()
    assert [t for c in got for t in c.tokens] == [100 + t % 100 for t in range(300)]


def test_a_cancelled_session_closes_and_tells_the_scheduler(table: SessionTable) -> None:
    session = table.open(31)
    session.token(72)
    table.cancel(31)
    assert session.cancelled and len(table) == 0  # DecodeJob.is_cancelled reads `cancelled`
    with pytest.raises(RequestError, match="session 31: unknown or already ended"):
        table.get(31)
    table.cancel(31)  # it ended meanwhile: nothing left to stop


def test_unloading_answers_every_waiting_poll(table: SessionTable) -> None:
    got, deliver = collect()
    for session_id in (21, 22):
        table.open(session_id).poll(deliver)
    table.fail_all(RuntimeError("the model is unloading"))
    assert [str(c.error) for c in got] == ["the model is unloading"] * 2 and len(table) == 0


def test_after_the_first_token_chunks_go_at_most_once_per_interval(built_repository: Path) -> None:
    clock = [100.0]
    table = SessionTable(load_tokenizer(str(built_repository / "llm" / "1" / "tokenizer.json")), interval_s=0.02)
    with mock.patch.object(sessions.time, "monotonic", lambda: clock[0]):
        session = table.open(9)
        got, deliver = collect()
        session.poll(deliver)
        session.token(72)
        assert [c.tokens for c in got] == [[72]]  # the first token at once: time to first token is not delayed
        session.poll(deliver)
        clock[0] += 0.005
        session.token(105)
        clock[0] += 0.005
        session.token(33)
        assert len(got) == 1  # 10 ms since the last chunk: the poll waits, the tokens gather
        clock[0] += 0.015
        session.token(10)
        assert got[1].tokens == [105, 33, 10]
        session.token(11)
        session.poll(deliver)
        assert len(got) == 2
        session.finish()  # the end goes at once with whatever is left
        assert got[2].tokens == [11] and got[2].finished
