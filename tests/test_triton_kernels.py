"""The Triton kernels (the split tree attention of `tree_attention_kernel.py`, the RMSNorm of `norm_kernel.py`, the
rotary embedding of `rotary_kernel.py`) against their plain-torch references, run on the CPU by Triton's interpreter
in a child process (the interpreter must be chosen before Triton is imported). Skipped where Triton is not installed
(CI installs no Triton: the CUDA tests in test_gpu.py check the compiled kernels). The plumbing of
`triton_rms_norms` is tested here without Triton."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = [
    # batch, heads, kv_heads, nodes, slots, head size, chunk
    (2, 4, 2, 3, 40, 32, 16),  # chunks past a row's length, a last chunk shorter than the others
    (1, 8, 2, 20, 100, 64, 64),  # 80 query rows per key head: two row blocks
    (3, 6, 3, 5, 70, 16, 128),  # one chunk holds the whole cache
    (1, 2, 1, 70, 90, 24, 32),  # 70 nodes: two tiles of tree keys; a head size that is not a power of two
]


def test_triton_kernels_equal_their_references_in_the_interpreter():
    pytest.importorskip("triton")
    source = Path(__file__).resolve().parent.parent / "src"
    path = os.pathsep.join(filter(None, [str(source), str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    environment = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    result = subprocess.run(
        [sys.executable, __file__], env=environment, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # every attention case in fp16 and fp32, with other tilings, the control, the prefix-only attention in fp16 and
    # fp32, the norm in 4 dtype pairs, the rotary embedding in 3 dtype pairs and 2 layouts
    assert result.stdout.count("ok") == 3 * len(CASES) + 1 + 2 + 4 + 6, result.stdout


@pytest.mark.parametrize("family, norms_per_layer", [("llama", 2), ("qwen3", 4)])  # Qwen3 adds query and key norms
def test_triton_rms_norms_take_over_the_llama_formula_norms_and_give_them_back(monkeypatch, family, norms_per_layer):
    """The plumbing of `triton_rms_norms`, with a counting torch stand-in for the kernel (CI has no Triton): it takes
    over every Llama-formula norm but one already hooked, only without gradients, keeps the logits, and restores
    each norm's own forward on exit."""
    from test_modeling import build_target, random_ids

    from glide_hf import norm_kernel

    calls = []

    def counting_kernel(hidden_states, weight, eps):
        calls.append(hidden_states.shape[-1])
        normalized = torch.nn.functional.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=eps)
        return weight * normalized.to(hidden_states.dtype)

    monkeypatch.setattr(norm_kernel, "triton", object())  # as if installed
    monkeypatch.setattr(norm_kernel, "rms_norm_kernel_serves", lambda hidden_states: True)
    monkeypatch.setattr(norm_kernel, "triton_rms_norm", counting_kernel)
    target = build_target(family)
    hooked = target.model.norm
    hooked.forward = hooked_forward = lambda hidden_states: type(hooked).forward(hooked, hidden_states)
    ids = random_ids(2, 12)
    with torch.no_grad():
        expected = target(ids).logits
    layers = target.config.num_hidden_layers
    with norm_kernel.triton_rms_norms(target) as taken_over:
        assert taken_over == norms_per_layer * layers  # the final norm is hooked
        with torch.no_grad():
            got = target(ids).logits
        assert len(calls) == taken_over
        target(ids)  # with gradients: the norms' own forward
        assert len(calls) == taken_over
    torch.testing.assert_close(got, expected)
    assert hooked.forward is hooked_forward
    assert not any("forward" in vars(module) for name, module in target.named_modules() if module is not hooked)
    with torch.no_grad():
        target(ids)
    assert len(calls) == taken_over


def test_triton_rms_norms_change_nothing_without_triton(monkeypatch):
    from test_modeling import build_target

    from glide_hf import norm_kernel

    monkeypatch.setattr(norm_kernel, "triton", None)
    target = build_target()
    with norm_kernel.triton_rms_norms(target) as taken_over:
        assert taken_over == 0
        assert not any("forward" in vars(module) for module in target.modules())


def _allow_array_loop_bounds() -> None:
    """Triton's interpreter (3.5, 3.6) turns one-element arrays into loop bounds with int(), which NumPy 2.4
    refuses; take the element instead."""
    import triton.runtime.interpreter as interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_with_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_with_index


def check_against_the_reference(dtype, batch, heads, kv_heads, nodes, slots, dim, chunk, config=None) -> None:
    from glide_hf.tree_attention import TreeAttentionInputs, tree_attention_forward

    torch.manual_seed(nodes)
    keys = torch.randn(batch, slots, kv_heads, dim).to(dtype).transpose(1, 2)  # token-major, as the slot cache
    values = torch.randn(batch, slots, kv_heads, dim).to(dtype).transpose(1, 2)
    query = torch.randn(batch, nodes, heads, dim).to(dtype).transpose(1, 2)  # as Transformers' attention gets it
    lengths = torch.randint(1, slots - nodes + 1, (batch,))
    node_slots = lengths[:, None] + torch.randperm(nodes)[None]  # any slot order: the kernel gathers
    visible = ((torch.rand(batch, nodes, nodes) < 0.4) | torch.eye(nodes, dtype=torch.bool)).tril()
    reference_inputs = TreeAttentionInputs.build(lengths, node_slots, visible, slots, "torch")
    expected, _ = tree_attention_forward(
        None, query.float(), keys.float(), values.float(), None, glide_tree=reference_inputs
    )
    inputs = TreeAttentionInputs.build(lengths, node_slots, visible, slots, "triton", chunk, triton_config=config)
    got, _ = tree_attention_forward(None, query, keys, values, None, glide_tree=inputs)
    assert got.dtype == dtype and got.shape == (batch, nodes, heads, dim)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


def check_the_tree_bias_is_read() -> None:
    """Negative control: the kernel reads the tree bias (hiding a node's ancestors changes its output)."""
    from glide_hf.tree_attention import TreeAttentionInputs, tree_attention_forward

    torch.manual_seed(0)
    batch, heads, kv_heads, nodes, slots, dim = 1, 4, 2, 4, 24, 16
    keys = torch.randn(batch, slots, kv_heads, dim).transpose(1, 2)
    values = torch.randn(batch, slots, kv_heads, dim).transpose(1, 2)
    query = torch.randn(batch, nodes, heads, dim).transpose(1, 2)
    lengths = torch.tensor([10])
    node_slots = lengths[:, None] + torch.arange(nodes)[None]
    chain = torch.ones(batch, nodes, nodes, dtype=torch.bool).tril()
    alone = torch.eye(nodes, dtype=torch.bool)[None]
    outputs = [
        tree_attention_forward(
            None, query, keys, values, None, glide_tree=TreeAttentionInputs.build(lengths, node_slots, v, slots, k)
        )[0]
        for v in (chain, alone)
        for k in ("triton", "torch")
    ]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[2], outputs[3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs[0][:, 1:], outputs[2][:, 1:], atol=1e-3)  # node 0 sees only itself in both


def check_prefix_attention(dtype) -> None:
    """The prefix-only launch (the draft's cross-attention) equals masked attention over each row's first `length`
    keys, at query counts of 1 and 3 (few-row tiling, part-tile merge) and 40 (many rows, part-by-part merge); a row
    without keys gets zeros."""
    from glide_hf.tree_attention import prefix_attention

    torch.manual_seed(3)
    batch, heads, kv_heads, slots, dim = 3, 4, 2, 600, 32  # 600 slots: three chunks of at least 256
    keys = torch.randn(batch, slots, kv_heads, dim).to(dtype).transpose(1, 2)
    values = torch.randn(batch, slots, kv_heads, dim).to(dtype).transpose(1, 2)
    lengths = torch.tensor([0, 17, 600])
    for num_queries in (1, 3, 40):
        query = torch.randn(batch, num_queries, heads, dim).to(dtype).transpose(1, 2)
        got = prefix_attention(query, keys, values, lengths, dim**-0.5)
        assert got.dtype == dtype and got.shape == (batch, num_queries, heads, dim)
        assert torch.equal(got[0], torch.zeros_like(got[0]))
        visible = (torch.arange(slots)[None] < lengths[1:, None])[:, None, None]
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[1:].float(), keys[1:].float(), values[1:].float(), attn_mask=visible, enable_gqa=True
        ).transpose(1, 2)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got[1:].float(), expected, atol=tolerance, rtol=tolerance)


def check_rms_norm(dtype: torch.dtype, weight_dtype: torch.dtype) -> None:
    """The Triton RMSNorm equals the draft's `GlideRMSNorm` (Llama's), dtype of the result included."""
    from glide_hf.modeling_glide import GlideRMSNorm
    from glide_hf.norm_kernel import triton_rms_norm

    torch.manual_seed(0)
    norm = GlideRMSNorm(96, eps=1e-5).to(weight_dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
        hidden = torch.randn(2, 5, 96).to(dtype) * 3
        expected = norm(hidden)
        got = triton_rms_norm(hidden, norm.weight, norm.variance_epsilon)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    tolerance = 1e-5 if expected.dtype == torch.float32 and dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


def check_rotary(dtype: torch.dtype, cos_dtype: torch.dtype, heads_dim: int) -> None:
    """The Triton rotary embedding equals `apply_rotary` (Llama's rotation) bit for bit, dtype of the result
    included, on the layouts the draft rotates: heads of a fused q/k/v output `[B, S, H, D]` and a transposed query
    `[B, H, S, D]`; a negative control with the halves swapped must differ."""
    from glide_hf.modeling_glide import apply_rotary
    from glide_hf.rotary_kernel import triton_rotary

    torch.manual_seed(5)
    batch, seq_len, heads, dim = 2, 3, 6, 32
    states = torch.randn(batch, seq_len, heads + 2, dim).to(dtype)[:, :, :heads]  # a slice, as of fused q/k/v
    x = states if heads_dim == 2 else states.transpose(1, 2)
    angles = torch.randn(batch, seq_len, dim // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(cos_dtype), torch.cat([angles.sin()] * 2, -1).to(cos_dtype)
    expected = apply_rotary(x, cos, sin, heads_dim)
    got = triton_rotary(x, cos, sin, heads_dim)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected), (got - expected).abs().max()
    swapped = torch.cat([sin[..., : dim // 2], sin[..., dim // 2 :]], -1).flip(-1)
    assert not torch.equal(triton_rotary(x, cos, swapped, heads_dim), expected)


if __name__ == "__main__":
    _allow_array_loop_bounds()
    for case in CASES:
        for dtype in (torch.float16, torch.float32):
            check_against_the_reference(dtype, *case)
            print("ok", dtype, case, flush=True)
    from glide_hf.tree_attention_kernel import KernelConfig

    for case, config in zip(CASES, [KernelConfig(16, 16, 2, 1), KernelConfig(32, 32, 4, 3)] * 2):
        check_against_the_reference(torch.float16, *case, config=config)
        print("ok", config, case, flush=True)
    check_the_tree_bias_is_read()
    print("ok: the tree bias is read")
    for dtype in (torch.float16, torch.float32):
        check_prefix_attention(dtype)
        print("ok: prefix attention", dtype, flush=True)
    for dtypes in ((torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)):
        check_rms_norm(*dtypes)
        print("ok: rms norm", dtypes, flush=True)
    check_rms_norm(torch.float32, torch.float16)
    print("ok: rms norm float32 input, float16 weight")
    for dtypes in ((torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)):
        for heads_dim in (1, 2):
            check_rotary(*dtypes, heads_dim)
            print("ok: rotary", dtypes, heads_dim, flush=True)
