"""Models that ship: the model folder (safetensors + JSON) round trip and its refusals, the
CTranslate2 export translating as ours does, the attention-export command and the
agreement benchmark, at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from attention.models import Transformer
from attention.translation.cli import export_main
from attention.translation.config import EvalConfig, load_config
from attention.translation.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS
from attention.translation.translator import Translator

pytest.importorskip("safetensors")

from attention.translation.export import (  # noqa: E402  (after the skip)
    FORMAT,
    export_ctranslate2,
    model_config_of,
    save_pretrained,
)
from attention.translation.export.folder import FILES  # noqa: E402
from attention.translation.runs import latest_run

ROOT = Path(__file__).resolve().parents[2]
SRC_VOCAB, TGT_VOCAB = 40, 36
MAX_NEW = 24
# name: Transformer keyword arguments (all at d_model=16, two layers each side)
VARIANTS = {
    "prenorm-gelu-tied": dict(tie_embeddings=True),
    "prenorm-gelu-untied": dict(tie_embeddings=False),
    "postnorm-relu": dict(norm_first=False, activation="relu", tie_embeddings=True),
    "learned-positions": dict(positional="learned", max_len=32, tie_embeddings=False),
    # one vocabulary (the source's) for both sides, one matrix for all three embeddings; seed
    # 4 draws weights whose greedy outputs end some sentences (the default's end none)
    "shared-vocabulary-all-tied": dict(tie_embeddings="all", seed=4),
}
# Issue 27's attention variants, all at once: a model folder carries them (CTranslate2's plain
# Transformer does not: its export refuses them).
FOLDER_VARIANTS = VARIANTS | {
    "todays-attention": dict(n_kv_heads=1, window=2, global_every=2, alibi=True, softcap=5.0,
                             qk_norm=True, norm="rmsnorm", activation="swiglu"),
}


def word_tokenizer(size: int, prefix: str) -> Tokenizer:
    """A word-level tokenizer of ``size`` tokens: the special ones, then ``prefix0``…"""
    words = SPECIAL_TOKENS + [f"{prefix}{i}" for i in range(size - len(SPECIAL_TOKENS))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                           unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def tiny_translator(seed: int = 0, **overrides) -> Translator:
    """A random-weight translator whose weights are scaled up (×3), so that the next token's
    argmax is not a near-tie that rounding could flip between two engines."""
    torch.manual_seed(seed)
    kwargs = dict(d_model=16, n_heads=2, n_encoder_layers=2, n_decoder_layers=2, d_ff=32,
                  dropout=0.0, pad_id=PAD_ID, **overrides)
    shared = overrides.get("tie_embeddings") == "all"
    src_tokenizer = word_tokenizer(SRC_VOCAB, "s")
    tgt_tokenizer = src_tokenizer if shared else word_tokenizer(TGT_VOCAB, "t")
    model = Transformer(SRC_VOCAB, tgt_tokenizer.get_vocab_size(), **kwargs).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3)
    return Translator(model, src_tokenizer, tgt_tokenizer,
                      EvalConfig(beam_size=2, max_len_b=7), precision="fp32")


def random_sources(count: int = 24, seed: int = 1) -> list[list[int]]:
    """Source ids without ``eos``, 1 to 9 tokens, none special."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (count,), generator=generator)
    return [torch.randint(len(SPECIAL_TOKENS), SRC_VOCAB, (int(n),), generator=generator)
            .tolist() for n in lengths]


def padded_with_eos(sources: list[list[int]]) -> torch.Tensor:
    """``(batch, longest + 1)``: each source, then ``eos``, then padding."""
    batch = torch.full((len(sources), max(map(len, sources)) + 1), PAD_ID)
    for row, ids in enumerate(sources):
        batch[row, :len(ids) + 1] = torch.tensor(ids + [EOS_ID])
    return batch


def our_tokens(translator: Translator, sources: list[list[int]], beam_size: int
               ) -> list[list[str]]:
    out = translator.model.generate(padded_with_eos(sources), MAX_NEW, BOS_ID, EOS_ID,
                                    beam_size=beam_size)
    return [[translator.tgt_tokenizer.id_to_token(t) for t in row if t != PAD_ID]
            for row in out.tolist()]


# The model folder ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", FOLDER_VARIANTS)
def test_folder_round_trip_gives_the_same_weights_and_translations(tmp_path, variant):
    translator = tiny_translator(**FOLDER_VARIANTS[variant])
    folder = save_pretrained(translator, tmp_path / "model")
    loaded = Translator.from_pretrained(folder, device="cpu")

    saved_state, loaded_state = translator.model.state_dict(), loaded.model.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for name in saved_state:
        torch.testing.assert_close(loaded_state[name], saved_state[name], rtol=0, atol=0)
    tied = FOLDER_VARIANTS[variant].get("tie_embeddings", False)
    assert (loaded.model.lm_head.weight is loaded.model.tgt_embed.weight) is bool(tied)
    assert (loaded.model.src_embed.weight is loaded.model.tgt_embed.weight) is (tied == "all")
    assert model_config_of(loaded.model) == model_config_of(translator.model)
    assert loaded.eval_config == translator.eval_config and loaded.precision == "fp32"
    sources = padded_with_eos(random_sources())
    for beam_size in (1, 3):
        torch.testing.assert_close(
            loaded.model.generate(sources, MAX_NEW, BOS_ID, EOS_ID, beam_size=beam_size),
            translator.model.generate(sources, MAX_NEW, BOS_ID, EOS_ID, beam_size=beam_size))


def test_folder_holds_only_json_and_safetensors_and_a_tied_weight_once(tmp_path):
    from safetensors import safe_open

    folder = save_pretrained(tiny_translator(tie_embeddings=True), tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    for path in folder.glob("*.json"):
        json.loads(path.read_text(encoding="utf-8"))  # JSON, not a pickle
    with safe_open(str(folder / "model.safetensors"), framework="pt") as file:
        assert file.metadata() == {"format": FORMAT}
        names = set(file.keys())
    assert "tgt_embed.weight" in names and "lm_head.weight" not in names
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == FORMAT
    assert config["tied_weights"] == {"lm_head.weight": "tgt_embed.weight"}
    assert config["special_tokens"] == {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    assert (config["src_vocab_size"], config["tgt_vocab_size"]) == (SRC_VOCAB, TGT_VOCAB)
    assert config["model"]["d_model"] == 16 and config["eval"]["beam_size"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left beside it


def test_save_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    save_pretrained(tiny_translator(), out)  # an empty folder is taken
    (out / "stale.txt").write_text("from before")
    with pytest.raises(FileExistsError, match="out_dir: .*model exists and is not empty"):
        save_pretrained(tiny_translator(), out)
    assert (out / "stale.txt").exists()  # untouched
    save_pretrained(tiny_translator(seed=1), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def _rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


BREAKAGES = {
    "missing weights": (lambda f: (f / "model.safetensors").unlink(),
                        FileNotFoundError, "missing model.safetensors"),
    "wrong format": (lambda f: _rewrite_json(f / "config.json",
                                             lambda c: c.update(format="other/2")),
                     ValueError, "config.json: expected format 'attention-translation-model/1'"
                                 ", got 'other/2'"),
    "not json": (lambda f: (f / "config.json").write_text("{not json"),
                 ValueError, "config.json: expected JSON"),
    "bad model value": (lambda f: _rewrite_json(f / "config.json",
                                                lambda c: c["model"].update(d_ff="wide")),
                        ValueError, "model.d_ff: expected int, got str 'wide'"),
    "weights of another shape": (lambda f: _rewrite_json(f / "config.json",
                                                         lambda c: c["model"].update(d_ff=48)),
                                 ValueError, r"weights do not match.*shapes encoder\.layers\.0"
                                             r"\.feed_forward\.linear1\.weight \(32, 16\) "
                                             r"\(expected \(48, 16\)\)"),
    "untied in the config": (lambda f: _rewrite_json(
        f / "config.json", lambda c: c["model"].update(tie_embeddings=False)),
        ValueError, "expected tied weights {}.*got {'lm_head.weight'"),
    "truncated weights": (lambda f: _truncate(f / "model.safetensors"),
                          ValueError, "model.safetensors: not a safetensors file"),
    "tokenizer of another size": (lambda f: (f / "target_tokenizer.json").write_text(
        word_tokenizer(TGT_VOCAB + 1, "t").to_str()),
        ValueError, "target_tokenizer.json: expected 36 tokens .*got 37"),
    "not a tokenizer": (lambda f: (f / "source_tokenizer.json").write_text("{}"),
                        ValueError, "source_tokenizer.json: not a tokenizer's JSON"),
    "eval value out of range": (lambda f: _rewrite_json(
        f / "config.json", lambda c: c["eval"].update(batch_size=0)),
        ValueError, "config.json: eval.batch_size: expected a positive number, got 0"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_folder_is_refused_with_its_path_and_reason(tmp_path, breakage):
    folder = save_pretrained(tiny_translator(tie_embeddings=True), tmp_path / "model")
    breaks, error, message = BREAKAGES[breakage]
    breaks(folder)
    with pytest.raises(error, match=message) as raised:
        Translator.from_pretrained(folder, device="cpu")
    assert str(folder) in str(raised.value)


def test_a_missing_folder_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: model folder not found: .*nowhere"):
        Translator.from_pretrained(tmp_path / "nowhere", device="cpu")


def test_a_model_a_config_cannot_describe_is_refused(tmp_path):
    translator = tiny_translator()
    translator.model = Transformer(SRC_VOCAB, TGT_VOCAB, d_model=16, n_heads=2,
                                   n_encoder_layers=1, n_decoder_layers=1, bias=True)
    with pytest.raises(ValueError, match="bias: expected a model built with bias=False"):
        save_pretrained(translator, tmp_path / "model")
    translator.model = Transformer(SRC_VOCAB, TGT_VOCAB, d_model=16, n_heads=2,
                                   n_encoder_layers=1, n_decoder_layers=1,
                                   activation=torch.tanh)
    with pytest.raises(ValueError, match="activation: expected one of"):
        save_pretrained(translator, tmp_path / "model")
    assert not (tmp_path / "model").exists()


# CTranslate2 -----------------------------------------------------------------------------


@pytest.fixture
def ctranslate2():
    return pytest.importorskip("ctranslate2")


def ctranslate2_tokens(model, translator: Translator, sources: list[list[int]],
                       beam_size: int) -> list[list[str]]:
    """CTranslate2's output tokens with our search's rules (no pad or bos, may end at once,
    eos kept) and our length limit; the model appends the source's eos itself."""
    tokens = [[translator.src_tokenizer.id_to_token(i) for i in ids] for ids in sources]
    results = model.translate_batch(
        tokens, beam_size=beam_size, max_decoding_length=MAX_NEW, min_decoding_length=0,
        suppress_sequences=[["<pad>"], ["<bos>"]], return_end_token=True)
    return [result.hypotheses[0] for result in results]


def our_log_probs(translator: Translator, source: list[int], target: list[int]) -> torch.Tensor:
    """Teacher-forced log-probabilities of ``target + [eos]`` given ``source``."""
    labels = torch.tensor(target + [EOS_ID])
    logits = translator.model(padded_with_eos([source]), torch.tensor([[BOS_ID, *target]]))[0]
    return logits.log_softmax(dim=-1).gather(-1, labels.unsqueeze(-1))[:, 0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_ctranslate2_float32_scores_and_greedy_tokens_equal_ours(tmp_path, ctranslate2,
                                                                 variant):
    translator = tiny_translator(**VARIANTS[variant])
    folder = export_ctranslate2(translator, tmp_path / "ct2")
    model = ctranslate2.Translator(str(folder), device="cpu", intra_threads=1)
    sources = random_sources()
    ours = our_tokens(translator, sources, beam_size=1)
    assert ctranslate2_tokens(model, translator, sources, beam_size=1) == ours
    assert any(row[-1] == "<eos>" for row in ours) and any(len(row) > 3 for row in ours)

    targets = random_sources(len(sources), seed=2)  # ids below the target vocabulary too
    targets = [[t % TGT_VOCAB or EOS_ID + 2 for t in row] for row in targets]
    scored = model.score_batch(
        [[translator.src_tokenizer.id_to_token(i) for i in ids] for ids in sources],
        [[translator.tgt_tokenizer.id_to_token(i) for i in ids] for ids in targets])
    for source, target, result in zip(sources, targets, scored, strict=True):
        torch.testing.assert_close(torch.tensor(result.log_probs),
                                   our_log_probs(translator, source, target),
                                   rtol=2e-4, atol=1e-4)  # logits of tens, float32


def test_ctranslate2_beam_search_equals_ours_where_ours_finishes(tmp_path, ctranslate2):
    """Beam search ranks finished hypotheses alike (log-probability over length, eos
    counted). Where a sentence reaches the length limit, ours also ranks its unfinished
    hypotheses and CTranslate2 prefers a finished one: there CTranslate2 ends in eos."""
    translator = tiny_translator(seed=3)
    with torch.no_grad():  # eos along the hidden states' mean: sentences of a few tokens
        hidden = {}
        hook = translator.model.lm_head.register_forward_hook(
            lambda module, inputs, output: hidden.setdefault("h", inputs[0]))
        translator.model(padded_with_eos(random_sources(seed=5)),
                         torch.randint(4, TGT_VOCAB, (24, 8)))
        hook.remove()
        mean = hidden["h"].mean(dim=(0, 1))
        translator.model.lm_head.weight[EOS_ID] = 2.5 * mean / mean.norm()
    folder = export_ctranslate2(translator, tmp_path / "ct2")
    model = ctranslate2.Translator(str(folder), device="cpu", intra_threads=1)
    sources = random_sources()
    ours = our_tokens(translator, sources, beam_size=4)
    theirs = ctranslate2_tokens(model, translator, sources, beam_size=4)
    finished = [i for i, row in enumerate(ours) if row[-1] == "<eos>"]
    assert len(finished) >= 12 and any(len(ours[i]) >= 3 for i in finished)
    assert [theirs[i] for i in finished] == [ours[i] for i in finished]
    for i in set(range(len(ours))) - set(finished):
        assert theirs[i] == ours[i] or theirs[i][-1] == "<eos>"


def test_ctranslate2_int8_loads_and_translates(tmp_path, ctranslate2):
    translator = tiny_translator()
    before = {name: tensor.clone() for name, tensor in translator.model.state_dict().items()}
    float32 = export_ctranslate2(translator, tmp_path / "float32")
    int8 = export_ctranslate2(translator, tmp_path / "int8", quantization="int8")
    # Quantizing the exported copy leaves the model's own weights as they were.
    after = translator.model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert (int8 / "model.bin").stat().st_size < (float32 / "model.bin").stat().st_size
    model = ctranslate2.Translator(str(int8), device="cpu", compute_type="int8")
    sources = random_sources(8)
    outputs = ctranslate2_tokens(model, translator, sources, beam_size=2)
    vocabulary = set(translator.tgt_tokenizer.get_vocab())
    assert len(outputs) == 8 and all(row and set(row) <= vocabulary for row in outputs)


def test_ctranslate2_folder_carries_tokenizers_and_source_eos(tmp_path, ctranslate2):
    folder = export_ctranslate2(tiny_translator(), tmp_path / "ct2")
    assert {"model.bin", "config.json", "source_tokenizer.json",
            "target_tokenizer.json"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["add_source_eos"] is True and config["decoder_start_token"] == "<bos>"
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == \
        ("<bos>", "<eos>", "<unk>")
    assert Tokenizer.from_file(str(folder / "target_tokenizer.json")).get_vocab_size() == \
        TGT_VOCAB
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_ctranslate2(tiny_translator(), folder)
    export_ctranslate2(tiny_translator(), folder, overwrite=True)


def test_ctranslate2_refuses_rotary_positions_and_unknown_quantization(tmp_path, ctranslate2):
    with pytest.raises(ValueError, match="positional: expected sinusoidal or learned .*"
                                         "got 'rotary'"):
        export_ctranslate2(tiny_translator(positional="rotary"), tmp_path / "rotary")
    with pytest.raises(ValueError, match="quantization: expected None or one of .*got 'int3'"):
        export_ctranslate2(tiny_translator(), tmp_path / "q", quantization="int3")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("overrides, message", [
    (dict(n_kv_heads=1), r"n_kv_heads: expected None .*got 1"),
    (dict(window=3), r"window: expected None .*got 3"),
    (dict(alibi=True), r"alibi: expected False .*got True"),
    (dict(softcap=5.0), r"softcap: expected None .*got 5.0"),
    (dict(qk_norm=True), r"qk_norm: expected False .*got True"),
    (dict(norm="rmsnorm"), r"norm: expected 'layernorm' .*got 'rmsnorm'"),
    (dict(activation="geglu"), r"activation: expected one of .*got 'geglu'"),
])
def test_ctranslate2_refuses_the_attention_variants_by_name(tmp_path, ctranslate2, overrides,
                                                             message):
    with pytest.raises(ValueError, match=message):
        export_ctranslate2(tiny_translator(**overrides), tmp_path / "variant")
    assert not any(tmp_path.iterdir())


# attention-export and the benchmark ------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint of a two-step run of the tiny config: seconds."""
    from attention.translation.training import train

    config = load_config(ROOT / "configs" / "tiny.yaml",
                         [f"train.run_dir={tmp_path_factory.mktemp('runs')}", "train.threads=1",
                          "train.device=cpu", "train.max_steps=2", "train.eval_every=1000",
                          "eval.val_sentences=2", "data.toy_test_size=6"])
    train(config, progress_bar=False, log=lambda message: None)
    return latest_run(config.run_path) / "checkpoint_best.pt"


SENTENCES = ["the dog sees a cat", "a cat runs", "the big dog sleeps"]


def test_export_command_writes_a_folder_that_translates_as_the_checkpoint(tmp_path,
                                                                          checkpoint):
    out = tmp_path / "model"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    original = Translator.from_checkpoint(checkpoint, device="cpu")
    assert Translator.from_pretrained(out, device="cpu").translate(SENTENCES) == \
        original.translate(SENTENCES)


def test_export_command_writes_ctranslate2(tmp_path, checkpoint, ctranslate2):
    out = tmp_path / "ct2"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out), "--format",
                        "ctranslate2", "--quantization", "int8"]) == 0
    assert json.loads((out / "config.json").read_text())["add_source_eos"] is True
    ctranslate2.Translator(str(out), device="cpu")


def test_export_command_errors_are_one_line_with_status_2(tmp_path, checkpoint, capsys):
    assert export_main(["--checkpoint", str(tmp_path / "none.pt"), "--out",
                        str(tmp_path / "a")]) == 2
    assert "checkpoint: file not found" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")  # an earlier export
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "taken")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: out_dir:") and "--force" in error and error.count("\n") == 1
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "taken"),
                        "--force"]) == 0
    # --force replaces an earlier export, never a folder holding anything else (here the
    # run's own folder, with its checkpoints).
    run = checkpoint.parent
    kept = sorted(p.name for p in run.iterdir())
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(run), "--force"]) == 2
    assert "holds more than an exported model" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == kept
    with pytest.raises(SystemExit) as exited:  # quantization is for ctranslate2 only
        export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"),
                     "--quantization", "int8"])
    assert exited.value.code == 2


def test_a_compiled_translator_saves_the_model_it_wraps(tmp_path):
    translator = tiny_translator()
    translator.model = torch.compile(translator.model)  # compiles lazily: nothing runs here
    folder = save_pretrained(translator, tmp_path / "model")
    loaded = Translator.from_pretrained(folder, device="cpu")
    original = translator.model._orig_mod.state_dict()
    assert loaded.model.state_dict().keys() == original.keys()
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in original.items())
