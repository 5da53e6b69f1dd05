"""LoRA on a GLIDE draft (issue 4, item 6): `glide_lora_config` adapts the draft layer only, never the frozen target;
adapters save, load and merge; an adapted draft decodes exactly (stock assisted decoding and `draft.generate`) and
trains with `Trainer`."""

import re

import pytest
import torch
from safetensors import safe_open
from transformers import Trainer, TrainingArguments

import glide_hf.lora
from glide_hf import GlideForCausalLM, GlideModel, PeftConfigError
from glide_hf.lora import DRAFT_LORA_MODULES, draft_lora_target_pattern, glide_lora_config

peft = pytest.importorskip("peft")

LORA_RANK = 4
# Merging adds B @ A into the base weight, so the merged forward sums in another order than base + adapter: fp32
# rounding differences of a few ulps per layer, amplified by the frozen LM head's logits (|logit| < 10 here).
MERGE_ATOL = 1e-5
PROMPT_LENGTH = 9
MAX_NEW_TOKENS = 16


def draft_linear_names(prefix: str = "model.") -> set[str]:
    return {f"{prefix}layer.{group}.{name}" for group, names in DRAFT_LORA_MODULES.items() for name in names}


def expected_lora_parameters(prefix: str = "base_model.model.model.") -> set[str]:
    return {f"{module}.lora_{part}.default.weight" for module in draft_linear_names(prefix) for part in ("A", "B")}


def target_state(target) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in target.state_dict().items()}


def randomize_lora_b(peft_model, seed: int = 0) -> None:
    """PEFT starts `lora_B` at zero (the adapter is a no-op); random values make the adapted draft differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def prompt_ids(seed: int = 0, length: int = PROMPT_LENGTH) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (1, length), generator=generator)


@pytest.fixture
def adapted(make_target, make_draft, tmp_path):
    """`(target, base draft state, peft draft)`: a llama target, its draft (also saved to `tmp_path / "base"`
    before adaptation), and the draft with a random LoRA."""
    target = make_target("llama")
    draft = make_draft(target).eval()
    draft.save_pretrained(tmp_path / "base")
    base_state = {name: tensor.clone() for name, tensor in draft.state_dict().items()}
    peft_draft = peft.get_peft_model(draft, glide_lora_config(r=LORA_RANK))
    randomize_lora_b(peft_draft)
    return target, base_state, peft_draft.eval()


# --- the config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_adapters_go_on_the_draft_layer_and_never_on_the_target(family, make_target, make_draft):
    target = make_target(family)
    before = target_state(target)
    peft_draft = peft.get_peft_model(make_draft(target), glide_lora_config(r=LORA_RANK))
    names = {name for name, _ in peft_draft.named_parameters()}
    assert not [name for name in names if "lora_" in name and ".target." in name]
    trainable = {name for name, parameter in peft_draft.named_parameters() if parameter.requires_grad}
    assert trainable == expected_lora_parameters()
    assert not any(parameter.requires_grad for parameter in target.parameters())
    after = target.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_target_pattern_matches_draft_linears_only(make_target, make_draft):
    pattern = draft_lora_target_pattern()
    draft = make_draft(make_target("qwen2"))
    module_names = [name for name, _ in draft.named_modules()]
    assert {name for name in module_names if re.fullmatch(pattern, name)} == draft_linear_names()
    wrapped = [f"base_model.model.{name}" for name in module_names]
    assert {name for name in wrapped if re.fullmatch(pattern, name)} == draft_linear_names("base_model.model.model.")
    # The target's own attention and MLP projections, reached through the draft, never match.
    assert any(name.startswith("model.target.") and name.endswith("q_proj") for name in module_names)
    assert not [name for name in module_names + wrapped if ".target." in f".{name}" and re.fullmatch(pattern, name)]
    # A bare `GlideModel` (from `AutoModel`) names its layer `layer.*`.
    glide_model = GlideModel(draft.config, target_model=draft.target)
    matched = {name for name, _ in glide_model.named_modules() if re.fullmatch(pattern, name)}
    assert matched == draft_linear_names(prefix="")


def test_modules_selects_the_adapted_groups(make_target, make_draft):
    peft_draft = peft.get_peft_model(
        make_draft(make_target("llama")), glide_lora_config(r=LORA_RANK, modules=("cross_attn",))
    )
    trainable = {name for name, parameter in peft_draft.named_parameters() if parameter.requires_grad}
    assert trainable == {
        f"base_model.model.model.layer.cross_attn.{proj}.lora_{part}.default.weight"
        for proj in ("q_proj", "o_proj")
        for part in ("A", "B")
    }


def test_unknown_module_group_is_rejected():
    with pytest.raises(PeftConfigError, match=r"Unknown draft module group\(s\) \['attention'\].*`self_attn`"):
        glide_lora_config(modules=("self_attn", "attention"))
    with pytest.raises(PeftConfigError, match="`modules` is empty"):
        glide_lora_config(modules=())


def test_target_modules_cannot_be_overridden():
    with pytest.raises(PeftConfigError, match="`target_modules` is set by `glide_lora_config`"):
        glide_lora_config(target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bias="all"), "`bias='all'` trains every bias"),
        (dict(target_parameters=["model.target.model.layers.0.mlp.up_proj.weight"]), "`target_parameters`"),
        (dict(trainable_token_indices=[1, 2]), "`trainable_token_indices`"),
        (dict(layers_to_transform=[0]), "`layers_to_transform`"),
        (dict(r=0), "rank `r` must be a positive integer"),
    ],
)
def test_settings_that_would_reach_the_frozen_target_are_rejected(kwargs, message):
    with pytest.raises(PeftConfigError, match=message):
        glide_lora_config(**kwargs)


def test_lora_only_bias_trains_no_target_parameter(make_target, make_draft):
    from peft import get_peft_model

    peft_draft = get_peft_model(make_draft(make_target("qwen2")), glide_lora_config(bias="lora_only"))
    trainable = [name for name, parameter in peft_draft.named_parameters() if parameter.requires_grad]
    assert trainable and not any(".target." in name for name in trainable)


def test_modules_to_save_may_name_draft_layer_norms_only(make_target, make_draft):
    with pytest.raises(PeftConfigError, match="'norm' is not a norm of the draft layer"):
        glide_lora_config(modules_to_save=["norm"])
    target = make_target("llama")
    config = glide_lora_config(
        r=LORA_RANK, modules_to_save=["input_layernorm", "layer.post_cross_attention_layernorm"]
    )
    peft_draft = peft.get_peft_model(make_draft(target), config)
    trainable = {name for name, parameter in peft_draft.named_parameters() if parameter.requires_grad}
    assert not [name for name in trainable if ".target." in name]
    assert {name for name in trainable if "lora_" not in name} == {
        "base_model.model.model.layer.input_layernorm.modules_to_save.default.weight",
        "base_model.model.model.layer.post_cross_attention_layernorm.modules_to_save.default.weight",
    }


def test_missing_peft_raises_an_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setattr(glide_hf.lora, "is_peft_available", lambda: False)
    with pytest.raises(ImportError, match=re.escape('pip install "glide-hf[train]"')):
        glide_lora_config()


# --- save, load, merge -----------------------------------------------------------------------------------------------


def test_adapter_files_hold_no_target_tensors_and_reload_to_equal_logits(adapted, make_target, make_draft, tmp_path):
    target, _, peft_draft = adapted
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    peft_draft.save_pretrained(adapter_dir)
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert keys and all("lora_" in key and ".layer." in key for key in keys)
    assert not [key for key in keys if "target" in key]

    fresh_target = make_target("llama")
    reloaded = peft.PeftModel.from_pretrained(
        GlideForCausalLM.from_pretrained(base_dir, target_model=fresh_target), adapter_dir
    ).eval()
    ids = prompt_ids()
    with torch.no_grad():
        assert torch.equal(peft_draft(ids).logits, reloaded(ids).logits)


def test_merge_and_unload_gives_a_glide_draft_with_the_adapted_logits(adapted):
    target, base_state, peft_draft = adapted
    ids = prompt_ids()
    with torch.no_grad():
        adapted_logits = peft_draft(ids).logits
    merged = peft_draft.merge_and_unload()
    assert type(merged) is GlideForCausalLM
    assert merged.target is target
    assert not [name for name, _ in merged.named_modules() if "lora_" in name]
    with torch.no_grad():
        merged_logits = merged(ids).logits
    torch.testing.assert_close(merged_logits, adapted_logits, atol=MERGE_ATOL, rtol=0)
    # The adapter is not a no-op: the merged draft differs from the base draft.
    assert not torch.equal(
        merged.state_dict()["model.layer.mlp.down_proj.weight"], base_state["model.layer.mlp.down_proj.weight"]
    )


# --- decoding --------------------------------------------------------------------------------------------------------


def test_greedy_assisted_output_with_a_lora_draft_equals_target_output(adapted):
    target, _, peft_draft = adapted
    for seed in range(2):
        ids = prompt_ids(seed)
        expected = target.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        assisted = target.generate(ids, assistant_model=peft_draft, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        assert torch.equal(expected, assisted)


def test_greedy_engine_output_of_a_merged_lora_draft_equals_target_output(adapted):
    target, _, peft_draft = adapted
    merged = peft_draft.merge_and_unload()
    prompts = [prompt_ids(seed, length)[0] for seed, length in ((0, 4), (1, 11))]
    width = max(len(prompt) for prompt in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    out = merged.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    for row, prompt in enumerate(prompts):
        expected = target.generate(prompt[None], max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, len(prompt) :]
        assert torch.equal(out[row, width : width + len(expected)], expected)


# --- training --------------------------------------------------------------------------------------------------------


class _CountingData(torch.utils.data.Dataset):
    """Sequences counting up by one from a random start: each token fixes the next, so the loss can fall fast."""

    def __init__(self, num_sequences: int = 32, length: int = 16, period: int = 61) -> None:
        starts = torch.randint(0, period, (num_sequences, 1), generator=torch.Generator().manual_seed(0))
        self.input_ids = 3 + (starts + torch.arange(length)) % period

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index]}


def eval_loss(model, data: _CountingData) -> float:
    """Loss on all of `data` in eval mode (draft lag 1, no dropout): deterministic, unlike the logged train losses."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=data.input_ids, labels=data.input_ids).loss.item()


def test_trainer_lowers_the_loss_of_a_lora_draft_and_leaves_target_and_base_weights(make_target, make_draft, tmp_path):
    target = make_target("llama")
    target_before = target_state(target)
    draft = make_draft(target)
    base_before = {name: tensor.clone() for name, tensor in draft.model.layer.state_dict().items()}
    peft_draft = peft.get_peft_model(draft, glide_lora_config(r=8, lora_alpha=16))
    data = _CountingData()
    loss_before = eval_loss(peft_draft, data)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=16,
        per_device_train_batch_size=8,
        learning_rate=0.02,
        lr_scheduler_type="constant",
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=peft_draft, args=args, train_dataset=data).train()
    loss_after = eval_loss(peft_draft, data)
    assert loss_after < loss_before - 0.3, (loss_before, loss_after)  # 6.24 -> 5.59 when written
    assert all(torch.equal(tensor, target.state_dict()[name]) for name, tensor in target_before.items())
    base_after = peft_draft.get_base_model().model.layer.state_dict()
    for name, tensor in base_before.items():  # wrapped linears keep their base weight under `base_layer.`
        key = name if name in base_after else name.replace(".weight", ".base_layer.weight")
        key = key if key in base_after else name.replace(".bias", ".base_layer.bias")
        assert torch.equal(tensor, base_after[key]), name
