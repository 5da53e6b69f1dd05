"""Targets with weight-only quantized linear layers (bitsandbytes, GPTQ, AWQ, HQQ and torchao replace `nn.Linear`
with modules of their own), the LM head included: drafting, verification and the training loss run the target's
modules as they are, and greedy output stays the quantized target's own.

`Int8WeightLinear` stands in for those libraries on the CPU: int8 weights with one scale per output row, dequantized
in every forward. It is deterministic per token, as weight-only quantization is. (Quantizing the activations per
tensor, as `torch.ao`'s dynamic quantization does, makes a token's logits depend on the other tokens of the same
forward: no speculative method is exact with such a target, the stock assisted decoding of Transformers included.)
"""

import pytest
import torch
from test_engine import STRATEGIES, left_pad
from test_modeling import VOCAB, build_draft, build_target, random_ids
from torch import nn

from glide_hf.loss import causal_lm_loss, head_logits, linear_head_weights


class Int8WeightLinear(nn.Module):
    """A weight-only int8 linear layer: not an `nn.Linear`, and without a floating-point `weight`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        self.register_buffer("qweight", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, (self.qweight.float() * self.scale).to(x.dtype), self.bias)


def quantize(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8WeightLinear(child))
        else:
            quantize(child)
    return module


@pytest.fixture
def quantized_pair():
    target = build_target()
    draft = build_draft(target)
    quantize(target)  # after the draft is built: its own layer stays in floating point
    assert isinstance(target.lm_head, Int8WeightLinear) and linear_head_weights(target.lm_head) is None
    return target, draft


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_greedy_engine_output_equals_the_quantized_target(quantized_pair, strategy):
    target, draft = quantized_pair
    prompts = [random_ids(1, length, seed=length)[0] for length in (6, 13)]
    ids, mask = left_pad(prompts)
    settings = dict(max_new_tokens=20, do_sample=False, eos_token_id=None)
    out = draft.generate(ids, attention_mask=mask, **settings, **STRATEGIES[strategy])
    for row, prompt in enumerate(prompts):
        expected = target.generate(prompt[None], **settings)[0, prompt.shape[0] :]
        assert torch.equal(out[row, ids.shape[1] :], expected), row


def test_a_draft_vocabulary_with_a_quantized_head_keeps_the_output(quantized_pair):
    target, draft = quantized_pair
    draft.set_draft_vocabulary(range(VOCAB // 2))
    prompt = random_ids(2, 9)
    settings = dict(max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert torch.equal(draft.generate(prompt, **settings), target.generate(prompt, **settings))


def test_stock_assisted_decoding_with_a_quantized_target(quantized_pair):
    target, draft = quantized_pair
    prompt = random_ids(1, 10)
    settings = dict(max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert torch.equal(target.generate(prompt, assistant_model=draft, **settings), target.generate(prompt, **settings))


def test_the_loss_through_a_quantized_head_equals_the_loss_through_its_dequantized_weights():
    head = Int8WeightLinear(nn.Linear(16, VOCAB))
    dequantized = nn.Linear(16, VOCAB)
    with torch.no_grad():
        dequantized.weight.copy_(head.qweight.float() * head.scale)
        dequantized.bias.copy_(head.bias)
    hidden = torch.randn(2, 11, 16, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 11))
    labels[0, :3] = -100
    reference = causal_lm_loss(hidden, dequantized, labels, implementation="plain")
    (reference_grad,) = torch.autograd.grad(reference, hidden)
    for implementation in ("plain", "chunked"):
        loss = causal_lm_loss(hidden, head, labels, implementation=implementation, chunk_size=5)
        (grad,) = torch.autograd.grad(loss, hidden)
        torch.testing.assert_close(loss, reference)
        torch.testing.assert_close(grad, reference_grad)
    torch.testing.assert_close(head_logits(hidden, head), dequantized(hidden))


def test_a_draft_on_a_quantized_target_trains(quantized_pair):
    target, draft = quantized_pair
    draft.train()
    ids = random_ids(4, 24)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = draft(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(not p.requires_grad for p in target.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("draft_vocabulary", [False, True])
def test_the_engine_replays_rounds_through_a_quantized_head_on_cuda(quantized_pair, draft_vocabulary):
    """The head, called as a module, inside CUDA graphs (kept between calls): the output stays the target's."""
    target, draft = quantized_pair
    target.cuda()
    draft.cuda()
    if draft_vocabulary:
        draft.set_draft_vocabulary(range(VOCAB // 2))
    settings = dict(max_new_tokens=24, do_sample=False, eos_token_id=None)
    for seed in range(2):  # the second call replays the kept round
        prompt = random_ids(2, 11, seed=seed).cuda()
        expected = target.generate(prompt, **settings)
        assert torch.equal(draft.generate(prompt, use_cuda_graphs=True, draft_strategy="tree", **settings), expected)
