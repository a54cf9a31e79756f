"""Replies: build a prompt from a conversation so far and generate the assistant's next turn.

The prompt is formatted exactly as in training (``data.segments``), so the model sees at
inference what it learned from. The reply comes from the project's one generation engine
(``lora_med.engine``), whatever computes the logits: a model in memory (``engine_for``: the
base vs fine-tuned comparison during training), an export's decode graph or its merged model
(``engine.load_engine``: the server).
"""

from __future__ import annotations

from ..data import Message, prompt_ids, turn_end_ids
from ..engine import Engine, GenerationSettings
from ..engine.torch_backend import torch_engine

# Tiny models loop without repetition control; the seed guide's comparison used the same setting.
NO_REPEAT_NGRAM_SIZE = 3

# The seed guide's comparison: the same fixed prompts for the base and the fine-tuned model.
COMPARISON_PROMPTS = [
    "Hola, necesito una cita",
    "Quiero cancelar mi cita",
    "Me duele mucho el pecho y me cuesta respirar",
    "¿Cuál es el horario de atención?",
    "¿Cuánto cuesta una consulta con el cardiólogo?",
    "¿Ya están mis resultados de laboratorio?",
    "¿Qué pastilla puedo tomar para el dolor de cabeza?",
    "Gracias, hasta luego",
]


def engine_for(model, tokenizer, fmt: str = "dialogpt") -> Engine:
    """The engine over a Hugging Face model in memory (PyTorch, or PEFT with its adapter), ending replies where
    training ends an assistant turn in ``fmt`` (EOS; with a chat template also its end-of-turn token). The model
    is put in eval mode for each reply and its mode restored afterwards."""
    return torch_engine(model, eos_token_id=turn_end_ids(tokenizer, fmt))


def reply(
    engine: Engine,
    tokenizer,
    user_text: str,
    *,
    fmt: str,
    max_new_tokens: int = 40,
    history: list[Message] | None = None,
) -> str:
    """Greedy reply to ``user_text`` (after ``history``) from ``engine``, stopping at EOS, no repeated 3-grams."""
    ids = prompt_ids([*(history or []), Message("user", user_text)], tokenizer, fmt)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE)
    new = engine.generate([ids], settings)[0]
    return tokenizer.decode(new, skip_special_tokens=True).strip()
