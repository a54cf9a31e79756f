"""Continuous batching (``Engine.stream``): prompts join a running batch and leave it when they finish, and
every reply is the one the engine gives that prompt alone."""

from __future__ import annotations

import numpy as np
import pytest

from lora_med.engine import GenerationSettings, load_engine
from lora_med.engine.torch_backend import torch_engine
from lora_med.errors import LoraMedError


@pytest.fixture(scope="module")
def graph(tiny_base, tmp_path_factory):
    from lora_med.export.decode_graph import build_decode_graph

    out = tmp_path_factory.mktemp("decode-stream")
    build_decode_graph(tiny_base, out, capacity=64)
    return out


@pytest.fixture(scope="module")
def engine(graph):
    with load_engine(graph, device="cpu", threads=1) as e:
        yield e


def _prompts(vocab: int, lengths, seed: int) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return [g.integers(1, vocab, size=n).tolist() for n in lengths]


def _drain(stream, done: dict) -> None:
    while stream.busy:
        done.update((f.handle, f) for f in stream.step())


def test_prompts_joining_a_running_batch_get_the_replies_they_get_alone(engine):
    s = GenerationSettings(max_new_tokens=8)
    prompts = _prompts(engine.vocab_size, (5, 30, 12, 3, 21), seed=0)
    alone = [engine.generate([p], s)[0] for p in prompts]
    done: dict = {}
    with engine.stream(s, rows=3) as st:
        first = st.add(prompts[:1])  # row 0
        for _ in range(3):
            done.update((f.handle, f) for f in st.step())
        assert st.free() == 2 and st.live == 1
        more = st.add(prompts[1:3])  # rows 1 and 2 join three tokens in: their prompts run, row 0 waits a step
        assert st.free() == 0
        with pytest.raises(LoraMedError, match="free rows"):
            st.add(prompts[3:4])
        while st.free() == 0:  # row 0 finishes first and its place is taken at once
            done.update((f.handle, f) for f in st.step())
        assert first[0] in done
        later = st.add(prompts[3:4])  # row 0, below the busy rows 1 and 2
        while st.free() == 0:
            done.update((f.handle, f) for f in st.step())
        later += st.add(prompts[4:])
        _drain(st, done)
    handles = first + more + later
    assert [done[h].ids for h in handles] == alone
    assert all(1 <= done[h].batch <= 3 for h in handles) and done[more[0]].batch > 1


def test_a_dropped_reply_frees_its_row_and_leaves_the_others_alone(engine):
    s = GenerationSettings(max_new_tokens=10)
    prompts = _prompts(engine.vocab_size, (7, 16, 9, 25), seed=1)
    alone = [engine.generate([p], s)[0] for p in prompts]
    done: dict = {}
    with engine.stream(s, rows=3) as st:
        handles = st.add(prompts[:3])
        st.step()
        st.drop(handles[1])  # its client left: the row in the middle is idle, rows 0 and 2 go on
        assert st.free() == 1 and st.live == 2
        st.drop(12345)  # an unknown handle changes nothing
        handles.append(st.add(prompts[3:])[0])  # takes the middle row
        _drain(st, done)
    assert handles[1] not in done
    assert [done[h].ids for h in (handles[0], handles[2], handles[3])] == [alone[0], alone[2], alone[3]]


def test_sampling_and_bans_follow_each_row_across_joins(engine):
    s = GenerationSettings(max_new_tokens=12, no_repeat_ngram_size=2, do_sample=True, seed=3)
    prompts = _prompts(engine.vocab_size, (6, 14), seed=2)
    done: dict = {}
    with engine.stream(s, rows=2) as st:
        a = st.add(prompts[:1])
        for _ in range(4):
            done.update((f.handle, f) for f in st.step())
        b = st.add(prompts[1:])
        _drain(st, done)
    for h, p in zip(a + b, prompts):
        seq = p + done[h].ids
        reply_pairs = [tuple(seq[i : i + 2]) for i in range(len(p) - 1, len(seq) - 1)]
        earlier = {tuple(seq[i : i + 2]) for i in range(len(p) - 1)}
        assert len(set(reply_pairs)) == len(reply_pairs) and not set(reply_pairs) & earlier


def test_a_backend_that_cannot_join_takes_whole_batches(tiny_base):
    from lora_med.models import load_model

    model = load_model(str(tiny_base))
    eng = torch_engine(model, eos_token_id=int(model.config.eos_token_id))
    s = GenerationSettings(max_new_tokens=5)
    prompts = _prompts(eng.vocab_size, (4, 9, 6), seed=4)
    alone = [eng.generate([p], s)[0] for p in prompts]
    done: dict = {}
    with eng.stream(s, rows=4) as st:
        assert not eng.joins and st.free() == 4
        first = st.add(prompts[:2])
        assert st.free() == 0  # the PyTorch cache is one left-padded batch: the next prompts wait for it
        with pytest.raises(LoraMedError, match="free rows"):
            st.add(prompts[2:])
        _drain(st, done)
        assert st.free() == 4
        second = st.add(prompts[2:])
        _drain(st, done)
    assert [done[h].ids for h in first + second] == alone


def test_stream_settings_are_checked(engine):
    with pytest.raises(LoraMedError, match="rows >= 1"), engine.stream(GenerationSettings(), rows=0):
        pass
    with (
        pytest.raises(LoraMedError, match="temperature"),
        engine.stream(GenerationSettings(do_sample=True, temperature=0), rows=2),
    ):
        pass
    with engine.stream(GenerationSettings(max_new_tokens=4), rows=2) as st:
        with pytest.raises(LoraMedError, match="prompt 0 is empty"):
            st.add([[]])
        assert st.free() == 2 and not st.busy  # nothing was added


def test_rows_with_their_own_settings_beside_the_streams(engine):
    """RowSettings: a row's own max_new_tokens, a seeded sampler (same seed, same reply; alone or in company),
    greedy rows in a sampling stream; bad row settings add nothing; tokens() shows a reply in flight."""
    from lora_med.engine import RowSettings

    vocab = engine.vocab_size
    p = _prompts(vocab, [5, 9, 7], seed=3)
    greedy = GenerationSettings(max_new_tokens=12)
    alone = engine.generate(p, greedy)
    with engine.stream(greedy, rows=4) as s:
        done: dict = {}
        hs = s.add(p, [RowSettings(max_new_tokens=3), None, RowSettings(temperature=0.8, seed=7)])
        first = s.tokens(hs[1])
        assert first == alone[1][:1]  # the first token is chosen when the prompt is added
        _drain(s, done)
        assert s.tokens(hs[1]) is None  # finished
        with pytest.raises(LoraMedError, match="max_new_tokens=13"):
            s.add(p[:1], [RowSettings(max_new_tokens=13)])
        assert s.free() == 4
    assert done[hs[0]].ids == alone[0][:3]  # a row's own limit, the stream's choice of tokens
    assert done[hs[1]].ids == alone[1]
    sampled = done[hs[2]].ids
    # The same seed alone in a stream that samples with other settings: the same reply.
    with engine.stream(GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5, seed=1), rows=2) as s:
        again: dict = {}
        h = s.add([p[2], p[0]], [RowSettings(temperature=0.8, seed=7), RowSettings(temperature=0)])
        _drain(s, again)
    assert again[h[0]].ids == sampled
    assert again[h[1]].ids == alone[0]  # temperature 0: greedy inside a sampling stream


def test_finished_rows_below_a_long_reply_leave_the_decode_batch(engine):
    """Rows are compacted: when the rows below the top one finish, the top row's cache moves down, so each
    step decodes only the rows in flight, and every reply is still the one its prompt gets alone."""
    prompts = _prompts(engine.vocab_size, (6, 9, 14, 20), seed=5)
    lengths = [2, 3, 5, 12]  # the longest reply sits in the top row
    longest = GenerationSettings(max_new_tokens=12, min_new_tokens=12)
    alone = [engine.generate([p], longest)[0][:n] for p, n in zip(prompts, lengths)]
    widths, step = [], engine._backend.step

    def recorded(tokens, active):
        widths.append(len(tokens))
        return step(tokens, active)

    engine._backend.step = recorded
    done: dict = {}
    try:
        with engine.stream(longest, rows=4) as st:
            handles = st.add(prompts)
            have = dict.fromkeys(handles[:3], 1)  # the top row runs to its 12 tokens and finishes by itself
            while st.busy:
                done.update((f.handle, f.ids) for f in st.step())
                for h, n in zip(handles, lengths):
                    if h in have:
                        have[h] += 1
                        if have[h] >= n:
                            st.drop(h)
                            del have[h]
    finally:
        engine._backend.step = step
    assert widths[:2] == [4, 3] and widths[-1] == 1  # the top row moved down as the rows below it finished
    assert sum(widths) == sum(n - 1 for n in lengths)  # no step decoded a finished row
    assert done[handles[3]] == alone[3]  # the moved row's reply is the one its prompt gets alone
