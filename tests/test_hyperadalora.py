"""HyperAdaLoRA: generated factor shapes, budget pruning, a faithful saved adapter, training."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, token_batches
from test_training import folders, train  # noqa: F401  (module fixture + end-to-end helper)

from senslora.finetune.config import TrainConfig
from senslora.finetune.hyperadalora import find_controller, materialise
from senslora.finetune.hyperadalora.budget import budget_at, top_budget_mask
from senslora.finetune.methods import adalora_schedule, prepare_model, trainable_parameters

TOTAL_STEPS = 40


def prepared(total_steps: int = TOTAL_STEPS, **options):
    config = TrainConfig(method="hyperadalora", avg_rank=2, **options)
    return prepare_model(
        tiny_bert(),
        config,
        task_type="SEQ_CLS",
        calibration_batches=lambda: token_batches(num_batches=2, batch=4, length=9),
        train_batches=lambda: token_batches(),
        labelled_batches=lambda: token_batches(num_batches=2, batch=4, length=9, labels=True),
        total_steps=total_steps,
    )


def train_steps(model, steps: int, lr: float = 3e-3) -> list[float]:
    """Plain loop on one fixed labelled batch, with the callback's per-step update."""
    batch = token_batches(num_batches=1, batch=8, length=9, labels=True, seed=1)[0]
    controller = find_controller(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        controller.update_and_allocate(step)  # what HyperAdaLoraCallback does
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained():
    """A tiny BERT trained over the whole schedule (pruned down to its target budget)."""
    torch.manual_seed(0)
    result = prepared()
    losses = train_steps(result.model, TOTAL_STEPS)
    return result, losses


def check_factor_shapes(model, ranks: dict[str, int]) -> None:
    controller = find_controller(model)
    model.eval()
    with torch.no_grad():
        model(**token_batches()[0])
    base = model.get_base_model()
    for name, rank in ranks.items():
        layer = base.get_submodule(name)
        d_out, d_in = layer.out_features, layer.in_features
        assert controller.factors[f"{name}.B"].shape == (d_out, rank)
        assert controller.factors[f"{name}.A"].shape == (rank, d_in)
        assert layer.lora_B["default"].weight is controller.factors[f"{name}.B"]


def test_generated_factors_have_the_initial_rank_shapes():
    result = prepared()
    ranks = result.report["init_ranks"]
    assert len(ranks) == 12 and set(ranks.values()) == {3}  # AdaLoRA init: max(2 + 1, 3)
    check_factor_shapes(result.model, ranks)


def test_senslora_start_gives_scaled_non_uniform_ranks():
    result = prepared(hyperadalora_init="senslora")
    start, ranks = result.report["senslora_ranks"], result.report["init_ranks"]
    assert sum(start.values()) == 2 * 12
    assert len(set(ranks.values())) > 1
    assert all(ranks[n] == min(-(-start[n] * 3 // 2), 16) for n in start)
    check_factor_shapes(result.model, ranks)
    assert find_controller(result.model).target_budget == 2 * 12


def test_budget_schedule_and_exact_mask():
    schedule = adalora_schedule(TOTAL_STEPS)
    kwargs = dict(initial=36, target=24, total_steps=TOTAL_STEPS, delta_t=schedule["deltaT"])
    budgets = [
        budget_at(s, tinit=schedule["tinit"], tfinal=schedule["tfinal"], **kwargs)[0]
        for s in range(1, TOTAL_STEPS + 1)
    ]
    assert budgets[0] == 36 and budgets[-1] == 24
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))
    mask = top_budget_mask(torch.tensor([0.3, 0.1, 0.1, 0.1, 0.5]), 3)
    assert mask[0] == 1 and mask[4] == 1 and mask.sum() == 3  # exactly the budget, ties or not


def test_pruning_reaches_the_target_budget(trained):
    result, _ = trained
    ranks = find_controller(result.model).ranks()
    assert sum(ranks.values()) == 2 * 12  # from 3 x 12
    assert len(set(ranks.values())) > 1  # not uniform: importance decides


def test_loss_goes_down(trained):
    _, losses = trained
    assert losses[-1] < 0.8 * losses[0], losses


def test_trainable_parameters_are_the_hypernetwork_and_the_head():
    result = prepared()
    model = result.model
    controller = find_controller(model)
    head = model.get_base_model().classifier.modules_to_save["default"]
    expected = trainable_parameters(controller) + sum(p.numel() for p in head.parameters())
    assert trainable_parameters(model) == expected
    assert result.report["hypernetwork_parameters"] == trainable_parameters(controller)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("hyperadalora" in n or "classifier.modules_to_save" in n for n in names)
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_gradients_reach_only_the_hypernetwork_and_head():
    result = prepared()
    model = result.model.train()
    model(**token_batches(labels=True)[0]).loss.backward()
    lam_head = find_controller(model).hypernet.lambda_head.weight
    assert lam_head.grad is not None and lam_head.grad.abs().sum() > 0
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_saved_adapter_reproduces_the_trained_model(trained, tmp_path):
    result, _ = trained
    model = result.model.eval()
    ranks = find_controller(model).ranks()
    batch = token_batches(num_batches=1, batch=4, length=9, seed=3)[0]
    with torch.no_grad():
        expected = model(**batch).logits
    materialise(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter").eval()
    base = reloaded.get_base_model()
    for name, rank in ranks.items():
        assert base.get_submodule(name).lora_A["default"].weight.shape[0] == max(rank, 1)
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)
        merged = reloaded.merge_and_unload()
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-5)
    assert not any("hyperadalora" in n for n, _ in merged.named_modules())
    assert (expected - tiny_bert()(**batch).logits).abs().max() > 1e-3  # the adapter matters


def test_gpt2_conv1d_adapter_reloads_and_merges(tmp_path):
    config = TrainConfig(method="hyperadalora", avg_rank=2)
    model = prepare_model(
        tiny_gpt2(),
        config,
        task_type="CAUSAL_LM",
        calibration_batches=lambda: token_batches(),
        train_batches=lambda: token_batches(),
        total_steps=20,
    ).model
    batch = token_batches(num_batches=1)[0]
    controller = find_controller(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, 21):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        controller.update_and_allocate(step)
        optimizer.zero_grad()
    assert sum(controller.ranks().values()) == 2 * 8
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    materialise(model)
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)
        assert torch.allclose(reloaded.merge_and_unload()(**batch).logits, expected, atol=1e-5)


def test_run_training_reports_ranks_and_step_evaluations(folders, tmp_path):  # noqa: F811
    results = train(folders, tmp_path, method="hyperadalora", epochs=4, eval_steps=5)
    ranks = results["ranks"]
    assert len(ranks) == 12 and sum(ranks.values()) == 2 * 12
    assert results["parameters"]["trainable"] >= results["parameters"]["hypernetwork"] > 0
    assert [e["step"] for e in results["evals"]] == [5, 10, 15, 20, 24]
    assert all("accuracy" in e and "epoch" in e for e in results["evals"])
    config = peft.PeftConfig.from_pretrained(tmp_path / "hyperadalora" / "adapter")
    assert sorted(config.rank_pattern.values()) == sorted(max(r, 1) for r in ranks.values())


def test_eval_steps_adds_step_evaluations_for_lora(folders, tmp_path):  # noqa: F811
    results = train(folders, tmp_path, method="lora", epochs=1, eval_steps=4)
    assert [e["step"] for e in results["evals"]] == [4, 6]
    assert len(results["epochs"]) == 2


@pytest.mark.parametrize("options", [{"hyperadalora_init": "svd"}, {"hyperadalora_width": 30}])
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        TrainConfig(method="hyperadalora", **options)
