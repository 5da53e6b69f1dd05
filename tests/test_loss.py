"""Training loss: chunked and liger cross-entropy agree with the plain one and with Transformers' loss."""

import pytest
import torch
from test_modeling import VOCAB, build_draft, build_target, random_ids
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.utils import is_liger_kernel_available

from glide_hf import GlideConfigError
from glide_hf.loss import causal_lm_loss, resolve_loss_implementation


def _inputs(seed=0, tokens=37):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, tokens, 64, generator=generator, requires_grad=True)
    head = torch.nn.Linear(64, VOCAB, bias=False)
    head.weight.requires_grad_(False)
    labels = torch.randint(0, VOCAB, (2, tokens), generator=generator)
    labels[0, :5] = -100
    labels[1, -7:] = -100
    return hidden, head, labels


def test_plain_loss_equals_transformers_causal_lm_loss():
    hidden, head, labels = _inputs()
    ours = causal_lm_loss(hidden, head, labels, implementation="plain")
    reference = ForCausalLMLoss(head(hidden).float(), labels, vocab_size=VOCAB)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    ours = causal_lm_loss(hidden, head, labels, implementation="plain", num_items_in_batch=50)
    reference = ForCausalLMLoss(head(hidden).float(), labels, vocab_size=VOCAB, num_items_in_batch=50)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
def test_chunked_loss_and_gradient_equal_the_plain_ones(chunk_size):
    hidden, head, labels = _inputs()
    plain = causal_lm_loss(hidden, head, labels, implementation="plain")
    (plain_grad,) = torch.autograd.grad(plain, hidden)
    chunked = causal_lm_loss(hidden, head, labels, implementation="chunked", chunk_size=chunk_size)
    (chunked_grad,) = torch.autograd.grad(chunked, hidden)
    # fp32 sums of ~70 per-token losses in another order: rounding up to a few 1e-7 relative.
    torch.testing.assert_close(chunked, plain, atol=0, rtol=1e-6)
    torch.testing.assert_close(chunked_grad, plain_grad, atol=1e-7, rtol=0)


def test_training_forward_returns_loss_without_full_logits():
    draft = build_draft(build_target(), loss_implementation="chunked").train()
    ids = random_ids(2, 10)
    out = draft(ids, labels=ids)
    assert out.logits is None and out.loss.requires_grad
    out = draft(ids, labels=ids, return_logits=True)
    assert out.logits.shape == (2, 10, VOCAB)


def test_forward_loss_matches_the_logits_it_returns():
    draft = build_draft(build_target(), loss_implementation="chunked")
    ids = random_ids(2, 10)
    out = draft(ids, labels=ids, return_logits=True)
    torch.testing.assert_close(out.loss, ForCausalLMLoss(out.logits, ids, vocab_size=VOCAB), atol=1e-5, rtol=0)


def test_liger_on_cpu_is_a_clear_error():
    if is_liger_kernel_available():
        with pytest.raises(GlideConfigError, match="CUDA"):
            resolve_loss_implementation("liger", torch.device("cpu"))
    else:
        with pytest.raises(ImportError, match=r"glide-hf\[liger\]"):
            resolve_loss_implementation("liger", torch.device("cpu"))


def test_auto_loss_is_chunked_on_cpu():
    assert resolve_loss_implementation("auto", torch.device("cpu")) == "chunked"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not is_liger_kernel_available(), reason="needs liger-kernel")
def test_liger_loss_and_gradient_equal_the_plain_ones_on_cuda():
    hidden, head, labels = _inputs(tokens=300)
    hidden = hidden.detach().cuda().requires_grad_(True)
    head, labels = head.cuda(), labels.cuda()
    plain = causal_lm_loss(hidden, head, labels, implementation="plain")
    (plain_grad,) = torch.autograd.grad(plain, hidden)
    liger = causal_lm_loss(hidden, head, labels, implementation="liger")
    (liger_grad,) = torch.autograd.grad(liger, hidden)
    # fp32 throughout; liger accumulates per chunk in another order (1e-5 relative).
    torch.testing.assert_close(liger, plain, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(liger_grad, plain_grad, atol=1e-6, rtol=1e-4)
    assert resolve_loss_implementation("auto", hidden.device) == "liger"
