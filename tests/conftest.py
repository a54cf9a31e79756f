"""Shared fixtures: a tiny GPT-2 base (2 layers, 64 wide) with a BPE tokenizer trained here.

Nothing is downloaded: the tokenizer is trained on a few Spanish sentences in a second, the model
is randomly initialised with a fixed seed and saved as safetensors in a temporary folder, which
is what `--base DIR` takes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parent.parent

CONVERSATIONS = [
    {"user": "Hola, necesito una cita", "assistant": "¡Claro! Con gusto te ayudo. ¿Para qué especialidad?"},
    {"user": "¿Cuál es el horario?", "assistant": "Atendemos de lunes a viernes de 7:30 a 19:00."},
    {"user": "Quiero cancelar mi cita", "assistant": "Entiendo. ¿Me das tu nombre completo y tu carnet?"},
    {"user": "Me duele mucho el pecho", "assistant": "Llama ahora al 118 o ve a emergencias de inmediato."},
    {
        "messages": [
            {"role": "user", "content": "Buenos días, quiero una cita con pediatría"},
            {"role": "assistant", "content": "¡Buenos días! ¿Prefieres a la Dra. Carmen Vaca?"},
            {"role": "user", "content": "Sí, el lunes en la mañana"},
            {"role": "assistant", "content": "Tengo lunes a las 9:00. ¿Me confirmas tu nombre y teléfono?"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Eres el asistente de CAÑADA DEL CARMEN."},
            {"role": "user", "content": "¿Cuánto cuesta la consulta?"},
            {"role": "assistant", "content": "La consulta general cuesta Bs 150."},
            {"role": "user", "content": "Gracias"},
            {"role": "assistant", "content": "¡A ti! Que tengas un buen día."},
        ]
    },
    {"user": "ola kiero una sita", "assistant": "¡Hola! Con gusto. ¿Para qué especialidad la necesitas?"},
    {"user": "¿Aceptan seguro?", "assistant": "Sí, trabajamos con Nacional Seguros, BISA y Alianza."},
]


@pytest.fixture(scope="session")
def conversations_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "convs.json"
    path.write_text(json.dumps(CONVERSATIONS, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _corpus() -> list[str]:
    lines = []
    for row in CONVERSATIONS:
        if "messages" in row:
            lines += [m["content"] for m in row["messages"]]
        else:
            lines += [row["user"], row["assistant"]]
    return lines * 4 + ["áéíóúñÁÉÍÓÚÑ¿¡ 0123456789"]


def build_tiny_base(out: Path) -> Path:
    """A local base model folder in ``out``: 2-layer GPT-2, 64 wide, ~400-token byte-level BPE vocabulary."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = GPT2TokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=256,
    )
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


# --------------------------------------------------------------------------- tiny Llama-family bases

# Chat templates in the style of each family's instruct models. ChatML (Qwen2) ends a turn with <|im_end|>, a
# token that is not the tokenizer's EOS (as in Qwen2.5's base models): the engine must stop on it.
CHAT_TEMPLATES = {
    "qwen2": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "qwen3": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}"
        "{% endif %}{% endfor %}"
    ),
}
SPECIAL_TOKENS = {  # bos, eos, others
    "qwen2": (None, "<|endoftext|>", ["<|im_start|>", "<|im_end|>"]),
    "qwen3": (None, "<|endoftext|>", ["<|im_start|>", "<|im_end|>"]),
    "llama": ("<|begin_of_text|>", "<|end_of_text|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": ("<s>", "</s>", ["[INST]", "[/INST]"]),
}


def build_tiny_family(out: Path, kind: str) -> Path:
    """A local Llama-family base in ``out``: 2 layers, hidden 64, 4 query heads sharing 2 KV heads (head size
    16), SwiGLU 128 wide, a byte-level BPE tokenizer with the family's chat template. ``qwen2``: q/k/v biases
    and a tied head (as Qwen2.5-0.5B); ``qwen3``: per-head q/k norms and a tied head; ``llama`` and ``mistral``:
    untied heads. Norm weights and biases are
    drawn away from their init so that the graphs' handling of each is checked."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        MistralConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen3Config,
    )

    bos, eos, others = SPECIAL_TOKENS[kind]
    specials = [t for t in (bos, eos) if t] + others
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        _corpus(),
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token=eos,
        additional_special_tokens=others,
        chat_template=CHAT_TEMPLATES[kind],
        model_max_length=256,
    )
    shape = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    config = {
        "qwen2": lambda: Qwen2Config(**shape, tie_word_embeddings=True),
        "qwen3": lambda: Qwen3Config(**shape, head_dim=16, tie_word_embeddings=True),
        "llama": lambda: LlamaConfig(**shape, tie_word_embeddings=False),
        "mistral": lambda: MistralConfig(**shape, tie_word_embeddings=False, sliding_window=None),
    }[kind]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
            elif name.endswith(".bias"):  # Qwen2's q/k/v biases start at zero
                p.normal_(0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """One tiny base of each Llama-family type the decode graph builds: qwen2 (tied, biases), qwen3 (q/k norms),
    llama, mistral."""
    root = tmp_path_factory.mktemp("tiny-family")
    return {kind: build_tiny_family(root / kind, kind) for kind in CHAT_TEMPLATES}


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    from lora_med.models import load_tokenizer

    return load_tokenizer(str(tiny_base))


# --------------------------------------------------------------------------- trained runs and exports, shared


def tiny_train_config(tiny_base: Path, data_file: Path, out: Path, /, **kw):
    """Settings of a few `lora-med train` steps on the tiny base, its data as the held-out set too; a test gives
    what it is about on top (``kw``)."""
    from lora_med.config import TrainConfig

    settings = dict(
        data=str(data_file),
        eval_data=str(data_file),
        allow_eval_overlap=True,  # the tiny runs evaluate on their 8 training conversations
        base=str(tiny_base),
        output=str(out),
        max_steps=2,
        log_every=1,
        compare=False,
        r=4,
    )
    return TrainConfig(**{**settings, **kw})


def train_tiny(tiny_base: Path, data: Path, out: Path, method: str, **kw) -> Path:
    """A few steps of `lora-med train` on the tiny base. lr 1e-2: PEFT starts LoRA B at zero, so a few steps at
    the default lr leave the adapter ~0 and "merged == adapter" would pass trivially."""
    from lora_med.train.main import train

    settings = dict(
        method=method, max_steps=4, alpha=8, batch_size=4, seed=0, learning_rate=1e-2 if method != "full" else 1e-3
    )
    return train(tiny_train_config(tiny_base, data, out, **{**settings, **kw})).output


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`lora-med ARGS` in this process, as the console script runs it: (exit code, stdout + stderr)."""
    from lora_med.cli import main

    monkeypatch.setattr(sys, "argv", ["lora-med", *args])
    with pytest.raises(SystemExit) as e:
        main()
        sys.exit(0)
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


@pytest.fixture(scope="session")
def trained(tiny_base, conversations_file, tmp_path_factory) -> dict[str, Path]:
    """One of each kind of run, shared by the export and bench tests."""
    root = tmp_path_factory.mktemp("trained")
    return {
        "lora": train_tiny(tiny_base, conversations_file, root / "lora", "lora"),
        "full": train_tiny(tiny_base, conversations_file, root / "full", "full"),
        # 8-bit: bitsandbytes' 4-bit CPU kernels need layers at least 64 wide (this base is 64, barely).
        "qlora": train_tiny(tiny_base, conversations_file, root / "qlora", "qlora", quant_bits=8),
        "tokens": train_tiny(tiny_base, conversations_file, root / "tokens", "lora", train_tokens="data"),
    }


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory) -> dict[str, Path]:
    """The LoRA run merge-exported in fp32 and int8 (each with its engine/ decode graph). The tiny random model's
    logits are near-ties that int8 rounding flips (96-99% top-1 seen): its gate is looser than the defaults (99%
    top-1, 95% identical replies), which are for real models."""
    from lora_med.config import ExportConfig
    from lora_med.export.main import merge_export

    root = tmp_path_factory.mktemp("exported")
    return {
        "fp32": merge_export(ExportConfig(run_dir=str(trained["lora"]), output=str(root / "lora-cpu-fp32"))).output,
        "int8": merge_export(
            ExportConfig(
                run_dir=str(trained["lora"]),
                output=str(root / "lora-cpu-int8"),
                quantize="int8",
                n_parity=2,
                max_new_tokens=4,
                min_top1=0.9,
                min_same_replies=0.5,
            )
        ).output,
    }
