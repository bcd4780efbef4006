"""One allocation, every model built on its backbone: other head classes, the bare backbone,
sentence-transformers, wrappers; exact ranks after injection; old allocation files still load."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_batches
from torch import nn
from transformers import BertForTokenClassification, BertModel, LlamaModel

import senslora
from senslora import AllocationConfig, allocate_ranks, collect_statistics
from senslora.peft_bridge import backbone_prefix, injected_ranks, relative_name

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def measured_allocation(model, **config) -> senslora.Allocation:
    stats = collect_statistics(model, token_batches(num_batches=2))
    config = {"avg_rank": 4, **config}
    return allocate_ranks(stats, AllocationConfig(**config), backbone=backbone_prefix(model))


def ranks_by_relative_name(peft_model, target) -> dict[str, int]:
    """The injected ranks, named relative to the target model's backbone."""
    prefix = backbone_prefix(target)
    return {relative_name(n, prefix): r for n, r in injected_ranks(peft_model).items()}


def assert_exact_ranks(peft_model, target, allocation):
    expected = {n: r for n, r in allocation.relative_ranks().items() if r > 0}
    assert ranks_by_relative_name(peft_model, target) == expected
    senslora.verify_ranks(peft_model, allocation)


def same_backbone(make):
    """The bert models below share tiny_bert's config and seed, hence its backbone weights."""
    source = tiny_bert()
    torch.manual_seed(0)
    return make(source.config)


def test_backbone_prefix_of_heads_bare_models_and_wrappers():
    assert backbone_prefix(tiny_bert()) == "bert"
    assert backbone_prefix(BertModel(tiny_bert().config)) == ""
    assert backbone_prefix(tiny_llama()) == "model"
    assert backbone_prefix(LlamaModel(tiny_llama().config)) == ""
    assert backbone_prefix(tiny_gpt2()) == "transformer"
    wrapped = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert backbone_prefix(wrapped) == "base_model.model.model"
    assert backbone_prefix(nn.Sequential(nn.Linear(2, 2))) == ""


@pytest.mark.parametrize(
    "make", [BertModel, BertForTokenClassification, type(tiny_bert())], ids=lambda m: m.__name__
)
def test_one_bert_allocation_applies_to_every_head_class(make):
    allocation = measured_allocation(tiny_bert())
    assert allocation.backbone == "bert"
    assert len(set(allocation.ranks.values())) > 1, "the test needs non-uniform ranks"
    target = same_backbone(make)
    # plain peft with the LoraConfig alone (what adapter_config.json holds)
    plain = peft.get_peft_model(target, allocation.to_lora_config())
    assert_exact_ranks(plain, target, allocation)
    # and through senslora, which checks the shapes first
    target = same_backbone(make)
    assert_exact_ranks(senslora.apply_allocation(target, allocation), target, allocation)


def test_llama_allocation_from_causal_lm_applies_to_the_bare_model_and_back():
    causal = tiny_llama()
    allocation = measured_allocation(causal, avg_rank=3)
    assert allocation.backbone == "model"
    assert len(set(allocation.ranks.values())) > 1
    bare = LlamaModel(causal.config)
    assert_exact_ranks(peft.get_peft_model(bare, allocation.to_lora_config()), bare, allocation)

    reverse = measured_allocation(LlamaModel(causal.config), avg_rank=3)
    assert reverse.backbone == ""
    target = tiny_llama()
    assert_exact_ranks(senslora.apply_allocation(target, reverse), target, reverse)


def test_adapter_config_json_round_trip_applies_to_the_bare_backbone(tmp_path):
    allocation = measured_allocation(tiny_bert())
    allocation.to_lora_config(peft.LoraConfig(r=4, lora_alpha=8)).save_pretrained(tmp_path)
    config = peft.LoraConfig.from_pretrained(tmp_path)
    target = same_backbone(BertModel)
    assert_exact_ranks(peft.get_peft_model(target, config), target, allocation)


def test_unmatched_keys_are_named():
    allocation = measured_allocation(tiny_bert())
    with pytest.raises(ValueError, match=r"no module 'encoder\.layer\.0\.attention\.self\.query'"):
        senslora.apply_allocation(tiny_gpt2(), allocation)


def test_a_key_matching_two_modules_is_refused():
    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right = (BertModel(tiny_bert().config) for _ in range(2))

    allocation = measured_allocation(tiny_bert())
    with pytest.raises(ValueError, match="match several modules"):
        senslora.apply_allocation(TwoTowers(), allocation)


def test_backbone_survives_save_and_load(tmp_path):
    allocation = measured_allocation(tiny_bert())
    allocation.save(str(tmp_path))
    loaded = senslora.load_allocation(tmp_path)
    assert loaded.backbone == "bert"
    assert loaded.relative_ranks() == allocation.relative_ranks()
    data = json.loads((tmp_path / "allocation.json").read_text())
    data["backbone"] = 3
    (tmp_path / "allocation.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'backbone' to be a dotted module path"):
        senslora.load_allocation(tmp_path)


def test_a_file_without_backbone_loads_and_is_fitted_to_the_target(tmp_path):
    """Files written before the backbone was recorded hold full names and no 'backbone' key."""
    allocation = measured_allocation(tiny_bert())
    allocation.save(str(tmp_path))
    data = json.loads((tmp_path / "allocation.json").read_text())
    del data["backbone"]
    (tmp_path / "allocation.json").write_text(json.dumps(data))
    old = senslora.load_allocation(tmp_path)
    assert old.backbone == "" and old.relative_ranks() == old.ranks
    same = tiny_bert()
    assert_exact_ranks(senslora.apply_allocation(same, old), same, allocation)
    bare = same_backbone(BertModel)  # needs the backbone inferred from BertModel's prefix
    assert_exact_ranks(senslora.apply_allocation(bare, old), bare, allocation)


def committed_allocation_files() -> list[Path]:
    return sorted(RESULTS.glob("**/allocation.json"))


def test_every_committed_allocation_file_still_loads():
    files = committed_allocation_files()
    assert len(files) >= 10, f"expected the committed benchmark allocations, found {len(files)}"
    backbones = set()
    for path in files:
        allocation = senslora.load_allocation(path)
        recorded = json.loads(path.read_text()).get("backbone", "")
        assert allocation.backbone == recorded  # older files hold no backbone: ""
        backbones.add(allocation.backbone)
        config = allocation.to_lora_config()
        expected = {n for n, r in allocation.relative_ranks().items() if r > 0}
        assert set(config.target_modules) == expected
        if allocation.backbone:
            assert all(not n.startswith(allocation.backbone + ".") for n in expected)
    assert "" in backbones, "the files written before the backbone was recorded must still load"


@pytest.mark.real_model
def test_committed_minilm_allocation_applies_to_the_shipped_minilm():
    from transformers import AutoModel

    minilm = pytest.importorskip("senslora.data.assets").minilm_path
    try:
        target = AutoModel.from_pretrained(minilm())
    except (FileNotFoundError, OSError):
        pytest.skip("the MiniLM package is not installed (make setup)")
    path = RESULTS / "glue-minilm" / "glue-rte" / "senslora" / "seed0" / "allocation.json"
    allocation = senslora.load_allocation(path)
    assert next(iter(allocation.ranks)).startswith("bert.")
    peft_model = senslora.apply_allocation(target, allocation)
    expected = {n.removeprefix("bert."): r for n, r in allocation.ranks.items() if r > 0}
    assert injected_ranks(peft_model) == expected


def minilm_folder() -> str:
    from senslora.data.assets import minilm_path

    try:
        folder = str(minilm_path())
    except (FileNotFoundError, OSError):
        pytest.skip("the MiniLM package is not installed (make setup)")
    if not Path(folder, "config.json").exists():
        pytest.skip("the MiniLM package is not installed (make setup)")
    return folder


def minilm_batches(folder: str) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["A quiet river runs past the old mill.", "Prices rose sharply.", "Fine.", "Yes!"]
    return [dict(tokenizer(texts[i : i + 2], padding=True, return_tensors="pt")) for i in (0, 2)]


@pytest.mark.real_model
def test_one_minilm_allocation_applies_to_three_head_classes_and_sentence_transformers():
    from transformers import (
        AutoModel,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    folder = minilm_folder()
    measured = AutoModelForSequenceClassification.from_pretrained(folder)
    stats = collect_statistics(measured, minilm_batches(folder))
    allocation = allocate_ranks(stats, AllocationConfig(avg_rank=4), backbone="bert")
    assert len(set(allocation.ranks.values())) > 1
    lora_config = allocation.to_lora_config(peft.LoraConfig(r=4, lora_alpha=8))
    for auto in (AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification):
        target = auto.from_pretrained(folder)
        assert_exact_ranks(peft.get_peft_model(target, lora_config), target, allocation)

    sentence_transformers = pytest.importorskip("sentence_transformers")
    encoder = sentence_transformers.SentenceTransformer(folder, device="cpu")
    peft.inject_adapter_in_model(lora_config, encoder)  # in place: still a SentenceTransformer
    assert backbone_prefix(encoder) == "0.model"
    assert_exact_ranks(encoder, encoder, allocation)


def test_one_call_equals_the_four_steps_on_a_dataloader():
    batches = token_batches(num_batches=2)
    expected = measured_allocation(tiny_bert())  # avg_rank 4 = the LoraConfig's r
    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # batches as they are
    peft_model = senslora.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8), loader)
    assert isinstance(peft_model, peft.PeftModel)
    assert injected_ranks(peft_model) == {n: r for n, r in expected.ranks.items() if r > 0}


class DictInput(nn.Module):
    """A model whose forward takes the batch dict itself (as sentence-transformers do)."""

    def __init__(self):
        super().__init__()
        self.encoder = tiny_bert()

    def forward(self, features: dict) -> torch.Tensor:
        return self.encoder(**features).logits


def test_forward_and_input_hooks_measure_the_same_statistics():
    rows = [{**b, "text": ["raw"] * len(b["input_ids"])} for b in token_batches(num_batches=2)]
    allocation = senslora.compute_allocation(
        DictInput(),
        rows,
        peft.LoraConfig(r=4),
        forward_fn=lambda model, batch: model(batch),
        prepare_model_inputs_fn=lambda row: {k: v for k, v in row.items() if k != "text"},
    )
    direct = measured_allocation(tiny_bert())
    assert allocation.backbone == "encoder.bert"
    assert allocation.relative_ranks() == direct.relative_ranks()
    for name in direct.relative_ranks():
        assert allocation.metrics["encoder.bert." + name] == pytest.approx(
            direct.metrics["bert." + name], rel=1e-5
        )


def test_lora_config_target_modules_choose_the_measured_modules():
    loader = token_batches(num_batches=2)
    config = peft.LoraConfig(r=2, target_modules=["query", "value"])
    peft_model = senslora.get_peft_model(tiny_bert(), config, loader)
    names = set(injected_ranks(peft_model))
    assert names and all(n.endswith((".query", ".value")) for n in names)
    assert sum(injected_ranks(peft_model).values()) == 2 * len(names)  # budget: r per module
    with pytest.raises(ValueError, match="expected the modules to be chosen by target_modules"):
        senslora.get_peft_model(
            tiny_bert(),
            peft.LoraConfig(r=2, layers_to_transform=[0], target_modules=["query"]),
            loader,
        )
    with pytest.raises(ValueError, match="expected a peft.LoraConfig, got dict"):
        senslora.get_peft_model(tiny_bert(), {"r": 2}, loader)
