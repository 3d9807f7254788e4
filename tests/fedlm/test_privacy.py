"""DP-SGD on the adapter (clipping, noise, empty batches, reuse), noise calibration, and the privacy ledger
(fedlm/ledger.py) spent as begin/commit."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer

import fedlm.ledger as ledger_mod
import fedlm.privacy as privacy_mod
from fedlm.ledger import LedgerParameters, PrivacyLedger
from fedlm.model import apply_lora, load_base_model
from fedlm.privacy import (calibrate_noise, clip_update, epsilon_of, poisson_batches,
                           resolve_delta, train_local_dp)
from fedlm.protocol import BudgetExceeded
from fedlm.settings import ConfigError, LoraSettings, ModelSettings, PrivacySettings, TrainSettings
from fedlm.training import sequence_losses, train_local
from tests.conftest import pld_epsilon

DP = PrivacySettings(name="dp_sgd", max_grad_norm=1.0, max_physical_batch_size=4)


@pytest.fixture()
def model(tiny_llama_dir):
    base, _ = load_base_model(ModelSettings(name_or_path=str(tiny_llama_dir)))
    lora = apply_lora(base, LoraSettings(r=4), seed=0)
    with torch.no_grad():  # LoRA starts with B = 0, where every A gradient is 0: give B a value so A is tested too
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return lora


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 300, (6, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[4, 5:] = 0  # sequences of different lengths: each still weighs one
    return ids, mask


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


def one_step(model, data, noise, clip=1.0, lr=0.5):
    """One logical step over all 6 rows (rate 1) in physical chunks of 4 + 2, in float32 (the exact maths these
    tests check; bf16 has its own tests below); returns the update."""
    before = trainable(model)
    train_local_dp(model, *data, TrainSettings(local_steps=1, batch_size=6, precision="fp32"),
                   PrivacySettings(name="dp_sgd", max_grad_norm=clip, max_physical_batch_size=4),
                   noise_multiplier=noise, sample_rate=1.0, seed=0, make_optimizer=sgd(lr))
    after = trainable(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(before[n])  # so the next call starts from the same point
    return {n: after[n] - before[n] for n in before}


def per_sequence_grads(model, ids, mask):
    """Reference per-sequence gradients: one sequence at a time, plain autograd, no Opacus."""
    model.train()
    out = []
    for i in range(len(ids)):
        model.zero_grad(set_to_none=True)
        sequence_losses(model, ids[i:i + 1], mask[i:i + 1]).mean().backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return out


def flat_norm(grads):
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()


# -- training --------------------------------------------------------------------------------------------

def test_dp_steps_move_every_adapter_tensor_and_never_a_base_weight(model):
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = trainable(model)
    ids = torch.randint(2, 300, (12, 16), generator=torch.Generator().manual_seed(3))
    result = train_local_dp(model, ids, torch.ones_like(ids), TrainSettings(local_steps=3, batch_size=6), DP,
                            noise_multiplier=1.0, sample_rate=0.5, seed=7)
    assert all(not torch.equal(p, lora[n]) for n, p in trainable(model).items())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    used = sum(len(rows) for rows in poisson_batches(12, 0.5, 3, seed=7))
    assert (result.steps, result.sequences, result.tokens) == (3, used, used * 16)
    assert math.isfinite(result.loss) and result.loss > 0


def test_noiseless_update_is_the_mean_of_clipped_per_sequence_gradients(model, data, monkeypatch):
    reference = per_sequence_grads(model, *data)
    norms = [flat_norm(g) for g in reference]
    clip = sorted(norms)[3]  # some sequences are clipped, some are not
    seen = []
    original = DPOptimizer.clip_and_accumulate

    def spy(self):  # Opacus' own per-sample gradients, as the optimizer is about to clip them
        seen.extend(torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in self.grad_samples], 1).norm(dim=1))
        original(self)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    lr = 0.5
    update = one_step(model, data, noise=0.0, clip=clip, lr=lr)
    # Rate 1 takes rows 0..5 in order, as two physical chunks forming one step.
    torch.testing.assert_close(torch.stack(seen).double(), torch.tensor(norms, dtype=torch.float64),
                               rtol=1e-4, atol=1e-7)
    factors = [min(1.0, clip / (n + 1e-6)) for n in norms]  # Opacus' clipping rule
    assert all(f * n <= clip + 1e-6 for f, n in zip(factors, norms))
    assert min(factors) < 1.0 and max(factors) == 1.0
    for name, got in update.items():
        want = -lr * sum(f * g[name] for f, g in zip(factors, reference)) / len(reference)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    unclipped = -lr * sum(g["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
                          for g in reference) / len(reference)
    assert not torch.allclose(update["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"],
                              unclipped, rtol=1e-3, atol=1e-6)


def test_noise_changes_the_update_with_the_calibrated_std_and_is_not_reproducible_from_the_seed(model, data):
    lr, noise, clip = 0.5, 1.0, 0.01
    clean = one_step(model, data, noise=0.0, clip=clip, lr=lr)
    noisy = one_step(model, data, noise=noise, clip=clip, lr=lr)
    again = one_step(model, data, noise=noise, clip=clip, lr=lr)
    diff = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    # Each coordinate gets lr * N(0, (noise * C)^2) / expected batch.
    std = (diff / (lr * noise * clip / 6)).std().item()
    assert 0.9 < std < 1.1
    assert not all(torch.equal(noisy[n], again[n]) for n in noisy)  # same seed, fresh noise


def test_an_empty_poisson_batch_is_a_noise_only_step(model, data):
    before = trainable(model)
    result = train_local_dp(model, *data, TrainSettings(local_steps=2), DP, noise_multiplier=1.0,
                            sample_rate=1e-9, seed=0)
    assert (result.steps, result.sequences, result.tokens) == (2, 0, 0) and math.isnan(result.loss)
    assert all(not torch.equal(p, before[n]) for n, p in trainable(model).items())
    train_local_dp(model, *data, TrainSettings(local_steps=2), DP, noise_multiplier=0.0, sample_rate=1e-9, seed=0)


def test_the_same_model_trains_again_with_and_without_dp(model, data):
    flags = [p.requires_grad for p in model.parameters()]
    hooks = [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()]
    for seed in (1, 2):
        train_local_dp(model, *data, TrainSettings(local_steps=2, batch_size=3), DP, noise_multiplier=0.5,
                       sample_rate=0.5, seed=seed)
        assert [p.requires_grad for p in model.parameters()] == flags
        assert [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()] == hooks
        assert not hasattr(model, "autograd_grad_sample_hooks")
        assert not any(hasattr(p, a) for p in model.parameters() for a in ("grad_sample", "summed_grad"))
        assert not any("activations" in m.__dict__ for m in model.modules())
    before = trainable(model)
    assert math.isfinite(train_local(model, *data, TrainSettings(local_steps=1, batch_size=3), seed=0).loss)
    assert any(not torch.equal(p, before[n]) for n, p in trainable(model).items())


def test_an_adapter_that_never_moves_is_an_error_and_leaves_no_hooks(model, data):
    with pytest.raises(RuntimeError, match="issue 820"):
        train_local_dp(model, *data, TrainSettings(local_steps=2), DP, noise_multiplier=1.0, sample_rate=1.0,
                       seed=0, make_optimizer=sgd(0.0))
    assert not hasattr(model, "autograd_grad_sample_hooks")
    train_local_dp(model, *data, TrainSettings(local_steps=1), DP, noise_multiplier=1.0, sample_rate=1.0, seed=0)


# -- accounting ------------------------------------------------------------------------------------------

def test_delta_and_rate_defaults():
    assert resolve_delta(PrivacySettings(), 1000) == 1e-5
    assert resolve_delta(PrivacySettings(), 50) == 1e-5
    assert resolve_delta(PrivacySettings(delta=1e-6), 50) == 1e-6
    assert resolve_delta(PrivacySettings(), 10_000_000) == 1e-7


def test_epsilon_of_matches_an_independent_accountant_and_falls_back_to_rdp(monkeypatch):
    assert epsilon_of([], 1e-5) == 0.0
    prv = epsilon_of([(1.0, 0.1, 50), (1.0, 0.1, 50)], 1e-5)
    assert abs(prv - pld_epsilon(1.0, 0.1, 100, 1e-5)) < 1e-2
    rdp = epsilon_of([(1.0, 0.1, 100)], 1e-5, "rdp")
    assert rdp > prv
    # Where epsilon is absurd anyway, PRV would take minutes and overflow: the RDP bound is used at once.
    absurd = [(0.3, 0.5, 1000)]
    assert epsilon_of(absurd, 1e-5) == epsilon_of(absurd, 1e-5, "rdp") > 1000

    real = privacy_mod.create_accountant

    def prv_overflows(mechanism):
        if mechanism == "prv":
            raise OverflowError("simulated PRV overflow")
        return real(mechanism)

    monkeypatch.setattr(privacy_mod, "create_accountant", prv_overflows)
    assert epsilon_of([(1.0, 0.1, 100)], 1e-5) == rdp


def test_calibrated_noise_meets_the_target_closely_and_grows_with_the_horizon():
    settings = PrivacySettings(name="dp_sgd", target_epsilon=3.0)
    short = calibrate_noise(settings, sample_rate=0.1, steps=100, delta=1e-5)
    eps = epsilon_of([(short, 0.1, 100)], 1e-5)
    assert 0.98 * 3.0 <= eps <= 3.0
    assert abs(pld_epsilon(short, 0.1, 100, 1e-5) - eps) < 1e-2
    assert calibrate_noise(settings, sample_rate=0.1, steps=400, delta=1e-5) > short
    fixed = PrivacySettings(name="dp_sgd", noise_multiplier=0.7)
    assert calibrate_noise(fixed, sample_rate=0.1, steps=400, delta=1e-5) == 0.7


# -- ledger ----------------------------------------------------------------------------------------------

PARAMS = LedgerParameters(noise_multiplier=1.0, sample_rate=0.25, delta=1e-5, target_epsilon=20.0, accountant="prv")


def spend(ledger, key, steps=10, params=PARAMS):
    """One round as a client spends it: begin, (train), commit; returns the committed epsilon."""
    return ledger.commit(ledger.begin(key, steps, new_parameters=lambda: params))


@pytest.mark.integration  # starts processes
def test_ledger_composes_rounds_exactly_across_restarts_and_processes(tmp_path):
    path = tmp_path / "client" / "ledger.json"
    for rnd in (1, 2):
        spend(PrivacyLedger(path), f"run:{rnd}")  # a fresh object each round, as after a restart
    projected = PrivacyLedger(path).begin("run:3", 10).projected_epsilon
    code = ("import sys; from pathlib import Path; from fedlm.ledger import LedgerParameters, PrivacyLedger; "
            "l = PrivacyLedger(Path(sys.argv[1])); "
            "new = lambda: LedgerParameters(9.0, 0.5, 1e-3, 1.0, 'rdp'); "
            "print(l.commit(l.begin('run:3', 10, new_parameters=new)))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(projected, abs=1e-9)
    state = PrivacyLedger(path).read()
    want = pld_epsilon(1.0, 0.25, 30, 1e-5)
    assert -1e-3 <= state.epsilon - want <= 1e-2  # never under the exact value, at most 0.01 over
    assert state.parameters == PARAMS  # the other process's parameters were not taken
    stored = json.loads(path.read_text())
    assert stored["version"] == 1 and stored["parameters"] == {
        "noise_multiplier": 1.0, "sample_rate": 0.25, "delta": 1e-5, "target_epsilon": 20.0, "accountant": "prv",
        "sequences": 0, "planned_steps": 0, "planned_epsilon": 0.0, "shares": 1}  # no plan: given parameters
    # A ledger written before plans existed (no plan figures) reads as it is.
    old = {**stored, "parameters": {k: v for k, v in stored["parameters"].items()
                                    if k not in ("sequences", "planned_steps", "planned_epsilon", "shares")}}
    path.write_text(json.dumps(old))
    assert PrivacyLedger(path).read().parameters == PARAMS
    assert [e["key"] for e in stored["history"]] == ["run:1", "run:2", "run:3"]
    assert [e["steps"] for e in stored["history"]] == [10, 10, 10]
    assert stored["history"][0]["epsilon"] < stored["history"][1]["epsilon"] < stored["history"][2]["epsilon"]


def test_an_instruction_delivered_twice_is_spent_once(tmp_path):
    path = tmp_path / "ledger.json"
    eps = spend(PrivacyLedger(path, owner="client 7"), "run:1")
    with pytest.raises(BudgetExceeded, match="client 7 declines to train this round: it already trained 'run:1'"):
        PrivacyLedger(path, owner="client 7").begin("run:1", 10)
    # The same instruction reaching two processes at once: both begin, the second commit is refused.
    first, second = PrivacyLedger(path).begin("run:2", 10), PrivacyLedger(path).begin("run:2", 10)
    eps2 = PrivacyLedger(path).commit(first)
    with pytest.raises(BudgetExceeded, match="'run:2'.*never spent twice"):
        PrivacyLedger(path).commit(second)
    state = PrivacyLedger(path).read()
    assert [e["key"] for e in state.history] == ["run:1", "run:2"] and state.epsilon == eps2 > eps
    assert state.has_spent("run:2") and not state.has_spent("run:3")


def test_new_parameters_are_fixed_once_for_the_ledgers_lifetime(tmp_path):
    path, calls = tmp_path / "ledger.json", []

    def calibrate(params):
        def make():
            calls.append(params)
            return params
        return make

    with pytest.raises(FileNotFoundError, match="new_parameters"):
        PrivacyLedger(path).begin("run:1", 10)
    first = PrivacyLedger(path).begin("run:1", 10, new_parameters=calibrate(PARAMS))
    assert first.created and first.parameters == PARAMS and first.epsilon == 0.0 and path.exists()
    other = LedgerParameters(noise_multiplier=0.3, sample_rate=0.9, delta=1e-3, target_epsilon=2.0)
    again = PrivacyLedger(path).begin("run:1", 10, new_parameters=calibrate(other))
    assert not again.created and again.parameters == PARAMS and calls == [PARAMS]  # calibrated only once
    assert PrivacyLedger(path).read().history == ()  # begin alone spends nothing


def test_a_refusal_while_creating_writes_no_ledger(tmp_path):
    path = tmp_path / "ledger.json"

    def below_the_floor():
        raise BudgetExceeded("client 0 declines to train this round: below this device's floor")

    with pytest.raises(BudgetExceeded, match="floor"):
        PrivacyLedger(path).begin("run:1", 10, new_parameters=below_the_floor)
    with pytest.raises(ValueError, match="sample_rate=1.5"):
        PrivacyLedger(path).begin("run:1", 10, new_parameters=lambda: LedgerParameters(1.0, 1.5, 1e-5, 8.0))
    with pytest.raises(ValueError, match="accountant='gdp' is unknown"):
        LedgerParameters(1.0, 0.5, 1e-5, 8.0, "gdp")
    assert not path.exists()


def test_a_round_past_the_budget_is_refused_before_training(tmp_path):
    path = tmp_path / "ledger.json"
    one_round, two_rounds = epsilon_of([(1.0, 0.25, 10)], 1e-5), epsilon_of([(1.0, 0.25, 20)], 1e-5)
    budget = round((one_round + two_rounds) / 2, 3)  # room for one round, not two
    tight = LedgerParameters(noise_multiplier=1.0, sample_rate=0.25, delta=1e-5, target_epsilon=budget)
    eps = spend(PrivacyLedger(path, owner="client 2"), "run:1", params=tight)
    assert eps == pytest.approx(one_round, abs=1e-9)
    with pytest.raises(BudgetExceeded) as refusal:
        PrivacyLedger(path, owner="client 2").begin("run:2", 10)
    assert str(refusal.value) == (f"client 2 declines to train this round: it would take its epsilon from "
                                  f"{eps:.3f} to {two_rounds:.3f}, past its lifetime budget {budget:g}")
    assert [e["key"] for e in PrivacyLedger(path).read().history] == ["run:1"]


def test_commit_recomputes_only_when_another_spend_came_first_and_withholds_an_update_past_the_budget(tmp_path):
    path = tmp_path / "ledger.json"
    one, two = epsilon_of([(1.0, 0.25, 10)], 1e-5), epsilon_of([(1.0, 0.25, 20)], 1e-5)
    params = LedgerParameters(noise_multiplier=1.0, sample_rate=0.25, delta=1e-5, target_epsilon=(one + two) / 2)
    a = PrivacyLedger(path).begin("run:1", 10, new_parameters=lambda: params)
    b = PrivacyLedger(path).begin("run:2", 10)  # another process, same history: both fit on their own
    assert a.projected_epsilon == b.projected_epsilon == pytest.approx(one, abs=1e-9)
    assert PrivacyLedger(path).commit(a) == a.projected_epsilon
    with pytest.raises(BudgetExceeded, match=f"to {two:.3f}, past its lifetime budget"):
        PrivacyLedger(path).commit(b)
    # The steps b took are recorded all the same (over-count, never under-count), at the recomputed epsilon.
    history = PrivacyLedger(path).read().history
    assert [e["key"] for e in history] == ["run:1", "run:2"]
    assert history[1]["epsilon"] == pytest.approx(two, abs=1e-9) and history[1]["epsilon"] != b.projected_epsilon


def test_one_round_parses_the_ledger_at_most_twice_and_runs_the_accountant_once(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    spend(PrivacyLedger(path), "run:1")  # an existing ledger with history: the usual round
    counts = {"parse": 0, "epsilon_of": 0, "prv": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper

    real_accountant = privacy_mod._accountant_epsilon

    def accountant(history, delta, mechanism):
        counts["prv"] += mechanism == "prv"
        return real_accountant(history, delta, mechanism)

    monkeypatch.setattr(json, "loads", counting("parse", json.loads))
    monkeypatch.setattr(ledger_mod, "epsilon_of", counting("epsilon_of", ledger_mod.epsilon_of))
    monkeypatch.setattr(privacy_mod, "_accountant_epsilon", accountant)
    ledger = PrivacyLedger(path)
    s = ledger.begin("run:2", 10)
    assert (counts["parse"], counts["epsilon_of"], counts["prv"]) == (1, 1, 1)
    eps = ledger.commit(s)
    assert (counts["parse"], counts["epsilon_of"], counts["prv"]) == (2, 1, 1)
    monkeypatch.undo()
    assert eps == s.projected_epsilon == PrivacyLedger(path).read().epsilon > 0


@pytest.mark.parametrize("content", ["{not json", "", json.dumps({"version": 1, "history": []}),
                                     json.dumps({"version": 2, "parameters": PARAMS.as_json(), "history": []}),
                                     json.dumps({"version": 1, "parameters": {**PARAMS.as_json(), "sample_rate": "x"},
                                                 "history": []}),
                                     json.dumps({"version": 1, "parameters": PARAMS.as_json(),
                                                 "history": [{"key": "run:1", "steps": 1.5}]})])
def test_a_corrupt_ledger_is_an_error_naming_the_file_never_a_reset(tmp_path, content):
    path = tmp_path / "ledger.json"
    begun = PrivacyLedger(path).begin("run:1", 5, new_parameters=lambda: PARAMS)  # then the file is damaged
    path.write_text(content)
    for call in (lambda l: l.begin("run:1", 5, new_parameters=lambda: PARAMS), lambda l: l.read(),
                 lambda l: l.commit(begun)):
        with pytest.raises(ConfigError, match="do not delete it lightly") as err:
            call(PrivacyLedger(path))
        assert str(path) in str(err.value)
    assert path.read_text() == content


def test_a_crash_before_the_rename_leaves_the_previous_ledger_intact(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path)
    eps = spend(ledger, "run:1")
    before = path.read_text()
    begun = ledger.begin("run:2", 10)

    def crash(src, dst):
        raise OSError("simulated power loss")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power loss"):
        ledger.commit(begun)
    monkeypatch.undo()
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]
    (tmp_path / ".ledger.json.killed.tmp").write_text("{half")  # what a writer killed before its rename leaves
    reopened = PrivacyLedger(path)
    assert reopened.read().epsilon == eps and not reopened.read().has_spent("run:2")
    assert spend(reopened, "run:2") > eps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_a_ledger_removed_while_training_is_an_error_not_a_new_ledger(tmp_path):
    path = tmp_path / "ledger.json"
    begun = PrivacyLedger(path).begin("run:1", 5, new_parameters=lambda: PARAMS)
    path.unlink()
    with pytest.raises(ConfigError, match="disappeared between begin"):
        PrivacyLedger(path).commit(begun)
    assert not path.exists()


def test_clip_update_scales_the_whole_update_down_never_up():
    old = [np.array([1.0, 1.0], np.float32), np.array([2.0], np.float32)]
    new = [np.array([4.0, 5.0], np.float32), np.array([2.0], np.float32)]  # update (3, 4, 0): norm 5
    clipped = clip_update(new, old, max_norm=2.5)
    np.testing.assert_allclose(clipped[0], [2.5, 3.0])  # old + update / 2
    np.testing.assert_allclose(clipped[1], [2.0])
    assert clipped[0].dtype == np.float32
    unchanged = clip_update(new, old, max_norm=10.0)
    np.testing.assert_allclose(unchanged[0], new[0])


# -- bf16 compute (train.precision) ------------------------------------------------------------------------

def test_dp_under_bf16_clips_each_sequence_in_float32_and_never_moves_the_base(model, data, monkeypatch):
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    reference = [flat_norm(g) for g in per_sequence_grads(model, *data)]  # float32
    clip = min(reference) / 2  # every sequence is clipped
    seen, dtypes = [], set()
    original = DPOptimizer.clip_and_accumulate

    def spy(self):
        dtypes.update(g.dtype for g in self.grad_samples)
        seen.extend(torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in self.grad_samples], 1).norm(dim=1))
        original(self)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    lr, start = 0.5, trainable(model)
    ids, mask = data
    for row in range(len(ids)):  # one sequence per step: its clipped gradient is the whole update
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(start[n])
        train_local_dp(model, ids[row:row + 1], mask[row:row + 1],
                       TrainSettings(local_steps=1, batch_size=1, precision="bf16"),
                       PrivacySettings(name="dp_sgd", max_grad_norm=clip), noise_multiplier=0.0, sample_rate=1.0,
                       seed=0, make_optimizer=sgd(lr))
        update = {n: p - start[n] for n, p in trainable(model).items()}
        assert flat_norm(update) / lr == pytest.approx(clip, rel=1e-5)  # the bound C holds to float32 rounding
        assert all(not torch.equal(p, start[n]) for n, p in trainable(model).items())
    assert dtypes == {torch.float32}  # clipped in float32
    # computed in bf16: the same per-sequence gradient norms as float32, to bf16's ~3 significant digits
    torch.testing.assert_close(torch.stack(seen).double(), torch.tensor(reference, dtype=torch.float64), rtol=5e-2,
                               atol=1e-6)
    assert all(p.dtype == torch.float32 for p in trainable(model).values())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_bf16_training_follows_float32_closely(model, data):
    """Same seed, same rows: bf16 autocast changes the trained adapter only by rounding."""
    start = trainable(model)
    results = {}
    for precision in ("fp32", "bf16"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(start[n])
        train_local(model, *data, TrainSettings(local_steps=3, batch_size=6, optimizer="adamw", learning_rate=1e-2,
                                                precision=precision), seed=0)
        results[precision] = {n: p - start[n] for n, p in trainable(model).items()}
    moved = flat_norm(results["fp32"])
    gap = flat_norm({n: results["bf16"][n] - results["fp32"][n] for n in start})
    assert moved > 0 and gap < 0.1 * moved
