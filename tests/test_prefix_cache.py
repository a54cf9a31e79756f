"""The engine's prefix cache (lora_med/engine_prefix.py): a conversation's next turn prefills only its new
tokens, and every reply is the one the engine gives without the cache."""

from __future__ import annotations

import numpy as np
import pytest

from lora_med.engine import GenerationSettings, load_engine
from lora_med.engine.prefix_cache import PrefixCache


@pytest.fixture(scope="module")
def graph(tiny_base, tmp_path_factory):
    from lora_med.export.decode_graph import build_decode_graph

    out = tmp_path_factory.mktemp("decode-prefix")
    build_decode_graph(tiny_base, out, capacity=96)  # small: later turns are cut from the left
    return out


@pytest.fixture(scope="module")
def engines(graph):
    plain = load_engine(graph, device="cpu", threads=1)
    cached = load_engine(graph, device="cpu", threads=1, prefix_cache_mb=4)
    yield plain, cached
    plain.close()
    cached.close()


def _turn(g: np.random.Generator, vocab: int, n: int) -> list[int]:
    return g.integers(1, vocab, size=n).tolist()


def test_conversations_get_the_replies_they_get_without_the_cache(engines):
    plain, cached = engines
    g = np.random.default_rng(0)
    eos, vocab = plain.eos_token_id, plain.vocab_size
    s = GenerationSettings(max_new_tokens=12)
    convs = [_turn(g, vocab, n) for n in (9, 20, 14)]
    for turn in range(5):  # the last turns pass the capacity: cut from the left, they no longer match
        want = plain.generate(convs, s)
        assert cached.generate(convs, s) == want, turn
        convs = [c + r + [eos] + _turn(g, vocab, int(g.integers(2, 8))) + [eos] for c, r in zip(convs, want)]
    cache = cached.prefix_cache
    assert cache.hits >= 6 and cache.reused_tokens > 100  # turns 2-3 at least: whole earlier turns reused
    assert len(cache) <= 3 * 2  # an entry a longer one extends is dropped


def test_a_partial_match_is_reused_up_to_the_first_difference(engines):
    plain, cached = engines
    g = np.random.default_rng(1)
    s = GenerationSettings(max_new_tokens=6)
    first = _turn(g, plain.vocab_size, 30)
    cached.generate([first], s)
    before = cached.prefix_cache.reused_tokens
    other = first[:17] + _turn(g, plain.vocab_size, 9)  # same first 17 tokens, then another message
    mixed = [other, _turn(g, plain.vocab_size, 5), first + [plain.eos_token_id]]
    assert cached.generate(mixed, s) == plain.generate(mixed, s)  # one batch: reused, fresh and reused rows
    assert cached.prefix_cache.reused_tokens - before >= 17 + 30


def test_the_cache_lives_with_the_cpu_decode_graph_only(tiny_base, graph):
    with load_engine(tiny_base, device="cpu", prefix_cache_mb=4) as torch_engine:
        assert torch_engine.prefix_cache is None  # the PyTorch path has no rows to restore
    with load_engine(graph, device="cpu") as off:
        assert off.prefix_cache is None  # off unless asked: bench and the parity gate measure cold prompts


def test_budget_lru_and_what_is_never_reused():
    kv = lambda n: [np.zeros((2, n, 4), np.float32) for _ in range(4)]
    cache = PrefixCache(max_bytes=3 * 42 * (128 + 8), min_tokens=8)  # room for three 40-42-token entries
    a, b, c = list(range(40)), list(range(100, 140)), list(range(200, 240))
    for t in (a, b, c):
        cache.store(t, kv(40))
    assert len(cache) == 3
    assert cache.lookup(a + [7])[1] == 40  # a is now the most recently used
    cache.store(list(range(300, 340)), kv(40))  # over budget: b, the least recently used, goes
    assert cache.lookup(b + [7]) is None and cache.lookup(a + [7]) is not None
    assert cache.lookup(a[:5] + [999] * 10) is None  # 5 shared tokens: under min_tokens
    assert cache.lookup(a)[1] == 39  # one token is always left to run
    entry, _ = cache.lookup(c + [1])
    cache.store(c + [1, 2], kv(42), extends=entry)  # the longer entry replaces the one it extends
    assert len(cache) == 3 and cache.lookup(c + [1, 2, 3])[1] == 42
    cache.store(list(range(1000)), kv(1000))  # larger than the whole budget: not kept, nothing evicted
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes


def test_a_next_turn_joining_a_running_batch_reuses_its_prefix(engines):
    plain, cached = engines
    g = np.random.default_rng(5)
    s = GenerationSettings(max_new_tokens=8)
    eos, vocab = plain.eos_token_id, plain.vocab_size
    first = _turn(g, vocab, 20)
    reply = cached.generate([first], s)[0]
    follow = first + reply + [eos] + _turn(g, vocab, 4) + [eos]
    other = _turn(g, vocab, 11)
    before = cached.prefix_cache.reused_tokens
    done = {}
    with cached.stream(s, rows=2) as st:
        (h_other,) = st.add([other])
        for _ in range(3):
            done.update((f.handle, f.ids) for f in st.step())
        (h_follow,) = st.add([follow])  # joins row 1 while row 0 is mid-reply
        while st.busy:
            done.update((f.handle, f.ids) for f in st.step())
    assert [done[h_other], done[h_follow]] == [plain.generate([other], s)[0], plain.generate([follow], s)[0]]
    assert cached.prefix_cache.reused_tokens - before >= len(first) + len(reply) - 1


def test_a_kept_system_prompt_is_reused_by_the_first_prompts_after_it(engines, tiny_base):
    """keep_prefix: what serve does with its system prompt at start. The prompts that follow prefill only their
    own tokens and get the replies they get without the cache."""
    plain, cached = engines
    g = np.random.default_rng(7)
    s = GenerationSettings(max_new_tokens=6)
    system = _turn(g, plain.vocab_size, 24)
    prompts = [system + _turn(g, plain.vocab_size, n) for n in (3, 9)]
    cached.prefix_cache.clear()
    assert (len(cached.prefix_cache), cached.prefix_cache.nbytes, cached.prefix_cache.hits) == (0, 0, 0)
    assert cached.keep_prefix(system) == 24 and len(cached.prefix_cache) == 1
    assert cached.prefix_cache.prompt_tokens == 0  # keeping is not a prompt
    assert cached.generate(prompts, s) == plain.generate(prompts, s)
    assert cached.prefix_cache.hits == 2 and cached.prefix_cache.reused_tokens == 2 * 24
    assert cached.keep_prefix(system[:5]) == 0  # under the cache's minimum: nothing kept
    assert plain.keep_prefix(system) == 0  # no prefix cache
    with load_engine(tiny_base, device="cpu") as torch_side, torch_side.keeping_prefixes(2**20) as cache:
        assert cache is None and torch_side.keep_prefix(system) == 0  # no rows to restore


def test_keeping_prefixes_lends_a_cache_and_gives_the_old_one_back(engines):
    plain, cached = engines
    own = cached.prefix_cache
    with plain.keeping_prefixes(2**20) as cache:
        assert cache is not None and plain.prefix_cache is cache and cache.max_bytes == 2**20
    assert plain.prefix_cache is None
    with cached.keeping_prefixes(0) as cache:
        assert cache is None and cached.prefix_cache is None  # 0 bytes: none in the block
    assert cached.prefix_cache is own
