"""The generation engine: one loop, PyTorch and ONNX decode-graph backends, against transformers' generate().

The references are transformers' own ``generate()`` on one prompt at a time (no padding), which is what a
user of the plain model gets; every engine path (single, batched with different lengths, cut from the left)
must reproduce it token for token in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_med.engine import GenerationSettings, load_engine, torch_engine
from lora_med.errors import LoraMedError

PROMPT_LENGTHS = (1, 5, 17, 40)


def _prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return [g.integers(1, vocab, size=n).tolist() for n in lengths]


def _hf_greedy(model, prompt: list[int], n: int, eos: int, **kw) -> list[int]:
    """transformers' generate() on one unpadded prompt; the EOS that stops it is dropped, as the engine does."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             num_beams=1, eos_token_id=eos, pad_token_id=eos, **kw)[0, len(prompt):].tolist()
    return out[:out.index(eos)] if eos in out else out


@pytest.fixture(scope="module")
def tiny_model(tiny_base):
    from lora_med.models import load_model

    return load_model(str(tiny_base))


@pytest.fixture(scope="module")
def tiny_torch(tiny_model):
    return torch_engine(tiny_model, eos_token_id=int(tiny_model.config.eos_token_id))


# --------------------------------------------------------------------------- the loop on PyTorch


def test_torch_engine_greedy_equals_generate_single_and_batched(tiny_model, tiny_torch):
    prompts = _prompts(tiny_model.config.vocab_size)
    s = GenerationSettings(max_new_tokens=24)
    refs = [_hf_greedy(tiny_model, p, 24, tiny_torch.eos_token_id) for p in prompts]
    assert [tiny_torch.generate([p], s)[0] for p in prompts] == refs
    assert tiny_torch.generate(prompts, s) == refs  # one batch, four lengths
    assert tiny_torch.name == "engine-torch-cpu-fp32" and tiny_torch.capacity == 256


def test_torch_engine_cuts_long_prompts_from_the_left(tiny_model, tiny_torch):
    long = _prompts(tiny_model.config.vocab_size, (300,), seed=1)[0]  # capacity 256
    s = GenerationSettings(max_new_tokens=16)
    keep = tiny_torch.capacity - 16
    ref = _hf_greedy(tiny_model, long[-keep:], 16, tiny_torch.eos_token_id)
    assert tiny_torch.generate([long, long[:3]], s)[0] == ref


def test_no_repeat_ngram_matches_transformers(tiny_model, tiny_torch):
    prompts = _prompts(tiny_model.config.vocab_size, (3, 12), seed=2)
    for n in (1, 2, 3):
        s = GenerationSettings(max_new_tokens=30, no_repeat_ngram_size=n)
        refs = [_hf_greedy(tiny_model, p, 30, tiny_torch.eos_token_id, no_repeat_ngram_size=n) for p in prompts]
        assert tiny_torch.generate(prompts, s) == refs
        for r in refs:  # and the rule did bite: no n-gram repeats within the reply
            grams = [tuple(r[i:i + n]) for i in range(len(r) - n + 1)]
            assert len(grams) == len(set(grams))


def test_eos_stops_a_row_and_min_new_tokens_suppresses_it(tiny_model):
    prompts = _prompts(tiny_model.config.vocab_size, (4, 9), seed=3)
    # no_repeat_ngram_size=1: every reply token is new, so the 6th one can play the EOS without appearing earlier
    s = GenerationSettings(max_new_tokens=20, no_repeat_ngram_size=1)
    free = torch_engine(tiny_model, eos_token_id=tiny_model.config.eos_token_id).generate(prompts, s)
    k = 5
    eos = free[0][k]
    engine = torch_engine(tiny_model, eos_token_id=eos)
    got = engine.generate(prompts, s)
    assert got[0] == free[0][:k]  # stopped there, EOS not returned
    assert got[1] == (free[1][:free[1].index(eos)] if eos in free[1] else free[1])  # the other row goes on
    forced = engine.generate(prompts[:1], GenerationSettings(max_new_tokens=20, min_new_tokens=20,
                                                             no_repeat_ngram_size=1))[0]
    assert len(forced) == 20 and eos not in forced
    assert forced[:k] == free[0][:k] and forced[k] != eos


def test_sampling_is_reproducible_by_seed_and_differs_across_seeds(tiny_model, tiny_torch):
    prompts = _prompts(tiny_model.config.vocab_size, (6, 6), seed=4)
    s = GenerationSettings(max_new_tokens=24, do_sample=True, temperature=1.3, top_p=0.95, seed=7)
    a, b = tiny_torch.generate(prompts, s), tiny_torch.generate(prompts, s)
    c = tiny_torch.generate(prompts, GenerationSettings(**{**s.__dict__, "seed": 8}))
    assert a == b and a != c
    greedy = tiny_torch.generate(prompts, GenerationSettings(max_new_tokens=24))
    assert a != greedy


def test_top_p_keeps_the_nucleus_only():
    from lora_med.engine import _Sampler

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    sampler = _Sampler(GenerationSettings(do_sample=True, top_p=0.7, seed=0))
    assert sorted(sampler._nucleus(np.array([0.5, 0.3, 0.15, 0.05])).tolist()) == [0, 1]  # 0.5 < 0.7 <= 0.8
    draws = {int(sampler.choose(logits.copy())[0]) for _ in range(300)}
    assert draws == {0, 1}


def test_torch_engine_restores_training_mode(tiny_model):
    engine = torch_engine(tiny_model, eos_token_id=0)
    tiny_model.train()
    try:
        engine.generate([[1, 2, 3]], GenerationSettings(max_new_tokens=3))
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_bad_requests_are_named(tiny_torch):
    with pytest.raises(LoraMedError, match="prompt 0 is empty"):
        tiny_torch.generate([[]])
    with pytest.raises(LoraMedError, match="outside the vocabulary"):
        tiny_torch.generate([[10**6]])
    with pytest.raises(LoraMedError, match="leaves no room"):
        tiny_torch.generate([[1]], GenerationSettings(max_new_tokens=256))
    with pytest.raises(LoraMedError, match="temperature"):
        tiny_torch.generate([[1]], GenerationSettings(do_sample=True, temperature=0))


def test_load_engine_on_a_hf_folder_runs_pytorch(tiny_base, tiny_model):
    engine = load_engine(tiny_base, device="cpu")
    p = _prompts(tiny_model.config.vocab_size, (7,), seed=5)[0]
    assert engine.generate([p], GenerationSettings(max_new_tokens=10))[0] == _hf_greedy(
        tiny_model, p, 10, engine.eos_token_id)
    with pytest.raises(LoraMedError, match="neither a decode graph"):
        load_engine(tiny_base / "nothing-here")
