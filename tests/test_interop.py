"""transformers models on our stack, and our attention inside transformers models, checked
against transformers itself (eager attention as the oracle), with padding.

Every model is a tiny random one made here: nothing downloads."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from attention import Encoder
from attention.interop import (
    PretrainedEncoder,
    TokenEmbeddings,
    from_transformers,
    register_with_transformers,
    to_transformers,
)

transformers = pytest.importorskip("transformers")

VOCAB = 97
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def bert_config(**overrides) -> object:
    return transformers.BertConfig(**{
        "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 37, "max_position_embeddings": 64,
        "attn_implementation": "eager", **overrides})


def modernbert_config(**overrides) -> object:
    """Four layers, global every second, local layers 4 positions each side: sequences of
    40 tokens are much longer than the window."""
    return transformers.ModernBertConfig(**{
        "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "intermediate_size": 24, "local_attention": 8,
        "global_attn_every_n_layers": 2, "attn_implementation": "eager",
        "cls_token_id": 1, "sep_token_id": 2, **TOKEN_IDS, **overrides})


def padded_batch(length: int = 40, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: full, 7 padded, 19 padded (on the right, or on the left)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, length), generator=generator)
    mask = torch.ones(3, length, dtype=torch.long)
    for row, padded in ((1, 7), (2, 19)):
        if left:
            mask[row, :padded] = 0
        else:
            mask[row, length - padded:] = 0
    return ids * mask, mask


def output_of(model_output) -> torch.Tensor:
    return getattr(model_output, "last_hidden_state", None) if hasattr(
        model_output, "last_hidden_state") else model_output.logits


def assert_equal_at_real_positions(ours: torch.Tensor, theirs: torch.Tensor,
                                   mask: torch.Tensor) -> None:
    if ours.dim() == 3:  # per position: padded positions aside
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# from_transformers / to_transformers

MODELS = [
    ("BertModel", bert_config), ("BertForMaskedLM", bert_config),
    ("BertForSequenceClassification", bert_config),
    ("ModernBertModel", modernbert_config), ("ModernBertForMaskedLM", modernbert_config),
    ("ModernBertForSequenceClassification", modernbert_config),
]


@pytest.mark.parametrize(("name", "make_config"), MODELS)
def test_converted_model_gives_transformers_outputs_with_padding(name, make_config):
    torch.manual_seed(0)
    theirs = getattr(transformers, name)(make_config()).eval()
    ours = from_transformers(theirs)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = output_of(theirs(input_ids=ids, attention_mask=mask))
        got = ours(ids, mask)
        assert_equal_at_real_positions(got, expected, mask)
        # Without a mask, every position is real.
        assert_close(ours(ids), output_of(theirs(input_ids=ids)), atol=1e-4, rtol=1e-4)
    assert not ours.training


@pytest.mark.parametrize(("name", "make_config"), MODELS)
def test_to_transformers_gives_back_the_same_model(name, make_config):
    torch.manual_seed(0)
    original = getattr(transformers, name)(make_config()).eval()
    back = to_transformers(from_transformers(original))
    assert type(back) is type(original)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert_equal_at_real_positions(output_of(back(input_ids=ids, attention_mask=mask)),
                                       output_of(original(input_ids=ids, attention_mask=mask)),
                                       mask)


def test_modernbert_keeps_its_local_and_global_layers_and_rotary_bases():
    config = modernbert_config(global_rope_theta=160000.0, local_rope_theta=10000.0)
    ours = from_transformers(transformers.ModernBertModel(config))
    layers = ours.encoder.layers
    assert [layer.self_attn.window for layer in layers] == [None, (4, 4), None, (4, 4)]
    assert [layer.self_attn.rotary.base for layer in layers] == [160000.0, 10000.0] * 2
    assert isinstance(layers[0].norm1, nn.Identity)  # the embeddings' norm serves layer 0
    assert layers[0].feed_forward.gated and layers[0].self_attn.q_proj.bias is None
    assert ours.encoder.norm is not None  # the final norm


def test_modernbert_local_layers_attend_within_the_window():
    """With every layer local (4 layers of 4 positions each side), position 0 cannot see
    position 30: changing that token leaves it as it was, and transformers agrees."""
    torch.manual_seed(0)
    theirs = transformers.ModernBertModel(modernbert_config(
        layer_types=["sliding_attention"] * 4)).eval()
    ours = from_transformers(theirs)
    assert [layer.self_attn.window for layer in ours.encoder.layers] == [(4, 4)] * 4
    ids, mask = padded_batch()
    changed = ids.clone()
    changed[:, 30] = (changed[:, 30] + 1) % VOCAB
    with torch.no_grad():
        assert_close(ours(changed)[:, 0], ours(ids)[:, 0], atol=0, rtol=0)
        assert_equal_at_real_positions(ours(ids, mask), theirs(
            input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    layer_types = ["full_attention", "sliding_attention", "full_attention", "full_attention"]
    with pytest.raises(ValueError, match="layer_types global every k-th layer"):
        from_transformers(transformers.ModernBertModel(modernbert_config(
            layer_types=layer_types)))


def test_sequence_classifier_mean_pooling_and_no_nan_on_a_padding_only_row():
    torch.manual_seed(0)
    theirs = transformers.ModernBertForSequenceClassification(
        modernbert_config(classifier_pooling="mean", num_labels=3)).eval()
    ours = from_transformers(theirs)
    assert ours.pooling == "mean"
    ids, mask = padded_batch()
    with torch.no_grad():
        assert_close(ours(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits,
                     atol=1e-4, rtol=1e-4)
        mask[2] = 0
        assert torch.isfinite(ours(ids, mask)).all()


def test_masked_lm_keeps_the_tied_embedding():
    ours = from_transformers(transformers.BertForMaskedLM(bert_config()))
    assert ours.decoder.weight is ours.encoder.embeddings.word.weight


def test_saved_folder_loads_offline_and_converts(tmp_path):
    torch.manual_seed(0)
    saved = transformers.ModernBertForMaskedLM(modernbert_config()).eval()
    saved.save_pretrained(tmp_path)
    base = transformers.AutoModel.from_pretrained(tmp_path)  # what a user does first
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = saved.model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_equal_at_real_positions(from_transformers(base)(ids, mask), expected, mask)
        # Or the folder itself: the class its configuration names.
        ours = from_transformers(tmp_path)
        assert_equal_at_real_positions(ours(ids, mask), saved(input_ids=ids,
                                                              attention_mask=mask).logits, mask)


def test_converted_model_trains_every_weight():
    torch.manual_seed(0)
    ours = from_transformers(transformers.ModernBertForSequenceClassification(
        modernbert_config())).train()
    ids, mask = padded_batch()
    loss = nn.functional.cross_entropy(ours(ids, mask), torch.tensor([0, 1, 0]))
    loss.backward()
    missing = [name for name, p in ours.named_parameters() if p.grad is None]
    # The padding token's embedding row gets no gradient, but the table has one.
    assert missing == []


def test_from_transformers_refuses_what_it_cannot_convert(tmp_path):
    with pytest.raises(TypeError, match="model: expected one of BertModel"):
        from_transformers(transformers.LlamaModel(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=37)))
    with pytest.raises(ValueError, match="attention_bias, mlp_bias and norm_bias"):
        from_transformers(transformers.ModernBertModel(modernbert_config(attention_bias=True)))
    with pytest.raises(ValueError, match="config.hidden_activation"):
        from_transformers(transformers.ModernBertModel(modernbert_config(
            hidden_activation="relu")))
    with pytest.raises(ValueError, match="is_decoder"):
        from_transformers(transformers.BertModel(bert_config(is_decoder=True)))
    with pytest.raises(FileNotFoundError, match="model: expected a model instance"):
        from_transformers(tmp_path / "missing")


def test_to_transformers_refuses_what_the_architecture_lacks():
    embeddings = TokenEmbeddings(VOCAB, 32, norm_bias=False)
    encoder = Encoder(32, 4, 2, positional="rotary", activation="geglu", n_kv_heads=2,
                      qk_norm=True)
    encoder.layers[0].norm1 = nn.Identity()
    with pytest.raises(ValueError, match="ModernBERT has no n_kv_heads, qk_norm"):
        to_transformers(PretrainedEncoder(embeddings, encoder, "modernbert"))
    with pytest.raises(TypeError, match="module: expected a PretrainedEncoder"):
        to_transformers(encoder)
    # Parameters named and shaped like ModernBERT's, but other norms or feed-forwards.
    for options, refusal in (({"norm": "rmsnorm"}, "ModernBERT's norms are LayerNorm; expected "
                                                    "norm='layernorm', got RMSNorm"),
                             ({"activation": "gelu"}, "ModernBERT's feed-forward takes a gated")):
        other = Encoder(32, 4, 2, positional="rotary", **{"activation": "geglu", **options})
        other.layers[0].norm1 = nn.Identity()
        with pytest.raises(ValueError, match=f"^module: {refusal}"):
            to_transformers(PretrainedEncoder(embeddings, other, "modernbert"))


def test_a_modernbert_with_every_layer_local_goes_back():
    torch.manual_seed(0)
    original = transformers.ModernBertModel(modernbert_config(
        layer_types=["sliding_attention"] * 4)).eval()
    ours = from_transformers(original)
    assert {layer.self_attn.window for layer in ours.encoder.layers} == {(4, 4)}
    back = to_transformers(ours)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert_equal_at_real_positions(back(input_ids=ids, attention_mask=mask)
                                       .last_hidden_state, original(
                                           input_ids=ids, attention_mask=mask)
                                       .last_hidden_state, mask)


def test_encoder_built_by_hand_goes_to_transformers():
    """A ModernBERT-shaped PretrainedEncoder that never came from transformers."""
    torch.manual_seed(0)
    embeddings = TokenEmbeddings(VOCAB, 32, norm_bias=False)
    encoder = Encoder(32, 4, 3, d_ff=24, dropout=0.0, positional="rotary",
                      activation="geglu", window=4, global_every=3,
                      global_rotary_base=160000.0)
    encoder.layers[0].norm1 = nn.Identity()
    ours = PretrainedEncoder(embeddings, encoder, "modernbert").eval()
    theirs = to_transformers(ours)
    assert theirs.config.layer_types == ["full_attention", "sliding_attention",
                                         "sliding_attention"]
    # Its special tokens are unknown here: not transformers' defaults, outside its vocabulary.
    assert {getattr(theirs.config, key) for key in ("bos_token_id", "eos_token_id",
                                                     "cls_token_id", "sep_token_id")} == {None}
    theirs.set_attn_implementation("eager")
    ids, mask = padded_batch()
    with torch.no_grad():
        assert_equal_at_real_positions(ours(ids, mask), theirs(
            input_ids=ids, attention_mask=mask).last_hidden_state, mask)


def test_bad_inputs_name_the_argument():
    ours = from_transformers(transformers.BertModel(bert_config()))
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="input_ids: expected integer token ids"):
        ours(ids.float())
    with pytest.raises(ValueError, match="attention_mask: expected an integer or boolean"):
        ours(ids, mask[:, :5])
    with pytest.raises(ValueError, match="input_ids: expected at most 64 positions"):
        ours(torch.ones(1, 65, dtype=torch.long))


# ---------------------------------------------------------------------------------------
# register_with_transformers


def decoder_configs() -> dict[str, tuple[str, object]]:
    common = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 37, **TOKEN_IDS}
    return {
        "llama-gqa": ("LlamaModel", transformers.LlamaConfig(num_key_value_heads=2, **common)),
        "qwen3-gqa": ("Qwen3Model", transformers.Qwen3Config(
            num_key_value_heads=1, head_dim=8, **common)),
        "mistral-sliding": ("MistralModel", transformers.MistralConfig(
            num_key_value_heads=2, sliding_window=5, **common)),
    }


REGISTERED = [
    ("BertModel", lambda: bert_config(), False),
    ("ModernBertModel", lambda: modernbert_config(), False),
    *[(name, (lambda config=config: config), True)
      for name, config in decoder_configs().values()],
]


def twins(name: str, make_config) -> tuple[nn.Module, nn.Module]:
    """The same random model with eager attention and with ours."""
    implementation = register_with_transformers()
    torch.manual_seed(0)
    cls = getattr(transformers, name)
    eager = cls._from_config(copy.deepcopy(make_config()), attn_implementation="eager").eval()
    ours = cls._from_config(copy.deepcopy(make_config()),
                            attn_implementation=implementation).eval()
    ours.load_state_dict(eager.state_dict())
    return eager, ours


@pytest.mark.parametrize(("name", "make_config", "causal"), REGISTERED,
                         ids=[case[0] for case in REGISTERED])
def test_registered_attention_equals_eager_with_padding(name, make_config, causal):
    eager, ours = twins(name, make_config)
    assert ours.config._attn_implementation == "attention_blocks"
    ids, mask = padded_batch(24, left=causal)  # decoders pad on the left
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_equal_at_real_positions(got, expected, mask)
        # A row of padding only: no key to attend, zeros from our attention, no NaN.
        mask[0] = 0
        assert torch.isfinite(ours(input_ids=ids, attention_mask=mask).last_hidden_state).all()


def test_registered_attention_generates_what_eager_generates():
    config = decoder_configs()["llama-gqa"][1]
    eager, ours = twins("LlamaForCausalLM", lambda: config)
    ids, mask = padded_batch(16, left=True)
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, **options),
                       eager.generate(input_ids=ids, attention_mask=mask, **options))


def test_registered_attention_uses_attend(monkeypatch):
    """The model's attention runs through attention.attend, not transformers' own."""
    from attention.interop import registry

    calls = []
    original = registry.attend
    monkeypatch.setattr(registry, "attend", lambda *a, **k: calls.append(1) or original(*a, **k))
    _, ours = twins("BertModel", bert_config)
    ids, mask = padded_batch(12)
    with torch.no_grad():
        ours(input_ids=ids, attention_mask=mask)
    assert len(calls) == 2  # one per layer


def test_importing_the_package_does_not_import_transformers():
    code = ("import sys, attention, attention.interop; "
            "print('transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def test_token_types_reach_bert_and_are_checked():
    torch.manual_seed(0)
    theirs = transformers.BertModel(bert_config(type_vocab_size=2)).eval()
    ours = from_transformers(theirs)
    ids, mask = padded_batch()
    types = (torch.arange(40) >= 20).long().expand(3, -1)
    with torch.no_grad():
        assert_equal_at_real_positions(
            ours(ids, mask, types),
            theirs(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state,
            mask)
    with pytest.raises(ValueError, match="token_type_ids: expected integer ids of the shape"):
        ours(ids, mask, types[:, :5])
    modern = from_transformers(transformers.ModernBertModel(modernbert_config()))
    with pytest.raises(ValueError, match="token_type_ids: expected None"):
        modern(ids, mask, types)


def test_half_precision_conversion_keeps_rotary_frequencies_in_float32():
    ours = from_transformers(transformers.ModernBertForSequenceClassification(
        modernbert_config(classifier_pooling="mean")).to(torch.bfloat16))
    assert next(ours.parameters()).dtype == torch.bfloat16
    assert {layer.self_attn.rotary.inv_freq.dtype
            for layer in ours.encoder.encoder.layers} == {torch.float32}
    ids, _ = padded_batch()
    assert ours(ids).dtype == torch.bfloat16  # mean pooling without a mask stays in bf16


def test_a_head_without_its_norm_is_refused_by_name():
    ours = from_transformers(transformers.ModernBertForMaskedLM(modernbert_config()))
    ours.head.norm = None
    with pytest.raises(ValueError, match="expected head.norm, got None"):
        to_transformers(ours)


def test_registered_attention_reads_a_4d_mask_as_sdpa_does():
    """A 4-D boolean mask a user passes goes to the attention function as given, in SDPA's
    meaning (True = may attend): ours equals transformers' SDPA on it."""
    implementation = register_with_transformers()
    torch.manual_seed(0)
    sdpa = transformers.LlamaModel._from_config(
        copy.deepcopy(decoder_configs()["llama-gqa"][1]), attn_implementation="sdpa").eval()
    ours = transformers.LlamaModel._from_config(
        copy.deepcopy(decoder_configs()["llama-gqa"][1]),
        attn_implementation=implementation).eval()
    ours.load_state_dict(sdpa.state_dict())
    ids, _ = padded_batch(10)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()
    allowed[:, 0] = False  # nobody sees the first token
    allowed[0, 0] = True
    mask = allowed.expand(3, 1, 10, 10)
    with torch.no_grad():
        assert_close(ours(input_ids=ids, attention_mask=mask).last_hidden_state,
                     sdpa(input_ids=ids, attention_mask=mask).last_hidden_state,
                     atol=1e-4, rtol=1e-4)
