"""lora-med serve in production: the API key, the probes, the body limit, malformed bodies, private database
files, an open bind refused, and admission by expected wait. Real uvicorn, real SQLite, the real engine on
the tiny GPT-2 (a slow device where waits must happen on cue: tests/serving.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lora_med.errors import ConfigError
from tests.serving import running, slow_engine

REPO = Path(__file__).resolve().parent.parent
KEYS = ["k-old-" + "a" * 26, "k-new-" + "b" * 26]
BODY = {"user_id": "+59170123456", "message": "Hola, necesito una cita"}


@pytest.fixture(scope="module")
def keyed(tiny_base, tmp_path_factory):
    """A server with two keys in a file (rotation) and one more in LORA_MED_API_KEY, logging to a file."""
    from lora_med.serve import ServeConfig, create_app
    from lora_med.serve.logs import logging_config

    d = tmp_path_factory.mktemp("keyed")
    keyfile = d / "keys.txt"
    keyfile.write_text(f"# clinic keys\n{KEYS[0]}\n\n{KEYS[1]}\n")
    log = d / "serve.log"
    logging.config.dictConfig(logging_config(str(log)))
    os.environ["LORA_MED_API_KEY"] = "k-env-" + "c" * 26
    try:
        cfg = ServeConfig(model=str(tiny_base), db=str(d / "chat.db"), api_key_file=str(keyfile), rate_limit=0)
        app = create_app(cfg)
    finally:
        del os.environ["LORA_MED_API_KEY"]
    with running(app) as url:
        yield {"url": url, "dir": d, "log": log, "server": app.state.server}
    logging.getLogger("lora_med.serve").handlers.clear()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_but_the_probes_needs_a_key_and_any_configured_key_opens_it(keyed):
    url = keyed["url"]
    for path in ("/health", "/metrics", "/docs", "/openapi.json", "/v1/models"):
        assert httpx.get(url + path, timeout=10).status_code == 401, path
        assert httpx.get(url + path, headers=auth("k-wrong-" + "x" * 24), timeout=10).status_code == 401
        assert httpx.get(url + path, headers=auth(KEYS[1]), timeout=10).status_code == 200, path
    r = httpx.post(url + "/chat/", json=BODY, timeout=30)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer" and "Authorization" in r.json()["detail"]
    r = httpx.post(url + "/v1/chat/completions", json={}, headers=auth("nope" * 5), timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"  # OpenAI's shape on /v1
    for key in (*KEYS, "k-env-" + "c" * 26):
        r = httpx.post(url + "/chat/", json=BODY, headers=auth(key), timeout=30)
        assert r.status_code == 200 and r.json()["action"] == "schedule_appointment"
    for probe in ("/health/live", "/health/ready"):
        assert httpx.get(url + probe, timeout=10).status_code == 200  # a load balancer probes without a key
    assert httpx.get(url + "/health/ready", timeout=10).json()["status"] == "ready"
    h = httpx.get(url + "/health", headers=auth(KEYS[0]), timeout=10).json()
    assert h["api_keys"] == 3 and h["ready"]["status"] == "ready" and h["store"] == "sqlite"
    metrics = httpx.get(url + "/metrics", headers=auth(KEYS[0]), timeout=10).text
    assert 'lora_med_refused_total{reason="unauthorized"}' in metrics
    text = keyed["log"].read_text()
    assert '"event": "unauthorized"' in text and '"key": "wrong"' in text
    assert not any(k in text for k in (*KEYS, "c" * 26, "x" * 24))  # never a key in the log


def test_body_over_the_limit_is_413_before_parsing_and_counted(keyed):
    url, h = keyed["url"], auth(KEYS[0])
    big = json.dumps({"user_id": "+59170123456", "message": "x" * 70_000})
    r = httpx.post(url + "/chat/", content=big, headers={**h, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"] == "body: larger than 65536 bytes"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b" " * 8192

    r = httpx.post(url + "/chat/", content=chunks(), headers={**h, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413
    # announced as 50 MB, two bytes sent: answered from the header at once, nothing read
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = f"POST /chat/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\nContent-Length: {50 << 20}\r\n\r\n{{}}"
        sock.sendall(head.encode())
        assert sock.recv(200).startswith(b"HTTP/1.1 413")
    text = httpx.get(url + "/metrics", headers=h, timeout=10).text
    assert 'lora_med_refused_total{reason="too_large"} 3' in text
    assert httpx.post(url + "/chat/", json=BODY, headers=h, timeout=30).status_code == 200  # the server carries on


@pytest.mark.parametrize("path", ["/chat/", "/v1/chat/completions"])
def test_deeply_nested_json_is_422_logged_and_counted(keyed, path):
    url, h = keyed["url"], {**auth(KEYS[0]), "Content-Type": "application/json"}
    before = httpx.get(url + "/metrics", headers=h, timeout=10).text.count("invalid_body")
    for body in ("[" * 10_000, '{"user_id": ' + "[" * 5000 + "]" * 5000 + "}", b'{"message": "\xff"}'):
        r = httpx.post(url + path, content=body, headers=h, timeout=30)
        assert r.status_code == 422, r.text
        message = r.json()["error"] if path == "/chat/" else r.json()["error"]["message"]
        assert "body: not valid JSON" in message
    metrics = httpx.get(url + "/metrics", headers=h, timeout=10).text
    line = next(x for x in metrics.splitlines() if x.startswith('lora_med_refused_total{reason="invalid_body"}'))
    assert float(line.split()[-1]) >= 3 and metrics.count("invalid_body") >= before
    status = (
        'lora_med_requests_total{status="422"}' if path == "/chat/" else 'lora_med_openai_requests_total{status="422"}'
    )
    assert status in metrics
    events = [json.loads(x) for x in keyed["log"].read_text().splitlines()]
    assert any(e.get("status") == 422 and e.get("error") == "invalid_body" for e in events)


def test_database_and_its_wal_are_private(keyed):
    d = keyed["dir"]
    files = sorted(p.name for p in d.iterdir() if p.name.startswith("chat.db"))
    assert files == ["chat.db", "chat.db-shm", "chat.db-wal"]
    for name in files:
        assert (d / name).stat().st_mode & 0o777 == 0o600, name


def test_keys_and_open_binds_checked_before_anything_loads(tiny_base, tmp_path, monkeypatch):
    from lora_med.serve import ServeConfig
    from lora_med.serve.auth import check_exposure, load_keys

    monkeypatch.delenv("LORA_MED_API_KEY", raising=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "lora_med", "serve", str(tiny_base), "--db", str(tmp_path / "x.db"), "--port", "0"]
    r = subprocess.run([*argv, "--host", "0.0.0.0"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: --host 0.0.0.0: listening beyond this machine without an API key" in r.stderr
    assert "--api-key-file" in r.stderr and "--insecure-no-auth" in r.stderr
    assert not (tmp_path / "x.db").exists()
    check_exposure(ServeConfig(host="0.0.0.0", insecure_no_auth=True), [])  # the explicit way out
    check_exposure(ServeConfig(host="::1"), [])  # loopback needs no key
    empty = tmp_path / "keys.txt"
    empty.write_text("# no key yet\n\n")
    with pytest.raises(ConfigError, match="holds no key"):
        load_keys(ServeConfig(api_key_file=str(empty)))
    empty.write_text("short\n")
    with pytest.raises(ConfigError, match="line 1: a key must be at least 16"):
        load_keys(ServeConfig(api_key_file=str(empty)))
    with pytest.raises(ConfigError, match="file not found"):
        load_keys(ServeConfig(api_key_file=str(tmp_path / "missing.txt")))


def test_admission_by_expected_wait_503_only_past_the_timeout_and_never_for_emergencies(tiny_base, tmp_path):
    """A burst on a slow two-row engine (20 ms a step, 20-token replies: ~0.4 s each) with a 1.5 s timeout:
    requests whose expected wait passes 1.5 s are refused at once (503, Retry-After, Spanish and English),
    every other one is answered, and no emergency is refused."""
    from lora_med.serve import ServeConfig, create_app

    cfg = ServeConfig(
        model=str(tiny_base),
        db=str(tmp_path / "b.db"),
        max_batch=2,
        max_new_tokens=20,
        request_timeout_s=1.5,
        rate_limit=0,
    )
    app = create_app(cfg, engine=slow_engine(tiny_base, delay_s=0.02))
    with running(app) as url:
        assert httpx.post(url + "/chat/", json=BODY, timeout=30).status_code == 200  # its time per reply, learned

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                post = lambda user, text: client.post("/chat/", json={"user_id": user, "message": text})
                ordinary = [post(f"+5917401{i:04d}", "quiero una cita") for i in range(24)]
                urgent = [post(f"+5917402{i:04d}", "no puede respirar") for i in range(6)]
                return await asyncio.gather(*ordinary, *urgent)

        responses = asyncio.run(burst())
        health = httpx.get(url + "/health", timeout=10).json()
        metrics = httpx.get(url + "/metrics", timeout=10).text
    ordinary, urgent = responses[:24], responses[24:]
    assert all(r.status_code == 200 and r.json()["action"] == "emergency" for r in urgent)
    refused = [r for r in ordinary if r.status_code == 503]
    answered = [r for r in ordinary if r.status_code == 200]
    assert refused and answered and len(refused) + len(answered) == 24, [r.status_code for r in ordinary]
    for r in refused:
        body = r.json()
        assert body["error"] == "overloaded" and body["expected_wait_s"] > body["request_timeout_s"] == 1.5
        assert int(r.headers["Retry-After"]) == body["retry_after_s"] >= 1
        assert "118" in body["message"]["es"] and "ocupado" in body["message"]["es"] and "busy" in body["message"]["en"]
    assert f'lora_med_refused_total{{reason="overloaded"}} {len(refused)}' in metrics
    assert health["engine_s_per_reply"] > 0.1 and health["in_flight"] == 0
    users = {r.json()["user_id"] for r in answered}
    import sqlite3

    con = sqlite3.connect(tmp_path / "b.db")
    stored = {
        u for (u,) in con.execute("SELECT c.user_id FROM turns t JOIN conversations c ON c.id = t.conversation_id")
    }
    con.close()
    assert not stored & {f"+5917401{i:04d}" for i in range(24)} - users  # a refused message is never stored
