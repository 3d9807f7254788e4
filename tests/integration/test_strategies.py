"""Strategies on Flower's Simulation Engine: frozen_a keeps every client's A bitwise fixed and halves the upload."""

import hashlib
import sys
from pathlib import Path

import pytest
import ray
import torch
from flwr.app import Context, Message, MessageType
from safetensors.torch import load_file

from fedlm.model import apply_lora, load_base_model
from fedlm.settings import RunSettings, settings_from_dict
from simulations.launch import simulate
from strategies import strategy_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# Ray ships the recording mod to its workers by value: they cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _a_digest(model) -> str:
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            digest.update(name.encode() + p.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


class RecordA:
    """A mod that, after each training reply, appends the client's lora_A digest to a file (in its worker)."""

    def __init__(self, settings: RunSettings, path: Path) -> None:
        self.settings, self.path = settings, path

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN:
            from client.lora_client import worker_model
            s = self.settings
            model, _ = worker_model(s.model, s.lora, s.seed, s.cache_dir, strategy_spec(s.strategy.name).frozen_a)  # the client's own
            with self.path.open("a") as f:
                f.write(f"{context.node_config['partition-id']} {_a_digest(model)}\n")
        return reply


def _settings(tmp_path, model_dir, data_dir, name) -> RunSettings:
    return settings_from_dict(RunSettings, {
        "model": {"name_or_path": str(model_dir)},
        "dataset": {"path": str(data_dir), "seq_len": 32, "min_train_sequences": 4, "min_eval_sequences": 1},
        "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 2},
        "train": {"local_steps": 4, "batch_size": 4, "learning_rate": 0.01},
        "output_dir": str(tmp_path / name), "strategy": {"name": name},
        "privacy": {"name": "disabled"}, "secagg": {"name": "disabled"},  # for speed: both are mean-compatible
    })


def test_frozen_a_keeps_a_fixed_on_every_client_and_halves_the_upload(tmp_path, tiny_llama_dir, text_folder):
    fedavg = simulate(_settings(tmp_path, tiny_llama_dir, text_folder, "fedavg"))
    settings = _settings(tmp_path, tiny_llama_dir, text_folder, "frozen_a")
    log = tmp_path / "a_digests.txt"
    frozen = simulate(settings, client_mods=(RecordA(settings, log),))
    base = apply_lora(load_base_model(settings.model)[0], settings.lora, settings.seed, frozen_a=True)
    expected = _a_digest(base)
    records = [line.split() for line in log.read_text().splitlines()]
    assert sorted(pid for pid, _ in records) == ["0", "0", "1", "1"]  # both clients, both rounds
    assert {digest for _, digest in records} == {expected}  # bitwise the seed's A, everywhere, every round
    for r in (1, 2):  # only B travels up: about half of FedAvg's upload (B is out x r, A is r x in)
        ratio = frozen.rows[r]["bytes_up"] / fedavg.rows[r]["bytes_up"]
        assert 0.45 < ratio < 0.6, ratio
    assert frozen.rows[-1]["eval_loss"] < frozen.rows[0]["eval_loss"]  # training B alone still learns
    saved = load_file(frozen.output_dir / "adapter" / "adapter_model.safetensors")  # a complete PEFT adapter
    a_keys = [k for k in saved if ".lora_A." in k]
    assert len(a_keys) == len([k for k in saved if ".lora_B." in k]) > 0
    reference = {k: v for k, v in base.state_dict().items() if ".lora_A." in k}
    for key in a_keys:  # PEFT drops the adapter name from saved keys
        assert torch.equal(saved[key], reference[key.replace(".weight", ".default.weight")])
