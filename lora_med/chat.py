"""Replies: build a prompt from a conversation so far and generate the assistant's next turn.

The prompt is formatted exactly as in training (``data.segments``), so the model sees at
inference what it learned from.
"""

from __future__ import annotations

import torch

from .data import Conversation, Message, segments

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


def prompt_ids(history: list[Message], tokenizer, fmt: str) -> list[int]:
    """Token ids of ``history`` (ending with a user turn) followed by what opens an assistant turn."""
    if fmt == "dialogpt":
        # Every turn ends with EOS; the reply is what follows the last one.
        conv = Conversation(tuple(history), "prompt")
        return [t for ids, _ in segments(conv, tokenizer, fmt) for t in ids]
    msgs = [{"role": m.role, "content": m.content} for m in history]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_token_type_ids=False)["input_ids"]


@torch.no_grad()
def reply(model, tokenizer, user_text: str, *, fmt: str, max_new_tokens: int = 40,
          history: list[Message] | None = None) -> str:
    """Greedy reply to ``user_text`` (after ``history``), stopping at EOS."""
    ids = prompt_ids([*(history or []), Message("user", user_text)], tokenizer, fmt)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        do_sample=False, num_beams=1, no_repeat_ngram_size=3,  # tiny models loop without it
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
