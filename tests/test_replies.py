"""One entry point for replies: every reply lora-med serves or compares goes through ``Engine.generate``.

transformers' ``generate()`` is left in exactly two places, on purpose: the parity gate's PyTorch reference
and the peers bench measures (PyTorch and ORTModelForCausalLM). Shown twice: statically (every
``.generate(...)`` call in the package, by its arguments) and by running the comparison replies of training,
the server's replier, the parity gate and an engine-only bench with both entry points instrumented.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest
import torch

from lora_med import data
from lora_med.engine import Engine
from lora_med.train import compare

PACKAGE = Path(__file__).resolve().parent.parent / "lora_med"
# Where transformers' generate() may be called: (module, function).
ALLOWED = {("export.parity", "_reference_greedy"), ("bench.latency", "_generate")}
HF_KWARGS = {"input_ids", "max_new_tokens", "attention_mask", "generation_config", "do_sample"}


def _generate_calls() -> list[tuple[str, str, ast.Call]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "generate":
                    out.append((module, fn.name, node))
    return out


def test_transformers_generate_is_called_only_by_the_parity_reference_and_the_bench_peers():
    calls = _generate_calls()
    hf = {(m, f) for m, f, c in calls if {k.arg for k in c.keywords} & HF_KWARGS}
    assert hf == ALLOWED
    # Every other .generate(...) is the engine's: (prompts) or (prompts, settings), nothing else.
    for m, f, c in calls:
        if (m, f) not in ALLOWED:
            assert not c.keywords and 1 <= len(c.args) <= 2, f"lora_med/{m}.py:{c.lineno} ({f})"
    assert {m for m, _, _ in calls} >= {"train.compare", "export.parity", "bench.latency", "serve.replier"}
    # Nor a transformers pipeline anywhere (model cards show one to users, in a string, which is fine).
    names = {
        n.func.id if isinstance(n.func, ast.Name) else n.func.attr
        for p in PACKAGE.rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))
    }
    assert not names & {"pipeline", "TextGenerationPipeline"}


@pytest.fixture
def counted(monkeypatch):
    """Both entry points instrumented: Engine.generate (counted by engine name) and transformers' generate()
    (counted by the class it ran on)."""
    from transformers.generation.utils import GenerationMixin

    seen = {"engine": Counter(), "hf": Counter()}
    engine_generate, hf_generate = Engine.generate, GenerationMixin.generate

    def on_engine(self, *a, **kw):
        seen["engine"][self.name.split(":")[0]] += 1
        return engine_generate(self, *a, **kw)

    def on_hf(self, *a, **kw):
        seen["hf"][type(self).__name__] += 1
        return hf_generate(self, *a, **kw)

    monkeypatch.setattr(Engine, "generate", on_engine)
    monkeypatch.setattr(GenerationMixin, "generate", on_hf)
    return seen


def test_training_comparison_replies_go_through_the_engine(tiny_base, tiny_tokenizer, counted):
    from peft import LoraConfig, get_peft_model

    from lora_med.config import TrainConfig
    from lora_med.models import load_model
    from lora_med.train.main import _compare

    cfg = TrainConfig(compare_max_new_tokens=12)
    model = get_peft_model(load_model(str(tiny_base)), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    rows = _compare(cfg, model, None, tiny_tokenizer, "dialogpt", True)
    full = _compare(cfg, load_model(str(tiny_base)), load_model(str(tiny_base)), tiny_tokenizer, "dialogpt", False)
    n = len(compare.COMPARISON_PROMPTS)
    assert len(rows) == len(full) == n
    assert counted["engine"] == Counter({"engine-torch-cpu-fp32": 4 * n}) and not counted["hf"]
    # Same replies as the seed's generate() call (greedy, no repeated 3-grams), decoded the same way.
    plain = load_model(str(tiny_base))
    ids = data.prompt_ids([data.Message("user", rows[0]["prompt"])], tiny_tokenizer, "dialogpt")
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = plain.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=12,
            do_sample=False,
            no_repeat_ngram_size=3,
            eos_token_id=tiny_tokenizer.eos_token_id,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )[0, len(ids) :]
    assert full[0]["base"] == tiny_tokenizer.decode(ref, skip_special_tokens=True).strip()


def test_served_replies_go_through_the_engine(exported, counted):
    from lora_med.data import Message
    from lora_med.serve import ServeConfig
    from lora_med.serve.replier import load_replier

    replier = load_replier(ServeConfig(model=str(exported["fp32"]), threads=1, max_new_tokens=8))
    try:
        replier.generate([replier.prompt([Message("user", "Hola, necesito una cita")])])
    finally:
        replier.close()
    assert counted["engine"] == Counter({"engine-cpu-fp32": 1}) and not counted["hf"]


def test_parity_gate_replies_go_through_the_engine_and_generate_is_the_reference_only(exported, counted):
    from lora_med.export.parity import verify_export

    figures = verify_export(exported["fp32"])
    n = figures["greedy"]["prompts"]
    # The PyTorch reference: one generate() per prompt. Both exported graphs: n single replies + 1 batch each.
    assert counted["hf"] == Counter({"GPT2LMHeadModel": n})
    assert counted["engine"] == Counter({"engine-optimum-cpu-fp32": n + 1, "engine-cpu-fp32": n + 1})


def test_bench_engine_rows_time_the_engine(trained, exported, tmp_path, counted):
    from lora_med.bench.main import bench
    from lora_med.config import BenchConfig

    r = bench(
        BenchConfig(
            run=str(trained["lora"]),
            export=[str(exported["fp32"])],
            backends=["engine-cpu-fp32"],
            out=str(tmp_path),
            threads=1,
            prompts=1,
            repeats=1,
            warmup=0,
            new_tokens=4,
            scaling=False,
            throughput=False,
            max_latency_s=60.0,
            min_ppl_gain=1e-3,
        )
    ).report
    assert [x["backend"] for x in r["latency"]] == ["engine-cpu-fp32"]
    assert counted["engine"] == Counter({"engine-cpu-fp32": 2}) and not counted["hf"]  # one reply + its TTFT
