"""The benchmark scripts' own inputs: the training-memory benchmark must feed exactly 128-token examples."""

from __future__ import annotations

import importlib.util
import json

from lora_med import data, models

from .conftest import REPO


def _load(path: str):
    spec = importlib.util.spec_from_file_location(path.replace("/", "_"), REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_memory_examples_are_exactly_the_sequence_length(tmp_path):
    run = _load("benchmarks/train_memory/run.py")
    base = REPO / models.DEFAULT_BASE
    train_file, eval_file = run.build_data(tmp_path, base)
    rows = json.loads(train_file.read_text(encoding="utf-8"))
    assert len(rows) >= 16, "enough rows for a batch of 16"
    examples, cut = data.encode_all(data.load_conversations(train_file).conversations,
                                    models.load_tokenizer(str(base)), max_length=run.SEQ, fmt="dialogpt")
    assert {len(e.input_ids) for e in examples} == {run.SEQ} and cut == len(examples)
    assert all(any(label != -100 for label in e.labels) for e in examples), "every example has reply tokens"
    assert json.loads(eval_file.read_text(encoding="utf-8")) == rows[:2]
