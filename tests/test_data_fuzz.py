"""Whatever bytes a conversation file holds, the loader raises only DatasetError (or loads it)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_med.data import load_conversations
from lora_med.errors import DatasetError

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.sampled_from(["user", "assistant", "system", "role", "content", "messages", "Ã©", "\ud800"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["user", "assistant", "messages", "role", "content", "x"]), children, max_size=4
        )
    ),
    max_leaves=20,
)


def _load(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"f{suffix}"
        p.write_bytes(data)
        try:
            ds = load_conversations(p)
        except DatasetError:
            return
        assert ds.conversations and all(c.messages[-1].role == "assistant" for c in ds.conversations)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.sampled_from([".json", ".jsonl", ".txt"]))
def test_arbitrary_bytes(data, suffix):
    _load(data, suffix)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from([".json", ".jsonl"]))
def test_arbitrary_json_structures(value, suffix):
    _load(json.dumps(value).encode("utf-8"), suffix)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.fixed_dictionaries({"user": json_values, "assistant": json_values}), max_size=3),
    st.sampled_from([".json", ".jsonl"]),
)
def test_arbitrary_rows(rows, suffix):
    if suffix == ".jsonl":
        data = "\n".join(json.dumps(r) for r in rows)
    else:
        data = json.dumps(rows)
    _load(data.encode("utf-8"), suffix)
