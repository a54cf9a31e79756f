"""The cards as typed structures: a real run's card and export's manifest read into their types (settings as the
command's config object), and damaged fields refused by name, with the fix."""

from __future__ import annotations

import json
import shutil

import pytest

from lora_med.cards import BenchCard, ExportCard, TrainCard
from lora_med.config import ExportConfig, TrainConfig
from lora_med.errors import LoraMedError


def test_a_run_card_reads_typed(trained):
    card = TrainCard.read(trained["lora"])
    raw = json.loads((trained["lora"] / "run.json").read_text())
    assert isinstance(card.config, TrainConfig) and card.method == "lora" == raw["config"]["method"]
    assert card.config.r == raw["config"]["r"] and card.config.seed == raw["seed"]
    assert (card.status, card.artifact, card.base) == ("complete", "adapter", raw["base"]["name_or_path"])
    assert (card.format, card.max_length) == (raw["data"]["format"], raw["data"]["max_length"])
    assert card.eval.sha256 == raw["data"]["eval"]["sha256"] and card.eval.source == raw["data"]["eval"]["source"]
    assert card.metrics["eval_ppl"] == raw["metrics"]["eval_ppl"] and card.raw == raw
    full = TrainCard.read(trained["full"])
    assert (full.method, full.artifact) == ("full", "model")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda c: c["config"].update(r=0), r"field 'config' holds settings lora-med refuses \(TrainConfig.r=0: must"),
        (lambda c: c["config"].update(method="dora"), "field 'config.method' is 'dora', not one of lora, qlora, full"),
        (lambda c: c.update(artifact="weights"), "field 'artifact' is 'weights', not one of adapter, model"),
        (lambda c: c["data"].update(max_length="256"), "field 'data.max_length' is of the wrong type"),
        (lambda c: c["data"]["eval"].update(source="split", indices=None), "field 'data.eval.indices' is missing"),
        (lambda c: c["data"]["eval"].update(source="split", indices=[1, "2"]), "'data.eval.indices' does not list"),
    ],
)
def test_a_damaged_run_card_names_the_field(trained, tmp_path, damage, message):
    run = tmp_path / "run"
    shutil.copytree(trained["lora"], run)
    raw = json.loads((run / "run.json").read_text())
    damage(raw)
    (run / "run.json").write_text(json.dumps(raw))
    with pytest.raises(LoraMedError, match=message) as e:
        TrainCard.read(run)
    assert str(run / "run.json") in str(e.value) and "restore it, or run `lora-med train` again" in str(e.value)


def test_a_setting_added_later_does_not_break_an_older_card(trained):
    raw = json.loads((trained["lora"] / "run.json").read_text())
    raw["config"]["a_setting_from_a_later_version"] = 1
    del raw["config"]["compare_max_new_tokens"]  # a card older than this setting: its default
    card = TrainCard.from_json(raw, trained["lora"])
    assert card.config.compare_max_new_tokens == TrainConfig().compare_max_new_tokens


def test_an_export_manifest_reads_typed(exported):
    fp32, int8 = ExportCard.read(exported["fp32"]), ExportCard.read(exported["int8"])
    assert isinstance(fp32.options, ExportConfig) and fp32.options.precision() == "fp32"
    assert int8.options.quantize == "int8" and int8.options.precision() == "int8"
    assert fp32.engine.built and (fp32.engine.device, fp32.engine.precision) == ("cpu", "fp32")
    run = TrainCard.read(fp32.source.run_dir)
    assert (fp32.source.format, fp32.source.max_length) == (run.format, run.max_length)


def test_an_export_made_without_a_decode_graph_says_why(exported):
    raw = json.loads((exported["fp32"] / "manifest.json").read_text())
    del raw["engine"]
    graph = ExportCard.from_json(raw, exported["fp32"]).engine
    assert not graph.built and graph.device is None and "before lora-med wrote engine/" in (graph.reason or "")
    raw["engine"] = {"status": "built", "precision": "fp32"}
    with pytest.raises(LoraMedError, match="field 'engine.device' is missing"):
        ExportCard.from_json(raw, exported["fp32"])


def test_a_bench_report_reads_typed(tmp_path):
    raw = {
        "kind": "lora-med.bench",
        "name": "r",
        "settings": {"shape": "tiny", "prompts": 2},
        "gate": {"passed": False, "checks": []},
    }
    (tmp_path / "report.json").write_text(json.dumps(raw))
    card = BenchCard.read(tmp_path)
    assert (card.name, card.settings.shape, card.settings.prompts, card.passed) == ("r", "tiny", 2, False)
    raw["settings"]["shape"] = "huge"
    (tmp_path / "report.json").write_text(json.dumps(raw))
    with pytest.raises(LoraMedError, match=r"field 'settings' .*BenchConfig.shape='huge': use one of"):
        BenchCard.read(tmp_path)
