"""CUDA paths: bf16 targets, Trainer on GPU with liger, stock assisted decoding on GPU. Skipped without CUDA."""

import pytest
import torch
from test_engine import left_pad
from test_modeling import VOCAB, build_draft, build_target, random_ids
from transformers import Trainer, TrainingArguments
from transformers.utils import is_liger_kernel_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_assisted_output_equals_target_output_on_cuda(family):
    target = build_target(family).cuda()
    draft = build_draft(target).cuda()
    for seed in range(3):
        prompt = random_ids(1, 20, seed=seed).cuda()
        expected = target.generate(prompt, max_new_tokens=40, do_sample=False)
        assisted = target.generate(prompt, assistant_model=draft, max_new_tokens=40, do_sample=False)
        assert torch.equal(expected, assisted)


def test_eager_and_sdpa_agree_on_cuda():
    draft = build_draft(build_target()).cuda()
    ids = random_ids(2, 64).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    draft.set_attn_implementation("eager")
    eager = draft(ids, draft_lag=2).logits
    draft.set_attn_implementation("sdpa")
    torch.testing.assert_close(eager, draft(ids, draft_lag=2).logits, atol=1e-4, rtol=0)


def test_bfloat16_target_with_float32_draft_drafts_on_cuda():
    target = build_target().to("cuda", torch.bfloat16)
    draft = build_draft(target).cuda()
    prompt = random_ids(1, 16).cuda()
    out = target.generate(prompt, assistant_model=draft, max_new_tokens=32, do_sample=False)
    assert out.shape == (1, 48)


@pytest.mark.skipif(not is_liger_kernel_available(), reason="needs liger-kernel")
def test_trainer_trains_with_liger_on_a_bfloat16_target(tmp_path, monkeypatch):
    import glide_hf.loss as loss_module

    calls = []
    original = loss_module._liger_sum_cross_entropy
    monkeypatch.setattr(loss_module, "_liger_sum_cross_entropy", lambda *a: calls.append(1) or original(*a))
    target = build_target().to("cuda", torch.bfloat16)
    draft = build_draft(target).cuda().train()
    # A learnable corpus: each row counts upwards from a random start.
    starts = torch.randint(3, VOCAB - 40, (256, 1), generator=torch.Generator().manual_seed(0))
    rows = (starts + torch.arange(32)).tolist()
    dataset = [{"input_ids": row, "labels": row} for row in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=60,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        logging_steps=10,
        save_steps=60,
        report_to=[],
        bf16=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=draft, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert calls, "the liger loss was not used"
    assert losses[-1] < losses[0] - 0.5  # from ln(300) = 5.7 at the start
    assert draft.model.layer.mlp.up_proj.weight.dtype == torch.float32


def assert_padded_batch_equals_target(target, draft, **engine_kwargs) -> None:
    """Greedy engine output for a left-padded batch of three prompt lengths equals each row's `target.generate`."""
    prompts = [random_ids(1, length, seed=length)[0].cuda() for length in (5, 17, 30)]
    ids, mask = left_pad(prompts)
    settings = dict(max_new_tokens=32, do_sample=False, eos_token_id=None)
    out = draft.generate(ids, attention_mask=mask, **settings, **engine_kwargs)
    for row, prompt in enumerate(prompts):
        expected = target.generate(prompt[None], **settings)[0, prompt.shape[0] :]
        assert torch.equal(out[row, ids.shape[1] :], expected)


@pytest.mark.parametrize(
    "strategy", [dict(draft_strategy="chain"), dict(draft_strategy="tree", tree_widths=(4, 8, 8))]
)
def test_engine_greedy_batch_equals_target_output_on_cuda(strategy):
    target = build_target().cuda()
    assert_padded_batch_equals_target(target, build_draft(target).cuda(), **strategy)


def test_engine_with_cuda_graphs_equals_eager_engine_when_rows_finish_at_different_times():
    target = build_target().cuda()
    draft = build_draft(target).cuda()
    prompts = torch.stack([random_ids(1, 12, seed=seed)[0] for seed in range(4)]).cuda()
    free = target.generate(prompts[:1], max_new_tokens=40, do_sample=False, eos_token_id=None)[0, 12:]
    eos = int(free[5])  # row 0 stops early; the others go on, so the graph is captured again for fewer rows
    outputs = [
        draft.generate(prompts, max_new_tokens=40, do_sample=False, eos_token_id=eos, use_cuda_graphs=graphs)
        for graphs in (False, True)
    ]
    assert torch.equal(outputs[0], outputs[1])
    for row in range(4):
        expected = target.generate(prompts[row : row + 1], max_new_tokens=40, do_sample=False, eos_token_id=eos)
        assert torch.equal(outputs[1][row, : expected.shape[1]], expected[0])


def test_sampling_with_cuda_graphs_keeps_tokens_in_the_top_k_support():
    target = build_target().cuda()
    draft = build_draft(target).cuda()
    prompt = random_ids(1, 5).cuda()
    with torch.no_grad():
        allowed = target(prompt).logits[0, -1].topk(3).indices
    torch.manual_seed(0)
    out = draft.generate(prompt.repeat(64, 1), max_new_tokens=6, do_sample=True, top_k=3, use_cuda_graphs=True)
    assert torch.isin(out[:, 5], allowed).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("batch", "nodes", "slots"), [(1, 32, 200), (2, 16, 300), (3, 7, 4100), (1, 1, 3000)])
def test_fused_split_tree_attention_equals_the_reference_on_cuda(dtype, batch, nodes, slots):
    """The Triton split attention and torch's varlen flash prefix plus the merge equal the fp32 reference."""
    from glide_hf.static_cache import SlotCache
    from glide_hf.tree_attention import TreeAttentionInputs, split_attention_kernel, tree_attention_forward

    heads, kv_heads, dim = 32, 8, 128
    assert split_attention_kernel(torch.device("cuda"), dtype, dim) == "triton"
    generator = torch.Generator(device="cuda").manual_seed(batch)
    cache = SlotCache.allocate(1, batch, kv_heads, slots, dim, dtype, "cuda")
    layer = cache.layers[0]
    layer.keys.copy_(torch.randn(layer.keys.shape, device="cuda", generator=generator))
    layer.values.copy_(torch.randn(layer.values.shape, device="cuda", generator=generator))
    lengths = torch.randint(1, slots - nodes, (batch,), device="cuda", generator=generator)
    visible = torch.rand(batch, nodes, nodes, device="cuda", generator=generator) < 0.5
    visible = (visible | torch.eye(nodes, dtype=torch.bool, device="cuda")).tril()
    query = torch.randn(batch, nodes, heads, dim, device="cuda", dtype=dtype, generator=generator).transpose(1, 2)
    node_slots = lengths[:, None] + torch.arange(nodes, device="cuda")[None]
    outputs = {}
    for kernel in ("triton", "flash", "torch"):
        inputs = TreeAttentionInputs.build(lengths, node_slots, visible, slots, kernel)
        outputs[kernel], _ = tree_attention_forward(None, query, layer.keys, layer.values, None, glide_tree=inputs)
    reference = outputs["torch"].float()
    torch.testing.assert_close(outputs["triton"].float(), reference, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(outputs["flash"].float(), reference, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("kernel", "function"), [("flash", "_flash_prefix"), ("triton", "tree_attention_triton")])
def test_engine_verifies_with_each_fused_split_kernel_on_cuda(monkeypatch, kernel, function):
    """With a bf16 target on CUDA the split verify (here from the first slot on) runs the requested kernel, with CUDA
    graphs, and the greedy output equals the masked engine's in fp16 on a short output."""
    from glide_hf import tree_attention

    calls = []
    original = getattr(tree_attention, function)
    monkeypatch.setattr(tree_attention, function, lambda *args: calls.append(1) or original(*args))
    target = build_target().to("cuda", torch.bfloat16)
    draft = build_draft(target).to("cuda", torch.bfloat16)
    prompt = random_ids(2, 24).cuda()
    settings = dict(max_new_tokens=16, do_sample=False, draft_strategy="tree", tree_widths=(2, 3))
    out = draft.generate(prompt, split_verify_min_slots=0, split_kernel=kernel, **settings)
    assert out.shape[0] == 2 and out.shape[1] > 24 and calls


@pytest.mark.parametrize(
    "strategy",
    [dict(draft_strategy="chain"), dict(draft_strategy="tree", tree_widths=(4, 8, 8)), dict(draft_strategy="cape")],
)
def test_engine_with_the_triton_split_verify_equals_the_target_in_float32_on_cuda(monkeypatch, strategy):
    """Greedy output through the Triton split verify (fp32, no TF32), batch of padded prompts, equals each row's
    `target.generate`; the kernel really runs."""
    from glide_hf import tree_attention

    calls = []
    original = tree_attention.tree_attention_triton
    monkeypatch.setattr(tree_attention, "tree_attention_triton", lambda *a: calls.append(1) or original(*a))
    target = build_target().cuda()
    draft = build_draft(target).cuda()
    assert_padded_batch_equals_target(target, draft, split_kernel="triton", split_verify_min_slots=0, **strategy)
    assert calls


def test_fused_for_inference_runs_the_triton_norm_with_the_same_logits_on_cuda(monkeypatch):
    """On CUDA with Triton, `fused_for_inference` sends every draft RMSNorm and rotary embedding through the Triton
    kernels and fuses the projections, and the bf16 draft's logits stay those of the plain forward (bf16 rounding
    aside)."""
    from glide_hf import modeling_glide

    calls, rotations = [], []
    original = modeling_glide.triton_rms_norm
    monkeypatch.setattr(modeling_glide, "triton_rms_norm", lambda *args: calls.append(1) or original(*args))
    original_rotary = modeling_glide.triton_rotary
    monkeypatch.setattr(modeling_glide, "triton_rotary", lambda *args: rotations.append(1) or original_rotary(*args))
    draft = build_draft(build_target().cuda()).to("cuda", torch.bfloat16)
    ids = random_ids(2, 24).cuda()
    with torch.no_grad():
        expected = draft(ids, draft_lag=2).logits.float()
        with draft.fused_for_inference():
            got = draft(ids, draft_lag=2).logits.float()
    assert len(calls) >= 3
    assert len(rotations) == 2  # the self-attention's query and key heads together, the cross-attention's query
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_engine_runs_the_targets_norms_in_triton_and_keeps_its_output_on_cuda(monkeypatch, family):
    """The engine verifies with the target's RMSNorms as Triton kernels (`triton_rms_norms`): a bf16 target's logits
    stay those of its own norms (bf16 rounding aside), and the fp32 engine's greedy output is still the target's."""
    from glide_hf import norm_kernel

    calls = []
    original = norm_kernel.triton_rms_norm
    monkeypatch.setattr(norm_kernel, "triton_rms_norm", lambda *args: calls.append(1) or original(*args))
    ids = random_ids(2, 24).cuda()
    target = build_target(family).to("cuda", torch.bfloat16)
    with torch.no_grad():
        expected = target(ids).logits.float()
        with norm_kernel.triton_rms_norms(target) as taken_over:
            got = target(ids).logits.float()
    assert taken_over > 0 and len(calls) == taken_over
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)
    target = build_target(family).cuda()
    draft = build_draft(target).cuda()
    prompt = random_ids(1, 40, seed=7).cuda()
    calls.clear()
    out = draft.generate(prompt, max_new_tokens=32, num_draft_tokens=4, do_sample=False, eos_token_id=None)
    assert calls
    assert torch.equal(out, target.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None))


def test_fused_drafting_reads_the_target_cache_through_the_triton_prefix_kernel_on_cuda(monkeypatch):
    """Inside `fused_for_inference`, drafting with `target_lengths` (as the engine drafts) runs the cross-attention
    through the Triton prefix kernel, with the logits of the masked sdpa path (bf16 rounding aside)."""
    from transformers import DynamicCache

    from glide_hf import modeling_glide

    calls = []
    original = modeling_glide.prefix_attention
    monkeypatch.setattr(modeling_glide, "prefix_attention", lambda *args: calls.append(1) or original(*args))
    target = build_target().to("cuda", torch.bfloat16)
    draft = build_draft(target).to("cuda", torch.bfloat16)
    ids = random_ids(2, 300).cuda()
    lengths = torch.tensor([180, 300], device="cuda")
    target_cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target(ids, cache=target_cache, use_cache=True)
        fed = ids[:, -2:]
        expected = draft(fed, target_cache=target_cache, target_lengths=lengths).logits
        assert not calls
        with draft.fused_for_inference():
            got = draft(fed, target_cache=target_cache, target_lengths=lengths).logits
    assert len(calls) == 1
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)


def test_a_round_captured_without_warm_up_gets_its_triton_kernels_compiled_first_on_cuda(monkeypatch):
    """A later call with a longer prompt and chain (other sizes, other Triton tiling: 2 x 19 query rows per key head
    against 2 x 4) is captured without a warm-up round; the split kernels are launched eagerly first, and the output
    is still the target's."""
    from glide_hf import engine

    launches = []
    original = engine._compile_triton_kernels
    monkeypatch.setattr(engine, "_compile_triton_kernels", lambda *args: launches.append(1) or original(*args))
    target = build_target().cuda()
    draft = build_draft(target).cuda()
    settings = dict(do_sample=False, eos_token_id=None, split_kernel="triton", split_verify_min_slots=0)
    draft.generate(random_ids(1, 8).cuda(), max_new_tokens=16, num_draft_tokens=3, **settings)
    prompt = random_ids(1, 300, seed=5).cuda()
    launches.clear()
    out = draft.generate(prompt, max_new_tokens=24, num_draft_tokens=18, **settings)
    assert launches
    assert torch.equal(out, target.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None))


def test_heuristic_schedule_with_cuda_graphs_equals_the_eager_engine_on_cuda():
    """One graph per chain length: replaying them gives what eager rounds give."""
    target = build_target().cuda()
    draft = build_draft(target).cuda()
    prompt = random_ids(2, 12).cuda()
    settings = dict(max_new_tokens=40, do_sample=False, num_draft_tokens=6, num_draft_tokens_schedule="heuristic")
    graphs = draft.generate(prompt, use_cuda_graphs=True, **settings)
    assert torch.equal(graphs, draft.generate(prompt, use_cuda_graphs=False, **settings))


def test_repetition_penalty_with_cuda_graphs_equals_the_target_on_cuda():
    """The penalty runs on the device, so rounds are captured as graphs; greedy output stays the target's."""
    target = build_target(vocab_size=40).cuda()
    draft = build_draft(target).cuda()
    prompt = (random_ids(2, 10) % 40).cuda()
    settings = dict(max_new_tokens=30, do_sample=False, repetition_penalty=1.3, eos_token_id=None)
    expected = target.generate(prompt, **settings)
    assert torch.equal(draft.generate(prompt, use_cuda_graphs=True, draft_strategy="tree", **settings), expected)


def test_later_calls_capture_without_a_warm_up_round_and_keep_greedy_output_on_cuda(monkeypatch):
    """The eager warm-up round runs once per code path per draft; later calls (other shapes) capture straight away."""
    import glide_hf.engine as engine

    target = build_target().cuda()
    draft = build_draft(target).cuda()
    eager_rounds = []
    real_round = engine._round
    monkeypatch.setattr(
        engine, "_round", lambda *a: eager_rounds.append(torch.cuda.is_current_stream_capturing()) or real_round(*a)
    )
    for length, batch in ((9, 1), (23, 2), (40, 3)):  # other slot counts and batch sizes: new graphs each time
        prompt = random_ids(batch, length, seed=length).cuda()
        settings = dict(max_new_tokens=24, do_sample=False, eos_token_id=None)
        out = draft.generate(prompt, use_cuda_graphs=True, draft_strategy="tree", tree_widths=(3, 4), **settings)
        assert torch.equal(out, target.generate(prompt, **settings))
    # First call: one warm-up round (not capturing), then captures only: one per call, and one more each time rows
    # finish at different rounds (fewer rows, new shapes).
    assert eager_rounds[0] is False and all(eager_rounds[1:]) and len(eager_rounds) >= 4, eager_rounds


def test_fractional_forced_acceptance_alternates_under_cuda_graphs_in_every_call_on_cuda():
    """Benchmark-only switch: 3.5 accepts 3, 4, 3, 4... drafts, also in calls whose first round is captured at once."""
    target = build_target().cuda()
    draft = build_draft(target).cuda()
    prompt = random_ids(1, 10).cuda()
    for _ in range(2):  # the second call captures without a warm-up round
        out = draft.generate(
            prompt,
            max_new_tokens=40,
            num_draft_tokens=5,
            forced_acceptance=3.5,
            eos_token_id=None,
            return_dict_in_generate=True,
        )
        accepted = out.accepted_per_round[:-1, 0].tolist()  # the last round may be cut by max_new_tokens
        assert accepted == [3, 4] * (len(accepted) // 2) + [3] * (len(accepted) % 2), accepted


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_the_engine_runs_on_a_gpu_that_is_not_the_current_device():
    """Models and inputs on cuda:1 while cuda:0 is current: the CUDA graphs and the Triton kernels run on cuda:1, and
    the output is the target's. A graph captured on cuda:0 comes first, as other code in the process may: it makes
    torch's process-wide default capture stream there, which a round on cuda:1 must not capture on (the engine hung
    at its first host synchronisation when it did)."""
    counter = torch.zeros(1, device="cuda:0")
    with torch.cuda.device(0):
        other_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(other_graph):
            counter += 1
    assert torch.cuda.graph.default_capture_stream.device == torch.device("cuda:0")
    target = build_target().to("cuda:1")
    draft = build_draft(target).to("cuda:1")
    prompt = random_ids(2, 30).to("cuda:1")
    torch.cuda.set_device(0)
    out = draft.generate(prompt, max_new_tokens=24, num_draft_tokens=4, do_sample=False, eos_token_id=None)
    assert out.device == prompt.device
    assert torch.equal(out, target.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None))


def count_captures(monkeypatch) -> list:
    """Record every CUDA graph capture the engine starts (`torch.cuda.graph` blocks)."""
    captures = []
    original = torch.cuda.graph

    def counting_graph(*args, **kwargs):
        captures.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "graph", counting_graph)
    return captures


def test_a_later_call_with_the_same_settings_replays_the_kept_round_on_cuda(monkeypatch):
    """Prompts of other lengths (within one slot step) and other tokens: later calls capture no round of the full
    batch, and each output equals the eager engine's. Rows that finish early (rounds captured again for fewer rows,
    on new buffers) leave the kept round intact for the next call."""
    from glide_hf import engine

    captured_batches = []
    original = engine._compile_triton_kernels  # runs right before each capture
    monkeypatch.setattr(
        engine,
        "_compile_triton_kernels",
        lambda call, rows: captured_batches.append(len(rows.lengths)) or original(call, rows),
    )
    target = build_target().cuda()
    draft = build_draft(target).cuda()
    tree = dict(draft_strategy="tree", tree_widths=(3, 4))
    draft.generate(random_ids(1, 8).cuda(), max_new_tokens=4, **tree)  # the code path's warm-up round, once
    # Token 5 is row 0's fifth new token in each call and never among rows 1 and 2's (found for these seeds on the
    # CPU): row 0 leaves the batch after a few rounds, the others go on.
    settings = dict(max_new_tokens=40, do_sample=False, eos_token_id=5, **tree)
    for call, (length, seed) in enumerate([(20, 121), (33, 121), (27, 103)]):
        prompts = [random_ids(1, length, seed=seed)[0].cuda()]
        prompts += [random_ids(1, length - 5 * row, seed=length + row)[0].cuda() for row in (1, 2)]
        ids, mask = left_pad(prompts)
        captured_batches.clear()
        out = draft.generate(ids, attention_mask=mask, **settings)
        assert torch.equal(out, draft.generate(ids, attention_mask=mask, use_cuda_graphs=False, **settings))
        if call == 0:
            kept = engine.engine_state(draft).kept_round
            assert captured_batches[0] == 3 and len(captured_batches) > 1, captured_batches  # rows did finish early
        else:
            assert engine.engine_state(draft).kept_round is kept
            assert 3 not in captured_batches, captured_batches


def test_a_kept_round_replays_with_draft_weights_changed_in_place_on_cuda():
    """The fused projections are refreshed into the kept storage at each call: after an in-place change of the
    draft's weights, a replayed round drafts exactly as a freshly captured one (same seed, sampled chains, whose
    acceptance reads the draft's probabilities)."""
    target = build_target().cuda()
    draft = build_draft(target).cuda()
    prompt = random_ids(1, 16).cuda()
    settings = dict(max_new_tokens=48, do_sample=True, temperature=1.5, eos_token_id=None, num_draft_tokens=4)

    def sampled():
        torch.manual_seed(7)
        return draft.generate(prompt, **settings, return_dict_in_generate=True)

    before = sampled()
    with torch.no_grad():
        for module in (draft.model.layer.self_attn, draft.model.layer.mlp):
            for linear in module.modules():
                if isinstance(linear, torch.nn.Linear):
                    linear.weight.mul_(-1.0)
    replayed = sampled()
    draft.release_cuda_graphs()
    fresh = sampled()
    assert torch.equal(replayed.sequences, fresh.sequences)
    assert torch.equal(replayed.accepted_per_round, fresh.accepted_per_round)
    assert not torch.equal(before.sequences, replayed.sequences)  # the change did change the draws


def test_another_slot_step_or_batch_captures_again_and_release_frees_the_memory_on_cuda(monkeypatch):
    import copy

    from glide_hf.engine import GRAPH_SLOT_STEP, engine_state

    target = build_target().cuda()
    draft = build_draft(target).cuda()
    captures = count_captures(monkeypatch)
    settings = dict(max_new_tokens=16, do_sample=False, eos_token_id=None)
    for batch, length in ((1, 10), (1, 10 + GRAPH_SLOT_STEP), (2, 10)):
        prompt = random_ids(batch, length, seed=length).cuda()
        captured_before = len(captures)
        assert torch.equal(draft.generate(prompt, **settings), target.generate(prompt, **settings))
        assert len(captures) > captured_before  # a new signature: captured again
    assert copy.deepcopy(draft).generate(prompt, **settings).shape == (2, 26)  # copies start without graphs
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    draft.release_cuda_graphs()
    assert engine_state(draft).kept_round is None
    assert torch.cuda.memory_allocated() < held
