"""Correctness guards for the fast paths: rows nothing reads are skipped, bypass mode, bf16 autocast, merged
LoRA."""
import copy

import pytest
import torch

from modelscope_utuning.backbone.hooks import TokenState
from modelscope_utuning.model import VisionEfficientTuningModel

TRI = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 6},
       {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 6},
       {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 5}]


def tiny(tuners=TRI, **backbone):
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, tuners=tuners, **backbone)
    torch.manual_seed(0)
    return VisionEfficientTuningModel(backbone=cfg, head={'num_classes': 5})


def randomize_tuners_(model):
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g) * 0.1


EVERY_KIND = [  # original and parallel forms on every OP, incl. VPT-deep prompts that replace each other
    {'type': 'prompt', 'op': 'block', 'form': 'sequential', 'length': 3},
    {'type': 'prefix', 'op': 'mha', 'form': 'sequential', 'length': 4},
    {'type': 'adapter', 'op': 'ffn', 'form': 'sequential', 'dim': 5},
    {'type': 'lora', 'op': 'mha', 'rank': 2},
    {'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 6, 'scale': 'input'},
    {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 5},
    {'type': 'prompt', 'op': 'ffn', 'form': 'parallel', 'length': 2},
    {'type': 'bitfit'}]


def all_rows_reference(vit, images):
    """The backbone with every token finished in every block: no row skipped. -> (B, N, C) after the norm."""
    x = vit.embed(images)
    state = TokenState()
    for blk in vit.blocks:
        x = blk(blk.edit_tokens(x, state))
    return vit.norm(x)


def trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_logits_and_grads(model, reference_logits_fn):
    """model.model(x) (the fast path) against reference_logits_fn(x): logits and every trainable gradient.
    Returns the gradient names."""
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 2])
    logits = model.model(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    fast = trainable_grads(model)
    model.zero_grad()
    ref_logits = reference_logits_fn(x)
    torch.nn.functional.cross_entropy(ref_logits, y).backward()
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    ref = trainable_grads(model)
    assert fast.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)
    return set(ref)


@pytest.fixture(params=['sdpa', 'math'])
def attention_kernel(request, monkeypatch):
    """Each comparison runs with one attention implementation throughout (backbone/kernels.py), each in turn."""
    monkeypatch.setenv('UTUNING_ATTENTION', request.param)
    return request.param


@pytest.mark.parametrize('pool', ['token', 'avg'])
def test_skipped_rows_change_neither_outputs_nor_gradients(pool, attention_kernel):
    """forward() finishes only the rows pooling reads (class token in the last block; VPT prompt rows about to
    be replaced): outputs and every trainable gradient match the all-rows computation."""
    model = tiny(EVERY_KIND, global_pool=pool, class_token=True)
    randomize_tuners_(model)
    model.train()  # dropout rates are 0: train mode is deterministic here
    vit = model.backbone
    names = assert_same_logits_and_grads(
        model, lambda x: model.model.head(vit.forward_head(all_rows_reference(vit, x))))
    assert any(k.endswith('block_prompt.tokens') for k in names)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # forward_features keeps every output row, prompts of the last layer included
        torch.testing.assert_close(vit.forward_features(x), all_rows_reference(vit, x), atol=1e-5, rtol=0)


def test_class_token_pooling_saves_less_for_backward(attention_kernel):
    """Skipping rows is visible in the autograd graph: the last block keeps activations for one row only."""
    def saved_numel(fn):
        count = 0

        def pack(t):
            nonlocal count
            count += t.numel() if not isinstance(t, torch.nn.Parameter) else 0
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return count
    model = tiny(EVERY_KIND)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    model.model(x)  # the first call times the kernels for these shapes (backbone/kernels.py); measure after it
    model.model.head(model.backbone.forward_head(all_rows_reference(model.backbone, x)))
    skipped = saved_numel(lambda: model.model(x))
    full = saved_numel(lambda: model.model.head(model.backbone.forward_head(all_rows_reference(model.backbone, x))))
    assert skipped < 0.85 * full


def test_bypass_class_row_only_matches_all_rows(attention_kernel):
    """Under class-token pooling the bypass side path runs its tuners on the class row alone."""
    model = tiny(bypass=True)
    randomize_tuners_(model)
    vit = model.backbone  # the reference: all rows, then pool
    assert_same_logits_and_grads(model, lambda x: model.model.head(vit.forward_head(vit.forward_features(x))))


def test_bypass_gradients_reach_only_tuners_and_head():
    model = tiny(bypass=True)
    randomize_tuners_(model)
    model.train()
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    loss = model({'imgs': images, 'labels': torch.tensor([0, 3])})['loss']
    loss.backward()
    assert images.grad is None  # nothing flowed back through the frozen backbone into its input
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_bypass_keeps_activations_of_the_backbone_out_of_the_graph():
    """The autograd graph of a bypass step holds no frozen-block activations: far fewer saved tensors."""
    def saved_tensors(model):
        count = 0

        def pack(t):
            nonlocal count
            count += t.numel()
            return t
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model({'imgs': torch.randn(2, 3, 32, 32), 'labels': torch.tensor([0, 1])})['loss']
        return count
    standard, bypass = tiny(), tiny(bypass=True)
    assert saved_tensors(bypass) < 0.5 * saved_tensors(standard)


def test_bypass_with_silent_tuners_is_the_frozen_backbone():
    model = tiny(bypass=True)
    plain = tiny(tuners=[])
    plain.backbone.load_state_dict(model.backbone.state_dict(), strict=False)
    plain.head.load_state_dict(model.head.state_dict())
    model.eval(), plain.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # parallel tuners start silent (zero up-projection / values)
        torch.testing.assert_close(model({'imgs': x})['scores'], plain({'imgs': x})['scores'], atol=1e-6, rtol=0)


def test_bypass_is_the_first_order_u_tuning():
    """With one tuned layer (the last), bypass and standard U-Tuning compute the same thing."""
    tuners = [{'type': 'adapter', 'op': 'block', 'form': 'parallel', 'dim': 6, 'layers': [2]}]
    standard, bypass = tiny(tuners), tiny(tuners, bypass=True)
    randomize_tuners_(standard)
    bypass.load_state_dict(standard.state_dict())
    standard.eval(), bypass.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bypass({'imgs': x})['scores'], standard({'imgs': x})['scores'],
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize('tuners', [[{'type': 'adapter', 'op': 'ffn', 'form': 'sequential', 'dim': 4}],
                                    [{'type': 'lora', 'op': 'mha', 'rank': 4}], [{'type': 'bitfit'}], []])
def test_bypass_refuses_tuners_that_cannot_live_on_a_side_path(tuners):
    with pytest.raises(ValueError, match='bypass'):
        tiny(tuners, bypass=True)


def test_bf16_autocast_is_close_to_fp32():
    model = tiny()
    randomize_tuners_(model)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model({'imgs': x})['scores']
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model({'imgs': x})['scores']
    assert low.dtype == torch.float32  # scores are computed in fp32 from bf16 logits
    torch.testing.assert_close(low, ref, atol=2e-2, rtol=0)
    assert torch.equal(low.argmax(1), ref.argmax(1))


def test_bf16_training_step_matches_fp32_gradients():
    model = tiny()
    randomize_tuners_(model)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=enabled):
            loss = model({'imgs': x, 'labels': y})['loss']
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.99


def test_merged_lora_runs_the_plain_path_with_the_same_outputs():
    from modelscope_utuning.model import merge_lora
    model = tiny([{'type': 'lora', 'op': 'mha', 'rank': 4}, {'type': 'lora', 'op': 'ffn', 'rank': 4}])
    randomize_tuners_(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model({'imgs': x})['scores']
    merged = merge_lora(copy.deepcopy(model))
    assert not [n for n, _ in merged.named_modules() if n.endswith('_lora')]
    with torch.no_grad():
        torch.testing.assert_close(merged({'imgs': x})['scores'], ref, atol=1e-5, rtol=0)



def _scales(model):
    from modelscope_utuning.tuners.scale import Scale
    return [m for m in model.modules() if isinstance(m, Scale)]


def _logits_grads_and_saved_bytes(model, x, y):
    """One training step's logits, trainable gradients and the bytes it saves for backward (parameters out)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, alive = 0, []

    def pack(t):
        nonlocal saved
        alive.append(t)
        if t.untyped_storage().data_ptr() not in weights:
            saved += t.numel() * t.element_size()
        return t
    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model.model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    return logits.detach(), trainable_grads(model), saved


@pytest.mark.parametrize('scale', ['channel', 'scalar', 'input'])
@pytest.mark.parametrize('bypass', [False, True])
def test_scaled_projections_are_recomputed_in_backward(scale, bypass):
    """Adapters and the vertical tuner hold their bottleneck (B, N, r) for the backward pass instead of their
    branch (B, N, C): same logits and gradients as the plain product s * up(a) (which the Scale modules take in
    eval mode), one (B, N, C) tensor less per tuner held (the input-dependent scale keeps the plain product)."""
    tuners = [dict(t, scale=scale) if t['type'] == 'adapter' else t for t in TRI]
    tuners += [{'type': 'vertical', 'dim': 4}] if bypass else []
    model = tiny(tuners, bypass=bypass, global_pool='avg')  # every row read (as by a segmentation head)
    randomize_tuners_(model)
    model.train()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 2])
    _logits_grads_and_saved_bytes(model, x, y)  # the first step times the attention kernels (backbone/kernels.py)
    logits, grads, saved = _logits_grads_and_saved_bytes(model, x, y)
    for s in _scales(model):
        s.eval()
    ref_logits, ref_grads, ref_saved = _logits_grads_and_saved_bytes(model, x, y)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=0)
    assert grads.keys() == ref_grads.keys() and any('adapter' in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    branch_bytes = 3 * (16 + 1) * 32 * 4  # one (B, N, C) fp32 branch
    adapters = 2 * 3 if scale != 'input' else 0  # two per layer, 3 layers
    verticals = 3 - 1 if bypass else 0  # the side stream is carried from one layer to the next
    assert ref_saved - saved == (adapters + verticals) * branch_bytes
