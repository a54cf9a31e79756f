"""The data layer: both row forms, JSON and JSONL, label masking, left truncation, split, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_med.data import Conversation, Message, encode, load_conversations, resolve_format, segments, split
from lora_med.errors import ConfigError, DatasetError

from .conftest import CONVERSATIONS, REPO


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


def conv(*pairs: tuple[str, str]) -> Conversation:
    return Conversation(tuple(Message(r, c) for r, c in pairs), "test")


# --------------------------------------------------------------------------- formats


def test_json_array_with_both_forms(conversations_file):
    ds = load_conversations(conversations_file)
    assert len(ds.conversations) == len(CONVERSATIONS)
    assert ds.conversations[0].messages == (
        Message("user", "Hola, necesito una cita"),
        Message("assistant", CONVERSATIONS[0]["assistant"]),
    )
    assert ds.conversations[4].turns == 4
    assert ds.conversations[5].messages[0].role == "system" and ds.conversations[5].turns == 4
    assert len(ds.sha256) == 64 and ds.duplicates == []


def test_jsonl_and_bom(tmp_path):
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in CONVERSATIONS) + "\n\n"
    p = write(tmp_path, "c.jsonl", b"\xef\xbb\xbf" + lines.encode("utf-8"))
    ds = load_conversations(p)
    assert [c.messages for c in ds.conversations] == [
        c.messages
        for c in load_conversations(
            write(tmp_path, "c.json", json.dumps(CONVERSATIONS, ensure_ascii=False))
        ).conversations
    ]
    assert ds.conversations[2].where.endswith("c.jsonl:3")


def test_duplicates_are_reported(tmp_path):
    rows = [
        CONVERSATIONS[0],
        CONVERSATIONS[1],
        {
            "user": " hola,  NECESITA una cita".replace("NECESITA", "necesito"),
            "assistant": CONVERSATIONS[0]["assistant"],
        },
    ]
    ds = load_conversations(write(tmp_path, "d.json", json.dumps(rows, ensure_ascii=False)))
    assert len(ds.duplicates) == 1 and "row 3" in ds.duplicates[0] and "row 1" in ds.duplicates[0]


# --------------------------------------------------------------------------- labels


def labelled_text(tok, ex) -> str:
    return tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != -100])


def test_dialogpt_labels_cover_assistant_tokens_and_their_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    c = conv(
        ("system", "Sistema."),
        ("user", "Hola"),
        ("assistant", "¡Hola! ¿Cita?"),
        ("user", "Sí"),
        ("assistant", "Listo."),
    )
    ex = encode(c, tok, max_length=256, fmt="dialogpt")
    eos = tok.eos_token_id
    pieces = [tok.encode(t, add_special_tokens=False) for t in ("Sistema.", "Hola", "¡Hola! ¿Cita?", "Sí", "Listo.")]
    expected_ids, expected_labels = [], []
    for i, ids in enumerate(pieces):
        expected_ids += ids + [eos]
        expected_labels += ids + [eos] if i in (2, 4) else [-100] * (len(ids) + 1)
    assert ex.input_ids == expected_ids
    assert ex.labels == expected_labels
    # pad == eos: the EOS tokens ending assistant turns are labelled, the others are not
    eos_labels = [l for t, l in zip(ex.input_ids, ex.labels) if t == eos]
    assert eos_labels == [-100, -100, eos, -100, eos]
    assert labelled_text(tok, ex) == "¡Hola! ¿Cita?<|endoftext|>Listo.<|endoftext|>"
    assert ex.turns_cut == 0 and ex.tokens_cut == 0


def test_train_on_all_tokens(tiny_tokenizer):
    ex = encode(
        conv(("user", "Hola"), ("assistant", "Buenas")), tiny_tokenizer, max_length=64, fmt="dialogpt", train_on="all"
    )
    assert ex.labels == ex.input_ids


def test_no_token_type_ids_reach_the_model(tiny_tokenizer):
    # GPT-2 tokenizers can return token_type_ids (DialoGPT's does); the encoder keeps input ids only
    ex = encode(conv(("user", "Hola"), ("assistant", "Buenas")), tiny_tokenizer, max_length=64)
    assert set(vars(ex)) == {"input_ids", "labels", "turns_cut", "tokens_cut"}


def test_chat_template_labels_assistant_segments(tiny_base):
    from lora_med.models import load_tokenizer

    tok = load_tokenizer(str(tiny_base))
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert resolve_format("auto", tok) == "chat-template"
    c = conv(("user", "Hola"), ("assistant", "Buenas"), ("user", "Cita"), ("assistant", "Claro"))
    ex = encode(c, tok, max_length=256, fmt="chat-template")
    assert tok.decode(ex.input_ids) == (
        "<user>Hola<|endoftext|><assistant>Buenas<|endoftext|><user>Cita<|endoftext|><assistant>Claro<|endoftext|>"
    )
    assert labelled_text(tok, ex) == "Buenas<|endoftext|>Claro<|endoftext|>"


def test_format_resolution(tiny_tokenizer):
    assert resolve_format("auto", tiny_tokenizer) == "dialogpt"
    with pytest.raises(ConfigError, match="no chat template"):
        resolve_format("chat-template", tiny_tokenizer)
    with pytest.raises(ConfigError, match="unknown format"):
        resolve_format("alpaca", tiny_tokenizer)


# --------------------------------------------------------------------------- truncation


def test_left_truncation_drops_oldest_turns_and_keeps_last_reply_whole(tiny_tokenizer):
    tok = tiny_tokenizer
    turns = [
        ("user", "Buenos días, quiero una cita con pediatría"),
        ("assistant", "¿Prefieres a la Dra. Carmen Vaca?"),
        ("user", "Sí, el lunes en la mañana"),
        ("assistant", "Tengo lunes a las 9:00. ¿Me confirmas tu nombre?"),
        ("user", "Gracias"),
        ("assistant", "¡A ti! Que tengas un buen día."),
    ]
    c = conv(*turns)
    lengths = [len(ids) for ids, _ in segments(c, tok, "dialogpt")]
    budget = sum(lengths[-3:])  # room for the last three turns exactly
    ex = encode(c, tok, max_length=budget)
    assert len(ex.input_ids) == budget
    assert ex.turns_cut == 3 and ex.tokens_cut == sum(lengths[:3])
    assert (
        labelled_text(tok, ex) == "Tengo lunes a las 9:00. ¿Me confirmas tu nombre?<|endoftext|>"
        "¡A ti! Que tengas un buen día.<|endoftext|>"
    )
    # one token less: one more whole turn goes, down to the last exchange
    ex2 = encode(c, tok, max_length=budget - 1)
    assert ex2.turns_cut == 4 and len(ex2.input_ids) == sum(lengths[-2:])
    # the last exchange itself too long: the user turn is cut from its left, the reply stays whole
    ex3 = encode(c, tok, max_length=lengths[-1] + 2)
    assert ex3.turns_cut == 4 and len(ex3.input_ids) == lengths[-1] + 2
    assert ex3.labels[:2] == [-100, -100] and -100 not in ex3.labels[2:]
    assert tok.decode(ex3.input_ids[2:]) == "¡A ti! Que tengas un buen día.<|endoftext|>"


def test_last_reply_longer_than_max_length_is_an_error(tiny_tokenizer):
    c = conv(("user", "Hola"), ("assistant", "Una respuesta bastante larga para este límite tan corto"))
    with pytest.raises(DatasetError, match="last assistant turn is .* tokens, more than max_length 5"):
        encode(c, tiny_tokenizer, max_length=5)


# --------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_complete():
    convs = [conv(("user", f"u{i}"), ("assistant", f"a{i}")) for i in range(50)]
    tr, ev, idx = split(convs, 0.1, seed=42)
    tr2, ev2, idx2 = split(convs, 0.1, seed=42)
    assert idx == idx2 and ev == ev2 and tr == tr2
    assert len(ev) == 5 and len(tr) == 45
    assert set(map(id, tr)).isdisjoint(map(id, ev)) and len(set(map(id, tr + ev))) == 50
    assert split(convs, 0.1, seed=7)[2] != idx
    with pytest.raises(DatasetError, match="cannot split 1"):
        split(convs[:1], 0.1, seed=0)


# --------------------------------------------------------------------------- bad input

BAD = [
    ("trunc.json", '[{"user": "hola", "assistant": "buen', r"trunc\.json:1:\d+: invalid JSON.*truncated"),
    ("bad.jsonl", '{"user": "a", "assistant": "b"}\n{"user": "a",, }\n', r"bad\.jsonl:2:\d+: invalid JSON"),
    ("obj.json", '{"user": "a", "assistant": "b"}', r"top level must be a JSON array.*got an object.*\.jsonl"),
    ("str.json", '"hola"', "top level must be a JSON array of conversations, got a string"),
    ("row.json", '[["hola"]]', r"row 1 \(index 0\): expected an object .* got an array"),
    ("miss.json", '[{"user": "hola"}]', r"row 1 \(index 0\): field 'assistant' is missing"),
    ("null.json", '[{"user": null, "assistant": "x"}]', "field 'user' is null"),
    ("empty_field.json", '[{"user": "", "assistant": "x"}]', "field 'user' is empty"),
    ("ws.json", '[{"user": "hola", "assistant": " \\n\\t"}]', "field 'assistant' is whitespace-only"),
    ("num.json", '[{"user": 5, "assistant": "x"}]', "field 'user' must be a string, got a number"),
    ("both.json", '[{"user": "a", "assistant": "b", "messages": []}]', "both 'messages' and 'user'"),
    ("neither.json", '[{"pregunta": "a"}]', "needs 'user' and 'assistant' fields, or a 'messages' list"),
    ("role.json", '[{"messages": [{"role": "doctor", "content": "a"}]}]', r"messages\[0\]: unknown role 'doctor'"),
    ("norole.json", '[{"messages": [{"content": "a"}]}]', r"messages\[0\]: field 'role' is missing"),
    (
        "alt.json",
        '[{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
        '{"role": "assistant", "content": "c"}]}]',
        r"messages\[1\]: roles must alternate",
    ),
    ("start.json", '[{"messages": [{"role": "assistant", "content": "a"}]}]', r"messages\[0\]: roles must alternate"),
    (
        "end.json",
        '[{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
        '{"role": "user", "content": "c"}]}]',
        "must end with an assistant turn",
    ),
    (
        "sys.json",
        '[{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}]',
        "system message may only come first",
    ),
    ("msgs.json", '[{"messages": "hola"}]', "field 'messages' must be a list, got a string"),
    ("nomsgs.json", '[{"messages": []}]', "field 'messages' is empty"),
    ("empty.json", "[]", "the dataset is empty"),
    ("blank.jsonl", "\n  \n", "the dataset is empty"),
    ("moji.json", '[{"user": "Necesito una cita con pediatrÃ­a", "assistant": "x"}]', "looks like mojibake"),
    ("moji2.json", '[{"user": "hola", "assistant": "CAÃ‘ADA DEL CARMEN"}]', "field 'assistant' looks like mojibake"),
    ("surrogate.json", '[{"user": "\\ud800", "assistant": "x"}]', "lone surrogate"),
    ("deep.json", "[" * 100000, "invalid JSON"),
]


@pytest.mark.parametrize("name,content,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_named_dataset_error(tmp_path, name, content, pattern):
    path = write(tmp_path, name, content)
    with pytest.raises(DatasetError, match=pattern) as err:
        load_conversations(path)
    assert str(path) in str(err.value)


def test_invalid_utf8_names_line_and_column(tmp_path):
    p = write(tmp_path, "latin1.json", '[\n{"user": "pediatría", "assistant": "x"}]'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1\.json:2:\d+: invalid UTF-8 \(byte 0xed"):
        load_conversations(p)


def test_all_row_problems_are_reported_together(tmp_path):
    p = write(tmp_path, "many.json", '[{"user": "", "assistant": "x"}, {"user": "a"}, {"user": "a", "assistant": "b"}]')
    with pytest.raises(DatasetError) as err:
        load_conversations(p)
    assert err.value.problems == [
        f"{p} row 1 (index 0): field 'user' is empty",
        f"{p} row 2 (index 1): field 'assistant' is missing",
    ]


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        load_conversations(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="is a directory"):
        load_conversations(tmp_path)


# --------------------------------------------------------------------------- CLI


def run_cli_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_med", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.slow
def test_cli_data_check_bad_file_exits_nonzero_without_traceback(tmp_path, tiny_base):
    p = write(tmp_path, "bad.json", '[{"user": "hola", "assistant": null}]')
    r = run_cli_process("data", "check", str(p), "--tokenizer", str(tiny_base))
    assert r.returncode == 2
    assert "field 'assistant' is null" in r.stderr and "Traceback" not in r.stderr


def in_process(monkeypatch, capsys, *args: str) -> subprocess.CompletedProcess:
    """`lora-med ARGS` in this process (the subprocess test above covers the real entry point)."""
    from lora_med.cli import main

    monkeypatch.setattr(sys, "argv", ["lora-med", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_cli_data_check_prints_stats(conversations_file, tiny_base, monkeypatch, capsys):
    run_cli = lambda *a: in_process(monkeypatch, capsys, *a)
    r = run_cli("data", "check", str(conversations_file), "--tokenizer", str(tiny_base), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["problems"] == [] and report["tokens"]["max"] < 256
    # Replies longer than --max-length would make training fail: listed, and the exit code says so.
    r = run_cli("data", "check", str(conversations_file), "--tokenizer", str(tiny_base), "--json", "--max-length", "16")
    assert r.returncode == 2 and "would make training fail" in r.stderr and "Traceback" not in r.stderr
    report = json.loads(r.stdout)
    assert report["problems"] and all("more than max_length 16" in p for p in report["problems"])
    assert report["conversations"] == 8 and report["multi_turn"] == 2 and report["with_system"] == 1
    assert report["tokens"]["format"] == "dialogpt" and report["tokens"]["max"] > 16
    assert report["cut_by_max_length"] >= 1


@pytest.mark.parametrize("name,minimum", [("medical_conversations.json", 200), ("medical_conversations_eval.json", 40)])
def test_shipped_datasets_are_valid(name, minimum):
    ds = load_conversations(REPO / "data" / name)
    assert len(ds.conversations) >= minimum
    assert sum(c.turns >= 3 for c in ds.conversations) >= len(ds.conversations) / 3
    assert ds.duplicates == []


def test_eval_set_does_not_overlap_training_set():
    train_path, eval_path = REPO / "data/medical_conversations.json", REPO / "data/medical_conversations_eval.json"
    train = {c.key() for c in load_conversations(train_path).conversations}
    train_first = {c.key()[0] for c in load_conversations(train_path).conversations}
    for c in load_conversations(eval_path).conversations:
        assert c.key() not in train and c.key()[0] not in train_first, c.where
