"""``attention.attend`` against a float64 textbook reference, on both of its paths.

Mask convention under test (torch.nn.MultiheadAttention's): a boolean ``True`` means "may not
attend", a float mask is added to the scores, ``key_padding_mask`` ``(B, Lk)`` is ``True`` at
padding. ``need_weights=True`` runs the explicit computation, ``need_weights=False`` the fused
``F.scaled_dot_product_attention``; both must give the reference result.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from attention import attend, causal_mask

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PATHS = {"explicit": True, "fused": False}  # path name -> need_weights
INF = float("inf")


# --------------------------------------------------------------------------- helpers


def qkv(batch=2, heads=3, q_len=4, k_len=5, d_head=8, d_v=None, *, seed=0, device="cpu",
        dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, q_len, d_head), (batch, heads, k_len, d_head),
              (batch, heads, k_len, d_head if d_v is None else d_v)]
    return [torch.randn(s, generator=gen, dtype=dtype).to(device).requires_grad_(requires_grad)
            for s in shapes]


def random_bool(shape, p=0.4, *, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) < p).to(device)


def as_float_mask(mask):
    """The float mask that means the same as a boolean one: ``-inf`` where ``True``."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill(mask, -INF)


def reference(q, k, v, *, attn_mask=None, key_padding_mask=None, is_causal=False, scale=None):
    """softmax(q·kᵀ·scale + mask)·v in float64, written out; fully masked rows give zeros."""
    q, k, v = (t.detach().double() for t in (q, k, v))
    batch, heads, q_len, d_head = q.shape
    k_len = k.shape[-2]
    scale = d_head**-0.5 if scale is None else scale
    bias = torch.zeros(batch, heads, q_len, k_len, dtype=torch.float64, device=q.device)

    def add(bias, mask):
        if mask.dtype == torch.bool:
            return bias.masked_fill(mask, -INF)
        return bias + mask.double()

    if attn_mask is not None:
        bias = add(bias, attn_mask)  # (Lq, Lk) and (B|1, H|1, Lq, Lk) both broadcast
    if key_padding_mask is not None:
        bias = add(bias, key_padding_mask[:, None, None, :])
    if is_causal:
        blocked = torch.zeros(q_len, k_len, dtype=torch.bool, device=q.device)
        for i in range(q_len):  # query i is position k_len - q_len + i of the key sequence
            for j in range(k_len):
                blocked[i, j] = j > k_len - q_len + i
        bias = add(bias, blocked)

    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale + bias
    has_key = (bias > -INF).any(dim=-1, keepdim=True)
    weights = torch.where(has_key, scores.softmax(dim=-1), torch.zeros_like(scores))
    return torch.einsum("bhij,bhjd->bhid", weights, v), weights


def check_against_reference(q, k, v, need_weights, **masks):
    out, weights = attend(q, k, v, need_weights=need_weights, **masks)
    ref_out, ref_weights = reference(q, k, v, **masks)
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref_out.to(q.dtype))
    if need_weights:
        assert weights is not None and weights.shape == ref_weights.shape
        torch.testing.assert_close(weights, ref_weights.to(q.dtype))
    else:
        assert weights is None
    return out, weights


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_unmasked_matches_reference(device, path, scale):
    q, k, v = qkv(d_v=6, device=device)
    check_against_reference(q, k, v, PATHS[path], scale=scale)


def test_default_scale_is_inverse_sqrt_d_head():
    q, k, v = qkv(d_head=16)
    for need_weights in PATHS.values():
        default, _ = attend(q, k, v, need_weights=need_weights)
        explicit, _ = attend(q, k, v, need_weights=need_weights, scale=0.25)
        torch.testing.assert_close(default, explicit)


ATTN_MASK_SHAPES = {
    "LqLk": lambda b, h, i, j: (i, j),
    "BHLqLk": lambda b, h, i, j: (b, h, i, j),
    "1HLqLk": lambda b, h, i, j: (1, h, i, j),
    "B1LqLk": lambda b, h, i, j: (b, 1, i, j),
    "11LqLk": lambda b, h, i, j: (1, 1, i, j),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", ATTN_MASK_SHAPES)
def test_attn_mask_matches_reference(device, path, kind, shape):
    batch, heads, q_len, k_len = 2, 3, 4, 5
    q, k, v = qkv(batch, heads, q_len, k_len, device=device)
    mask_shape = ATTN_MASK_SHAPES[shape](batch, heads, q_len, k_len)
    mask = random_bool(mask_shape, device=device)
    mask[..., 0] = False  # every row keeps a key here; fully masked rows are tested below
    if kind == "float":  # any additive bias, with -inf where the bool mask blocks
        gen = torch.Generator().manual_seed(2)
        mask = torch.randn(mask_shape, generator=gen).to(device).masked_fill(mask, -INF)
    check_against_reference(q, k, v, PATHS[path], attn_mask=mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding_mask_matches_reference(device, path, kind):
    q, k, v = qkv(device=device)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2], device=device)
    mask = padding if kind == "bool" else as_float_mask(padding)
    out, _ = check_against_reference(q, k, v, PATHS[path], key_padding_mask=mask)
    # Padded keys do not contribute: changing their values changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 3:], v2[1, :, 3:] = 100.0, -100.0
    out2, _ = attend(q, k2, v2, key_padding_mask=mask, need_weights=PATHS[path])
    torch.testing.assert_close(out2, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("q_len, k_len", [(4, 4), (3, 6), (6, 3)])
@pytest.mark.parametrize("attn_kind, pad_kind", [("bool", "bool"), ("float", "bool"),
                                                 ("bool", "float"), ("float", "float")])
def test_combined_masks_causal_and_scale(device, path, q_len, k_len, attn_kind, pad_kind):
    batch, heads = 2, 2
    q, k, v = qkv(batch, heads, q_len, k_len, seed=3, device=device)
    attn_mask = random_bool((batch, 1, q_len, k_len), p=0.25, seed=4, device=device)
    padding = torch.zeros(batch, k_len, dtype=torch.bool, device=device)
    padding[1, 0] = True
    if attn_kind == "float":
        gen = torch.Generator().manual_seed(5)
        attn_mask = torch.randn(attn_mask.shape, generator=gen).to(device).masked_fill(
            attn_mask, -INF)
    if pad_kind == "float":
        padding = as_float_mask(padding)
    check_against_reference(q, k, v, PATHS[path], attn_mask=attn_mask, key_padding_mask=padding,
                            is_causal=True, scale=0.7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("path", PATHS)
def test_keeps_the_input_precision(path, dtype):
    """float64 in, float64 accuracy out (no silent round trip through float32)."""
    q, k, v = qkv(dtype=dtype)
    mask = random_bool((4, 5))
    mask[:, 0] = False
    out, weights = attend(q, k, v, attn_mask=mask, need_weights=PATHS[path])
    ref_out, ref_weights = reference(q, k, v, attn_mask=mask)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref_out.to(dtype), **tol)
    if weights is not None:
        assert weights.dtype == dtype
        torch.testing.assert_close(weights, ref_weights.to(dtype), **tol)


# --------------------------------------------------------------------------- mask meaning


@pytest.mark.parametrize("path", PATHS)
def test_true_in_a_bool_mask_blocks(path):
    q, k, v = qkv(1, 1, 3, 4)
    mask = torch.tensor([[False, True, False, False],
                         [True, True, True, False],
                         [False, False, False, False]])
    out, weights = attend(q, k, v, attn_mask=mask, need_weights=True)
    assert torch.all(weights[0, 0][mask] == 0)
    assert torch.all(weights[0, 0][~mask] > 0)
    torch.testing.assert_close(weights[0, 0, 1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(out[0, 0, 1], v[0, 0, 3])  # its only allowed key
    # Either path equals SDPA given the inverted mask (SDPA: True = may attend).
    ours, _ = attend(q, k, v, attn_mask=mask, need_weights=PATHS[path])
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=~mask))
    torch.testing.assert_close(ours, out)
    # Passed to SDPA unconverted the same mask means the opposite: another result.
    raw = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not torch.allclose(ours[..., :2, :], raw[..., :2, :])


def test_float_mask_is_added_to_the_scores():
    q, k, v = qkv(1, 2, 3, 4)
    bias = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    for need_weights in PATHS.values():
        ours, _ = attend(q, k, v, attn_mask=bias, need_weights=need_weights)
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


# --------------------------------------------------------------------------- causal


def test_causal_mask_function():
    expected_short_q = torch.tensor([[False, False, False, True, True],
                                     [False, False, False, False, True],
                                     [False, False, False, False, False]])
    assert torch.equal(causal_mask(3, 5), expected_short_q)
    expected_long_q = torch.tensor([[True, True], [True, True], [False, True], [False, False]])
    assert torch.equal(causal_mask(4, 2), expected_long_q)
    square = causal_mask(4, 4)
    assert square.dtype == torch.bool
    assert torch.equal(square, torch.ones(4, 4, dtype=torch.bool).triu(diagonal=1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_causal_with_fewer_queries_aligns_to_the_last_key(device, path):
    q_len, k_len = 3, 6
    q, k, v = qkv(2, 2, q_len, k_len, seed=11, device=device)
    out, _ = check_against_reference(q, k, v, PATHS[path], is_causal=True)
    _, weights = attend(q, k, v, is_causal=True, need_weights=True)
    for i in range(q_len):  # query i sees keys 0 … k_len - q_len + i and nothing later
        last = k_len - q_len + i
        assert torch.all(weights[..., i, : last + 1] > 0)
        assert torch.all(weights[..., i, last + 1 :] == 0)
    # What a key/value cache relies on: the newest queries attending to the whole prefix
    # give the last rows of one causal pass over every position.
    full_q = torch.cat([qkv(2, 2, k_len - q_len, 1, seed=12, device=device)[0], q], dim=2)
    full, _ = attend(full_q, k, v, is_causal=True, need_weights=PATHS[path])
    torch.testing.assert_close(out, full[:, :, k_len - q_len :])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_causal_with_more_queries_gives_zeros_for_the_first_rows(device, path):
    q_len, k_len = 5, 2
    q, k, v = qkv(2, 2, q_len, k_len, seed=13, device=device)
    out, weights = check_against_reference(q, k, v, PATHS[path], is_causal=True)
    assert torch.all(out[:, :, : q_len - k_len] == 0)
    if weights is not None:
        assert torch.all(weights[:, :, : q_len - k_len] == 0)
    assert torch.all(out[:, :, q_len - k_len :].abs().sum(-1) > 0)


# --------------------------------------------------------------------------- fully masked rows


def fully_masked_case(kind, device):
    """q, k, v (leaves) and mask kwargs where query row 1 and batch row 1 see no key."""
    batch, heads, q_len, k_len = 2, 2, 3, 4
    q, k, v = qkv(batch, heads, q_len, k_len, seed=21, device=device, requires_grad=True)
    row_mask = torch.zeros(q_len, k_len, dtype=torch.bool, device=device)
    row_mask[1] = True
    row_mask[0, 2] = True
    padding = torch.zeros(batch, k_len, dtype=torch.bool, device=device)
    padding[1] = True
    blocked = row_mask.expand(batch, heads, q_len, k_len).clone()  # (b, h, i, j)
    if kind == "bool":
        kwargs = {"attn_mask": row_mask}
    elif kind == "float":
        kwargs = {"attn_mask": as_float_mask(row_mask)}
    elif kind == "padding_bool":
        kwargs = {"key_padding_mask": padding}
        blocked = padding[:, None, None, :].expand(batch, heads, q_len, k_len)
    elif kind == "padding_float":
        kwargs = {"key_padding_mask": as_float_mask(padding)}
        blocked = padding[:, None, None, :].expand(batch, heads, q_len, k_len)
    else:  # "all": every input masks something, together they leave some rows empty
        kwargs = {"attn_mask": as_float_mask(row_mask), "key_padding_mask": padding,
                  "is_causal": True}
        blocked = row_mask | padding[:, None, None, :] | causal_mask(q_len, k_len, device)
        blocked = blocked.expand(batch, heads, q_len, k_len)
    empty = blocked.all(dim=-1)  # (b, h, i)
    return (q, k, v), kwargs, empty


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["bool", "float", "padding_bool", "padding_float", "all"])
def test_fully_masked_rows_are_zero_and_never_nan(device, path, kind):
    (q, k, v), kwargs, empty = fully_masked_case(kind, device)
    assert empty.any() and not empty.all()
    out, weights = attend(q, k, v, need_weights=PATHS[path], **kwargs)
    assert torch.isfinite(out).all()
    assert torch.all(out[empty] == 0)
    if weights is not None:
        assert torch.isfinite(weights).all()
        assert torch.all(weights[empty] == 0)
        assert torch.all(weights.sum(-1)[~empty] > 0.999)
    torch.testing.assert_close(out, reference(q, k, v, **kwargs)[0].float())

    loss = out.square().sum() + (0.0 if weights is None else weights.square().sum())
    loss.backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
    assert torch.all(q.grad[empty] == 0)  # a row that attends to nothing has no gradient


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck(path):
    """Analytic gradients match finite differences, a fully masked row included."""
    q, k, v = qkv(1, 2, 3, 4, 3, seed=31, dtype=torch.float64, requires_grad=True)
    attn_mask = torch.tensor([[False, True, False, False],
                              [True, True, True, True],  # sees nothing
                              [False, False, True, False]])
    padding = torch.tensor([[False, False, False, True]])
    bias = torch.randn(3, 4, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(32)).masked_fill(attn_mask, -INF)

    def f(q, k, v):
        out, _ = attend(q, k, v, attn_mask=bias, key_padding_mask=padding,
                        need_weights=PATHS[path])
        return out

    def g(q, k, v):
        out, _ = attend(q, k, v, attn_mask=attn_mask, is_causal=True, need_weights=PATHS[path])
        return out

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradcheck(g, (q, k, v))


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("path", PATHS)
def test_dropout_is_random_and_finite(path):
    torch.manual_seed(41)
    q, k, v = qkv(2, 2, 6, 6, seed=41)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1] = True  # batch row 1 sees nothing
    first, _ = attend(q, k, v, key_padding_mask=padding, dropout_p=0.5, need_weights=PATHS[path])
    second, _ = attend(q, k, v, key_padding_mask=padding, dropout_p=0.5,
                       need_weights=PATHS[path])
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert not torch.equal(first[0], second[0])
    assert torch.all(first[1] == 0) and torch.all(second[1] == 0)


@pytest.mark.parametrize("path", PATHS)
def test_dropout_zeroes_weights_and_rescales_the_rest(path):
    """With v = identity the output is the dropped weights: each is 0 or w / (1 - p)."""
    torch.manual_seed(42)
    p, length = 0.5, 8
    q, k, _ = qkv(2, 2, length, length, seed=42)
    v = torch.eye(length).expand(2, 2, length, length)
    weights = attend(q, k, v, need_weights=True)[1]
    dropped, returned = attend(q, k, v, dropout_p=p, need_weights=PATHS[path])
    if returned is not None:  # the weights are returned before dropout
        torch.testing.assert_close(returned, weights)
    kept = dropped != 0
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(dropped[kept], weights[kept] / (1 - p))


@pytest.mark.parametrize("path", PATHS)
def test_no_dropout_is_deterministic(path):
    q, k, v = qkv(seed=43)
    first, _ = attend(q, k, v, dropout_p=0.0, need_weights=PATHS[path])
    second, _ = attend(q, k, v, dropout_p=0.0, need_weights=PATHS[path])
    assert torch.equal(first, second)


# --------------------------------------------------------------------------- bad input


def bad_call(**overrides):
    """attend() on (B, H, Lq, Lk, d) = (2, 3, 4, 5, 8), with some argument replaced."""
    q, k, v = qkv(2, 3, 4, 5, 8)
    args = {"q": q, "k": k, "v": v, **overrides}
    return lambda: attend(args.pop("q"), args.pop("k"), args.pop("v"), **args)


BAD_INPUTS = {
    "q rank": (dict(q=torch.randn(2, 4, 8)), ValueError,
               r"q: expected a 4-D tensor .*got shape \(2, 4, 8\)"),
    "q not a tensor": (dict(q=[[1.0]]), TypeError, r"q: expected a Tensor.*got list"),
    "k batch": (dict(k=torch.randn(1, 3, 5, 8)), ValueError,
                r"k, v: expected the batch of q=2 and the same number of heads, dividing q's 3 "
                r"\(grouped-query attention\), got k \(1, 3, 5, 8\)"),
    "v heads": (dict(v=torch.randn(2, 1, 5, 8)), ValueError,
                r"k, v: expected the batch of q=2 and the same number of heads.*v \(2, 1, 5, 8\)"),
    "k d_head": (dict(k=torch.randn(2, 3, 5, 7)), ValueError,
                 r"k: expected d_head=8 .*got shape \(2, 3, 5, 7\)"),
    "v length": (dict(v=torch.randn(2, 3, 6, 8)), ValueError,
                 r"v: expected Lk=5 .*got shape \(2, 3, 6, 8\)"),
    "k dtype": (dict(k=torch.randn(2, 3, 5, 8, dtype=torch.float64)), TypeError,
                r"k, v: expected dtype torch.float32 .*got torch.float64"),
    "attn_mask Lk+1": (dict(attn_mask=torch.zeros(4, 6, dtype=torch.bool)), ValueError,
                       r"attn_mask: expected shape \(Lq, Lk\) = \(4, 5\).*got \(4, 6\)"),
    "attn_mask (B, Lk)": (dict(attn_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError,
                          r"attn_mask: expected shape .*\(4, 5\).*got \(2, 5\)"),
    "attn_mask (B, Lq, Lk)": (dict(attn_mask=torch.zeros(2, 4, 5)), ValueError,
                              r"attn_mask: expected shape .*got \(2, 4, 5\)"),
    "attn_mask wrong heads": (dict(attn_mask=torch.zeros(2, 2, 4, 5)), ValueError,
                              r"attn_mask: expected shape .*\(2, 3, 4, 5\).*got \(2, 2, 4, 5\)"),
    "attn_mask int": (dict(attn_mask=torch.zeros(4, 5, dtype=torch.int64)), TypeError,
                      r"attn_mask: expected dtype torch.bool .*got torch.int64"),
    "attn_mask uint8": (dict(attn_mask=torch.zeros(4, 5, dtype=torch.uint8)), TypeError,
                        r"attn_mask: expected dtype torch.bool .*got torch.uint8"),
    "key_padding_mask shape": (dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
                               ValueError,
                               r"key_padding_mask: expected shape \(batch, Lk\) = \(2, 5\), "
                               r"got \(2, 4\)"),
    "key_padding_mask (Lk,)": (dict(key_padding_mask=torch.zeros(5, dtype=torch.bool)),
                               ValueError, r"key_padding_mask: expected shape .*got \(5,?\)"),
    "key_padding_mask int": (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.int32)),
                             TypeError, r"key_padding_mask: expected dtype .*got torch.int32"),
    "dropout_p 1": (dict(dropout_p=1.0), ValueError,
                    r"dropout_p: expected a float in \[0, 1\), got 1.0"),
    "dropout_p negative": (dict(dropout_p=-0.1), ValueError,
                           r"dropout_p: expected a float in \[0, 1\), got -0.1"),
    "dropout_p str": (dict(dropout_p="0.1"), TypeError, r"dropout_p: expected a float .*str"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_names_the_argument(case):
    overrides, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        bad_call(**overrides)()


def test_backend_choice_is_per_thread():
    """A block in one thread does not change what another thread runs on."""
    from attention.functional import attention_backend, current_backend

    inside = threading.Event()
    release = threading.Event()
    seen = {}

    def chooser():
        with attention_backend("explicit"):
            seen["chooser"] = current_backend()
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=chooser)
    thread.start()
    assert inside.wait(5)
    seen["other"] = current_backend()
    release.set()
    thread.join()
    assert seen == {"chooser": "explicit", "other": "auto"}
    with attention_backend("math"):
        with attention_backend("explicit"):
            assert current_backend() == "explicit"
        assert current_backend() == "math"
    assert current_backend() == "auto"
