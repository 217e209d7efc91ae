"""The batching generation engine in process, on the real tiny-llama: requests waiting together are
generated in one batch with answers identical to generating each alone, a cancelled request frees
the worker within a few tokens, a full queue refuses, and streams never split a character."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from llmtune.serve.engine import Engine, EngineBusy, IncrementalDecoder, Settings

HELLO = [{"role": "user", "content": "What is 2 plus 3?"}]
LONG = Settings(max_new_tokens=900, temperature=0.9, seed=1, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    e = Engine.load("tiny-llama", max_queue=2)
    yield e
    e.close()


def until(check: Callable[[], bool], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def running_alone(engine: Engine) -> tuple[Iterator[str], object]:
    """A long stream that holds the worker, started and producing."""
    stream = engine.stream(HELLO, LONG)
    pieces = iter(stream)
    next(pieces)
    return pieces, stream


def test_waiting_requests_share_one_batch_and_answer_as_alone(engine: Engine) -> None:
    requests = [
        (HELLO, Settings(max_new_tokens=10, temperature=0.9, seed=3)),
        ([{"role": "user", "content": "Name a colour, please, and then a much longer sentence."}],
         Settings(max_new_tokens=6, temperature=0, n=2)),
        (HELLO, Settings(max_new_tokens=12, temperature=1.2, top_p=0.8, top_k=40, seed=5, n=2)),
        ([{"role": "user", "content": "Hi"}], Settings(max_new_tokens=9, temperature=0.7, seed=9,
                                                      presence_penalty=1.0, repetition_penalty=1.3)),
    ]
    alone = [engine.complete(m, s) for m, s in requests]
    before = engine.stats()
    pieces, stream = running_alone(engine)  # the worker is busy: what comes next waits, together
    jobs = [engine.submit(engine.prompt_ids(m), s, engine.stops(s), block=True) for m, s in requests[:2]]
    with pytest.raises(EngineBusy):  # max_queue=2
        engine.submit(engine.prompt_ids(HELLO), requests[0][1], ())
    stream.close()
    together = [job.future.result(timeout=120) for job in jobs]
    after = engine.stats()
    assert after["batches"] - before["batches"] == 2  # the long stream's, then one for both waiting requests
    assert after["largest_batch"] >= 2 and after["rejected"] - before["rejected"] == 1
    for a, b in zip(alone, together):
        assert [c.text for c in a.choices] == [c.text for c in b.choices]
        assert [c.finish_reason for c in a.choices] == [c.finish_reason for c in b.choices]
    # complete_many batches too, and seeds make every answer independent of its batch-mates.
    many = engine.complete_many(requests)
    assert [[c.text for c in r.choices] for r in many] == [[c.text for c in r.choices] for r in alone]
    assert alone[2].choices[0].text != alone[2].choices[1].text  # answer j is sampled with seed + j


def test_a_cancelled_stream_frees_the_worker_within_a_few_tokens(engine: Engine) -> None:
    pieces, stream = running_alone(engine)
    next(pieces)
    at_close = engine.stats()["tokens"]
    stream.close()
    until(lambda: engine.stats()["running"] == 0)
    assert engine.stats()["tokens"] - at_close < 50, "generation went on after the cancel"
    start = time.monotonic()
    assert engine.chat(HELLO, Settings(max_new_tokens=4, temperature=0))
    assert time.monotonic() - start < 30


def test_stream_equals_answer_and_stops(engine: Engine) -> None:
    settings = Settings(max_new_tokens=16, temperature=0.9, seed=11)
    answer = engine.chat(HELLO, settings)
    stop = answer[2:4]
    assert "".join(engine.stream(HELLO, settings)) == answer
    cut = engine.complete(HELLO, replace(settings, stop=(stop,))).choices[0]
    assert cut.text == answer[:answer.find(stop)].strip() and cut.finish_reason == "stop"
    assert "".join(engine.stream(HELLO, replace(settings, stop=(stop,)))) == cut.text


def test_incremental_decoding_never_splits_a_character(engine: Engine) -> None:
    text = "naïve café — 你好, 🙂 ok"
    ids = engine.tok(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(engine.tok)
    pieces = [decoder.feed([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == engine.tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) < len(ids)  # byte tokens of one character were held back together


def test_sample_rows_ends_each_row_on_its_own(engine: Engine) -> None:
    """The core under the engine: rows of one batch with their own lengths are masked at their own end."""
    import torch

    from llmtune.modeling.generate import RowSpec, sample_rows

    ids = engine.prompt_ids(HELLO)
    seen: list[tuple[int, int, str | None]] = []
    rows = [RowSpec(max_new_tokens=3, temperature=0, min_new_tokens=3), RowSpec(max_new_tokens=7, seed=1, min_new_tokens=7)]
    with torch.inference_mode():
        s = sample_rows(engine.model, engine.tok, engine.kind, [ids, ids[3:]], rows, lambda *t: seen.append(t))
    assert s.lengths == [3, 7] and s.finish_reasons == ["length", "length"]
    assert (s.response_ids[0, 3:] == engine.tok.pad_token_id).all()
    assert [t for r, t, _ in seen if r == 0] == s.response_ids[0, :3].tolist()  # streamed as generated
    assert [(r, why) for r, _, why in seen if why] == [(0, "length"), (1, "length")]
