"""MultiHeadAttention: the mechanism as described, heads, masks layouts, caches."""

import pytest
import torch

from attention import KVCache, MultiHeadAttention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_four_trainable_projections_without_bias():
    mha = MultiHeadAttention(16, 4, kdim=8, vdim=12)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        linear = getattr(mha, name)
        assert isinstance(linear, torch.nn.Linear) and linear.bias is None
        assert linear.weight.requires_grad
    assert mha.k_proj.in_features == 8 and mha.v_proj.in_features == 12
    assert MultiHeadAttention(16, 4, bias=True).q_proj.bias is not None


def reference_mha(mha, query, key, value):
    """Each head by hand in float64: project, softmax(q kᵀ / √d_head) v, concat, project."""
    q = query.double() @ mha.q_proj.weight.double().T
    k = key.double() @ mha.k_proj.weight.double().T
    v = value.double() @ mha.v_proj.weight.double().T
    heads = []
    for h in range(mha.n_heads):
        cols = slice(h * mha.d_head, (h + 1) * mha.d_head)
        scores = q[..., cols] @ k[..., cols].transpose(-2, -1) / mha.d_head**0.5
        heads.append(scores.softmax(-1) @ v[..., cols])
    return torch.cat(heads, dim=-1) @ mha.out_proj.weight.double().T


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_weights", [True, False])
def test_matches_per_head_reference(device, need_weights):
    torch.manual_seed(0)
    mha = MultiHeadAttention(12, 3, kdim=5, vdim=7).to(device)
    query = torch.randn(2, 4, 12, device=device)
    key, value = torch.randn(2, 6, 5, device=device), torch.randn(2, 6, 7, device=device)
    out, _ = mha(query, key, value, need_weights=need_weights)
    torch.testing.assert_close(out.double(), reference_mha(mha, query, key, value),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_self_attention_is_cross_attention_to_itself(bias):
    """``mha(x)``, ``mha(x, x)`` and ``mha(x, x, x)`` take the fused q/k/v projection; a key
    and value that are other tensors (copies of ``x``) take the separate projections."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, bias=bias)
    x = torch.randn(2, 5, 16)
    separate = mha(x, x.clone(), x.clone())[0]  # the path test_matches_per_head_reference pins
    for fused in (mha(x), mha(x, x), mha(x, x, x)):  # value defaults to key
        torch.testing.assert_close(fused[0], separate)


@pytest.mark.parametrize("rotary", [False, True])
def test_passing_query_as_key_is_self_attention(rotary):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, rotary=rotary)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(mha(x, x, x)[0], mha(x)[0])
    cache = KVCache()
    steps = []
    for t in range(5):
        x_t = x[:, t : t + 1]  # the same tensor as query and key: appended, not frozen
        steps.append(mha(x_t, x_t, is_causal=True, cache=cache)[0])
    assert len(cache) == 5
    torch.testing.assert_close(torch.cat(steps, 1), mha(x, is_causal=True)[0],
                               atol=1e-5, rtol=1e-5)


def test_weights_averaged_or_per_head():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4)
    query, memory = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    out, averaged = mha(query, memory, need_weights=True)
    _, per_head = mha(query, memory, need_weights=True, average_attn_weights=False)
    assert averaged.shape == (2, 3, 7) and per_head.shape == (2, 4, 3, 7)
    torch.testing.assert_close(per_head.mean(1), averaged)
    assert mha(query, memory)[1] is None  # weights only on request
    torch.testing.assert_close(mha(query, memory)[0], out, atol=1e-6, rtol=1e-5)


def test_torch_style_per_head_mask_equals_four_dimensional_mask():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2)
    x = torch.randn(3, 5, 16)
    mask = torch.rand(3, 2, 5, 5) > 0.6
    expected = mha(x, attn_mask=mask)[0]
    torch.testing.assert_close(mha(x, attn_mask=mask.reshape(6, 5, 5))[0], expected)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, dropout=0.5)
    x = torch.randn(2, 5, 16)
    mha.eval()
    torch.testing.assert_close(mha(x)[0], mha(x)[0])
    mha.train()
    assert not torch.allclose(mha(x)[0], mha(x)[0])


def test_cross_attention_cache_projects_the_memory_once():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2)
    memory, query = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    calls = []
    mha.k_proj.register_forward_hook(lambda *args: calls.append(1))
    cache = KVCache()
    steps = [mha(query[:, t : t + 1], memory, cache=cache)[0] for t in range(3)]
    assert len(calls) == 1 and len(cache) == 6
    torch.testing.assert_close(torch.cat(steps, dim=1), mha(query, memory)[0])


@pytest.mark.parametrize("rotary", [False, True])
def test_self_attention_cache_grows_one_position_per_step(rotary):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, rotary=rotary)
    x = torch.randn(2, 5, 16)
    cache = KVCache()
    steps = []
    for t in range(5):
        steps.append(mha(x[:, t : t + 1], is_causal=True, cache=cache)[0])
        assert len(cache) == t + 1
    torch.testing.assert_close(torch.cat(steps, 1), mha(x, is_causal=True)[0],
                               atol=1e-5, rtol=1e-5)


def test_cache_reorder_keeps_selected_rows():
    cache = KVCache()
    k = torch.arange(3.0).reshape(3, 1, 1, 1)
    cache.append(k, -k)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.k.flatten().tolist() == [2.0, 2.0, 0.0]
    assert cache.v.flatten().tolist() == [-2.0, -2.0, 0.0]


@pytest.mark.parametrize("capacity", [None, 2, 8])
def test_cached_steps_grow_past_their_capacity_and_keep_every_position(capacity):
    cache = KVCache(capacity)
    keys = [torch.randn(3, 2, n, 4) for n in (1, 2, 1, 3)]
    for k in keys:
        cache.append(k, 2 * k)
    torch.testing.assert_close(cache.k, torch.cat(keys, dim=-2))
    torch.testing.assert_close(cache.v, 2 * torch.cat(keys, dim=-2))
    cache.reorder(torch.tensor([2, 0]))  # fewer rows: beam search dropping a sentence
    torch.testing.assert_close(cache.k, torch.cat(keys, dim=-2)[[2, 0]])
    with pytest.raises(ValueError, match="cache: expected new keys for batch=2"):
        cache.append(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))


def test_gradients_flow_through_cached_steps_and_reorders():
    """With autograd recording, the cache concatenates instead of writing in place (which
    would overwrite what earlier steps saved for the backward pass)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2)
    x = torch.randn(2, 4, 16, requires_grad=True)
    cache = KVCache(4)
    steps = []
    for t in range(4):
        steps.append(mha(x[:, t : t + 1], is_causal=True, cache=cache)[0])
        if t == 1:
            cache.reorder(torch.tensor([0, 1]))
    torch.cat(steps, dim=1).square().sum().backward()
    expected = torch.autograd.grad(mha(x, is_causal=True)[0].square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-5)


def test_gradcheck_through_the_module():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, rotary=True).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, False, False, False], [False, False, True, True]])
    assert torch.autograd.gradcheck(
        lambda x: mha(x, key_padding_mask=mask, is_causal=True)[0], (x,))
