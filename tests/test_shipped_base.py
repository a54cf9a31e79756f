"""The pretrained Spanish base shipped in models/gpt2-es-tiny loads offline with stock
transformers (no hub, no trust_remote_code) and is wired the way DialoGPT is."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "gpt2-es-tiny"
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def shipped():
    # module-scoped so the (small) model is loaded once; offline flags set per test below
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        tok = AutoTokenizer.from_pretrained(MODEL_DIR)
        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    return tok, model


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_files_present_and_small():
    names = {p.name for p in MODEL_DIR.iterdir()}
    for f in [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "README.md",
    ]:
        assert f in names, f
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)  # safetensors only
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 25 * 2**20


def test_config(shipped):
    tok, model = shipped
    cfg = model.config
    assert cfg.model_type == "gpt2"
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert cfg.vocab_size == len(tok)
    assert cfg.n_positions == 512 == tok.model_max_length
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.dtype == torch.float32  # fp16 file, upcast by from_pretrained


def test_eos_is_endoftext(shipped):
    tok, model = shipped
    assert tok.eos_token == EOS
    assert tok.eos_token_id == model.config.eos_token_id
    assert tok.convert_tokens_to_ids(EOS) == model.config.eos_token_id
    # DialoGPT convention: bos = eos = pad = <|endoftext|>
    assert tok.bos_token == tok.pad_token == EOS
    gen = model.generation_config
    assert gen.eos_token_id == gen.pad_token_id == gen.bos_token_id == tok.eos_token_id
    # EOS written in text is one token, so a turn can end with it
    assert tok("Hola." + EOS)["input_ids"][-1] == tok.eos_token_id


def test_spanish_roundtrip(shipped):
    tok, _ = shipped
    text = "El niño pidió una cita para mañana; ¿está la doctora Peña disponible? ¡Sí!"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
    assert len(ids) < len(text)  # the BPE actually learned Spanish merges


def test_forward_pass(shipped):
    tok, model = shipped
    enc = tok(["Buenos días, ¿en qué puedo ayudarle?"], return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert out.logits.shape == (1, enc["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(out.logits).all()
