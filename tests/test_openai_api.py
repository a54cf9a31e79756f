"""The OpenAI-compatible API, talked to with the official ``openai`` client against a real uvicorn, streaming and
not; the same turn as /chat/; a stream's text released only once checked; a client that leaves frees its row."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.serving import running, slow_engine

KEY = "sk-test-" + "k" * 24
SEED = "Hola, necesito una cita"


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    from lora_med.serve import ServeConfig, create_app

    d = tmp_path_factory.mktemp("v1")
    (d / "keys").write_text(KEY + "\n")
    cfg = ServeConfig(model=str(tiny_base), db=str(d / "c.db"), api_key_file=str(d / "keys"), rate_limit=0)
    app = create_app(cfg)
    with running(app) as url:
        yield {"url": url, "server": app.state.server, "model": tiny_base.name}


def client(url: str, strict: bool = False, key: str = KEY, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, _strict_response_validation=strict, **kw)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(name))


@pytest.mark.parametrize("strict", [False, True])
def test_models_and_errors_as_the_client_expects_them(served, strict):
    c = client(served["url"], strict)
    assert [m.id for m in c.models.list()] == [served["model"]]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": SEED}])
    with pytest.raises(openai.AuthenticationError) as e:
        client(served["url"], strict, key="sk-wrong-" + "x" * 20).models.list()
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.chat.completions.create(model=served["model"], messages=[{"role": "doctor", "content": "hola"}])
    assert "messages.0" in e.value.message
    with pytest.raises(openai.UnprocessableEntityError, match="last message must be the patient"):
        c.chat.completions.create(model=served["model"], messages=[{"role": "assistant", "content": "hola"}])


@pytest.mark.parametrize("strict", [False, True])
def test_completion_streamed_and_not_says_what_chat_says(served, strict):
    """Greedy replies: /chat/, /v1 whole and /v1 streamed give the same text, action and status."""
    url, model = served["url"], served["model"]
    c = client(url, strict)
    chat = httpx.post(
        url + "/chat/",
        json={"user_id": "+59178000001", "message": SEED},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ).json()
    messages = [{"role": "system", "content": "Eres el asistente."}, {"role": "user", "content": SEED}]
    whole = c.chat.completions.create(model=model, messages=messages, max_tokens=40, user="+59178000002")
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == chat["response"]
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.prompt_tokens > 0
    extra = whole.model_extra["lora_med"] if not strict else whole.to_dict()["lora_med"]
    assert extra["action"] == chat["action"] == "schedule_appointment" and extra["params"] == chat["params"]
    chunks = list(
        c.chat.completions.create(model=model, messages=messages, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == chat["response"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


def test_a_reply_the_check_replaces_is_streamed_as_the_replacement(served):
    """The tiny test model writes no Spanish, so the reply check replaces whatever it says for a question
    that goes to the model: streamed, the client gets exactly the replacement (nothing of the model's), in one
    piece after the check, counted as replaced."""
    url = served["url"]
    messages = [{"role": "user", "content": "Quiero cancelar mi cita"}]
    whole = client(url).chat.completions.create(model=served["model"], messages=messages)
    assert whole.model_extra["lora_med"]["source"] != "model"  # the check replaced the model's words
    before = metric(url, 'lora_med_stream_checks_total{outcome="replaced"}')
    stream = client(url).chat.completions.create(model=served["model"], messages=messages, stream=True)
    parts = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert [p for p in parts if p] == [whole.choices[0].message.content]
    assert metric(url, 'lora_med_stream_checks_total{outcome="replaced"}') == before + 1


def test_an_emergency_is_answered_by_the_guard_streamed_or_not(served):
    c = client(served["url"])
    messages = [{"role": "user", "content": "mi papá se desmayó y no despierta"}]
    whole = c.chat.completions.create(model=served["model"], messages=messages)
    assert "118" in whole.choices[0].message.content and whole.model_extra["lora_med"]["action"] == "emergency"
    chunks = list(c.chat.completions.create(model=served["model"], messages=messages, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content


def test_history_from_messages_keeps_the_flow(served):
    """Stateless like OpenAI: the flow's status comes from the messages sent."""
    c = client(served["url"])
    messages = [
        {"role": "user", "content": "Quiero cancelar mi cita"},
        {"role": "assistant", "content": "Claro. ¿Me das tu nombre, CI y fecha de nacimiento?"},
        {"role": "user", "content": "Ana Rojas, CI 6543210 SC, 3 de mayo de 1985"},
    ]
    r = c.chat.completions.create(model=served["model"], messages=messages)
    assert r.model_extra["lora_med"]["action"] == "cancel_appointment"
    assert r.model_extra["lora_med"]["params"]["status"] == "collecting_info"


def test_listener_gets_tokens_step_by_step_as_the_engine_makes_them(tiny_base):
    """Streaming is fed per decode step: the listener hears each token before the reply is finished."""
    from lora_med.serve.batcher import Batcher

    engine = slow_engine(tiny_base, delay_s=0.01)
    from lora_med.engine import GenerationSettings

    async def run():
        b = Batcher(
            lambda rows: engine.stream(GenerationSettings(max_new_tokens=12), rows=rows),
            max_batch=2,
            wait_s=0,
            bound_s=30,
        )
        b.start()
        heard: list[tuple[float, list[int]]] = []
        fut = b.reserve().submit([1, 2, 3], listener=lambda toks: heard.append((time.perf_counter(), toks)))
        got = await fut
        done = time.perf_counter()
        await b.close()
        return heard, got, done

    heard, got, done = asyncio.run(run())
    assert len(got.ids) == 12 and len(heard) >= 10
    assert [t for _, toks in heard for t in toks] == got.ids[: sum(len(t) for _, t in heard)]
    assert heard[0][0] < done - 0.05  # the first token came well before the reply ended
    engine.close()


def test_a_client_leaving_mid_stream_or_before_the_reply_frees_its_row(tiny_base, tmp_path):
    from lora_med.serve import ServeConfig, create_app

    cfg = ServeConfig(
        model=str(tiny_base),
        db=str(tmp_path / "c.db"),
        max_new_tokens=200,
        request_timeout_s=60,
        rate_limit=0,
        stream_release="reply",
    )
    engine = slow_engine(tiny_base, delay_s=0.02)  # 200 tokens: ~4 s a reply
    app = create_app(cfg, engine=engine)
    backend = engine._backend
    with running(app) as url:
        rows = lambda: httpx.get(url + "/health", timeout=10).json()["engine_rows"]
        c = client(url, key="unused-key-" + "x" * 10)
        stream = c.chat.completions.create(
            model=tiny_base.name, messages=[{"role": "user", "content": SEED}], stream=True
        )
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        deadline = time.monotonic() + 5
        while rows() != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rows() == 1  # generating
        time.sleep(0.3)
        steps = backend.steps
        stream.close()  # the client leaves mid-reply
        deadline = time.monotonic() + 5
        while rows() and time.monotonic() < deadline:
            time.sleep(0.02)
        freed_after = backend.steps - steps
        assert rows() == 0 and freed_after < 100  # dropped long before its 200 tokens
        # not streamed: a client that gives up before the reply frees the row too
        with pytest.raises(openai.APITimeoutError):
            client(url, key="unused-key-" + "x" * 10, timeout=0.5).chat.completions.create(
                model=tiny_base.name, messages=[{"role": "user", "content": SEED}]
            )
        deadline = time.monotonic() + 5
        while rows() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rows() == 0
        assert metric_free(url, "lora_med_client_gone_total") == 2
        assert httpx.get(url + "/health", timeout=10).json()["in_flight"] == 0


def metric_free(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(name))


def test_gate_releases_checked_sentences_and_never_text_a_check_changes():
    """release.Gate with a check standing in for finish(): it replaces replies naming Saturday (a fact check)
    and adds a safety line to every reply it keeps (a caution tier)."""
    from lora_med.serve.release import Gate, sentence_end

    line = " Si tienes dolor de pecho, llama al 118."

    def check(text: str) -> str:
        return "La Dra. Elena atiende de lunes a viernes." if "sábado" in text else text + line

    assert sentence_end("Hola. La Dra. Elena atiende el lunes. ¿Te") == len("Hola. La Dra. Elena atiende el lunes.")
    assert sentence_end("Hola. bueno") == 0 and sentence_end("Hola") == 0  # not yet a next sentence

    kept = Gate(check)
    assert kept.feed("¡Hola! Con") == ("¡Hola!", False)
    assert kept.feed("¡Hola! Con gusto. ¿Para") == (" Con gusto.", False)
    assert kept.end("¡Hola! Con gusto. ¿Para cuándo?", check("¡Hola! Con gusto. ¿Para cuándo?")) == (
        " ¿Para cuándo?" + line,
        "kept",
    )

    replaced = Gate(check)
    assert replaced.feed("El sábado. A") == ("", True)  # nothing sent; generation stops
    assert replaced.end("El sábado.", check("El sábado.")) == ("La Dra. Elena atiende de lunes a viernes.", "replaced")

    cut = Gate(check)
    assert cut.feed("Hola. Ven el sábado. Te") == ("", True)  # "Hola. Ven el sábado." fails as a whole
    cut = Gate(check)
    assert cut.feed("Hola. Ven") == ("Hola.", False)
    assert cut.feed("Hola. Ven el sábado. Te") == ("", True)
    assert cut.end("Hola. Ven el sábado.", check("Hola. Ven el sábado.")) == (line, "cut")  # ends with what passed

    whole = Gate(check, mode="reply")
    assert whole.feed("Hola. Ven. Te") == ("", False)
    assert whole.end("Hola.", check("Hola.")) == ("Hola." + line, "kept")

    stop = Gate(check, stop=["FIN"])
    assert stop.feed("Hola. Ya. F") == ("Hola.", False)  # " Ya." waits: "F..." could still be the stop string
