"""A real federation on Flower's Simulation Engine (Ray): tiny models, real LoRA, real rounds."""

import json
import math

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedlm.data.preparation import ClientData, client_data_path
from fedlm.settings import RunSettings, settings_from_dict
from fedlm.training import evaluate, perplexity
from simulations import sample
from simulations.launch import simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _settings(tmp_path, model_dir, data_dir, **extra) -> RunSettings:
    data = {
        "model": {"name_or_path": str(model_dir)},
        "dataset": {"path": str(data_dir), "seq_len": 32, "min_train_sequences": 4, "min_eval_sequences": 1},
        "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 2},
        "train": {"local_steps": 4, "batch_size": 4, "learning_rate": 0.01},
        "output_dir": str(tmp_path / "run"),
        "privacy": {"name": "disabled"}, "secagg": {"name": "disabled"},  # the plain path; others have their own tests
        **extra,
    }
    return settings_from_dict(RunSettings, data)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_llama_dir, text_folder):
    tmp_path = tmp_path_factory.mktemp("llama_run")
    settings = _settings(tmp_path, tiny_llama_dir, text_folder, server={"central_eval_path": str(text_folder)})
    return settings, simulate(settings)


def test_two_clients_two_rounds_leave_complete_metrics(llama_run):
    settings, outcome = llama_run
    rows = outcome.rows
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["train_loss"] is None and rows[0]["clients_sampled"] == 0
    for r in rows[1:]:
        assert r["clients_sampled"] == 2 and r["clients_ok"] == 2
        assert math.isfinite(r["train_loss"]) and r["client_train_seconds"] > 0
    for r in rows:
        assert r["eval_clients"] == 2
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
        assert r["central_perplexity"] > 1
    # Tiny model, learning rate 0.01 on repetitive text: the held-out loss must fall.
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_bytes_counted_are_the_adapters_that_travel(llama_run):
    settings, outcome = llama_run
    adapter_bytes = sum(p.stat().st_size for p in (outcome.output_dir / "adapter").glob("*.safetensors"))
    r1 = outcome.rows[1]
    # Up: 2 fit replies + 2 evaluate replies (which carry no arrays). Down: 2 fit + 2 evaluate instructions.
    assert r1["bytes_up"] == pytest.approx(2 * adapter_bytes, rel=0.02)
    assert r1["bytes_down"] == pytest.approx(4 * adapter_bytes, rel=0.02)
    assert outcome.rows[0]["bytes_down"] == pytest.approx(2 * adapter_bytes, rel=0.02)  # round 0: eval only


def test_saved_adapter_reproduces_the_reported_perplexity(llama_run, tiny_llama_dir):
    settings, outcome = llama_run
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                      outcome.output_dir / "adapter")
    total, count = 0.0, 0
    for pid in range(2):
        data = ClientData.load(client_data_path(outcome.output_dir / "data", pid))
        n = settings.train.max_eval_sequences
        loss, tokens = evaluate(model, data.eval[:n], data.eval_mask[:n])
        total, count = total + loss * tokens, count + tokens
    assert perplexity(total / count) == pytest.approx(outcome.final_perplexity, rel=1e-4)


def test_outputs_include_settings_report_and_plots(llama_run):
    _, outcome = llama_run
    out = outcome.output_dir
    assert RunSettings.from_json((out / "settings.json").read_text()).federation.rounds == 2
    report = (out / "report.md").read_text()
    assert "round 0 (base model)" in report and "![perplexity](perplexity.png)" in report
    for png in ("loss.png", "perplexity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["seconds"] > 0 for line in lines)


def test_sample_command_continues_a_prompt_with_base_and_adapter(llama_run, capsys):
    _, outcome = llama_run
    sample.main([str(outcome.output_dir), "--prompt", "def", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert "--- base model ---" in out and "--- base + federated adapter ---" in out


def test_another_architecture_and_a_jsonl_file_need_no_code_change(tmp_path, tiny_gpt2_dir):
    records = [{"prompt": f"question {i} " + "data model " * 30, "response": "answer " * 40} for i in range(8)]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    settings = _settings(tmp_path, tiny_gpt2_dir, path, federation={"num_clients": 2, "clients_per_round": 2,
                                                                       "rounds": 1})
    outcome = simulate(settings)
    assert [r["round"] for r in outcome.rows] == [0, 1]
    assert outcome.rows[1]["clients_ok"] == 2 and outcome.rows[1]["clients_sampled"] == 2
    config = json.loads((outcome.output_dir / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and set(config["target_modules"]) == {"c_attn", "c_proj", "c_fc"}
