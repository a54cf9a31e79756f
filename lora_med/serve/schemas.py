"""The seed guide's ``/chat/`` request and response, as pydantic models (OpenAPI at ``/docs`` shows them).

(No ``from __future__ import annotations`` here: FastAPI reads the route's body annotation at runtime, and the
request model is built per app, with that app's message limit.)
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from .intents import Action

USER_ID_PATTERN = r"^\+?[1-9][0-9]{6,14}$"  # a phone number, E.164 digits with or without '+'
SEED_EXAMPLE: dict[str, JsonValue] = {"user_id": "+59170123456", "message": "Hola, necesito una cita"}


class Params(BaseModel):
    # The seed's status, and whatever else the turn knows (lora_med.serve.turn.Plan.params).
    model_config = ConfigDict(extra="allow")
    status: str = Field(description="Where the conversation's flow stands (configs/intents.yaml lists them).")
    triage: Literal["emergency", "caution", "none"] | None = Field(
        None, description="The triage tier of the message (docs/triage.md); a caution's reply ends with a safety line."
    )
    intent: str | None = Field(None, description="The message's intent, kept whatever the tier (an action name).")


class ChatResponse(BaseModel):
    response: str = Field(description="The assistant's reply.")
    user_id: str
    conversation_id: str = Field(description="conv_<user_id>_<id>, stable within a conversation.")
    action: Action = Field(description="What the message asks for (intent layer, or the triage's emergency).")
    params: Params


def request_model(max_chars: int) -> type[BaseModel]:
    class ChatRequest(BaseModel):
        model_config = ConfigDict(json_schema_extra={"examples": [SEED_EXAMPLE]})
        user_id: str = Field(pattern=USER_ID_PATTERN, description="The patient's phone number, e.g. +59170123456.")
        message: str = Field(min_length=1, max_length=max_chars, description=f"At most {max_chars} characters.")

        @field_validator("message")
        @classmethod
        def _not_blank(cls, v: str) -> str:
            if not v.strip():
                raise ValueError("message is blank; send the patient's text")
            return v

    return ChatRequest
