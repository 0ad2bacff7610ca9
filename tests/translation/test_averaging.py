"""Checkpoint averaging: the mean of the weights, the rest of the last checkpoint, the checks
that the checkpoints are of one model, and the ``attention-average`` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention.translation.averaging import average_checkpoints, average_state_dicts
from attention.translation.checkpoint import load_checkpoint, save_checkpoint
from attention.translation.cli import average_main
from attention.translation.loss import target_tokens
from attention.translation.training import Trainer
from attention.translation.translator import Translator

ROOT = Path(__file__).resolve().parents[2]


def one_step(trainer: Trainer) -> None:
    batches = trainer.step_batches(trainer.epoch_batches())
    trainer.train_step(batches, target_tokens(batches))


@pytest.fixture
def checkpoints(make_trainer) -> list[Path]:
    """Three checkpoints of one run, after steps 1, 2 and 3 (tied embeddings: the default)."""
    trainer = make_trainer()
    paths = []
    for step in (1, 2, 3):
        one_step(trainer)
        paths.append(trainer.save(f"checkpoint_step{step}.pt"))
    return paths


def tied_keys(state_dict: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """The pairs of keys that hold one tensor."""
    first_of: dict[int, str] = {}
    pairs = []
    for key, value in state_dict.items():
        if value.data_ptr() in first_of:
            pairs.append((first_of[value.data_ptr()], key))
        else:
            first_of[value.data_ptr()] = key
    return pairs


def test_the_average_of_one_checkpoint_is_that_checkpoint(checkpoints):
    only = load_checkpoint(checkpoints[0])
    average = average_checkpoints([checkpoints[0]])
    assert average.keys() == only.keys() | {"averaged_from"}
    assert average["averaged_from"] == [{"file": "checkpoint_step1.pt", "step": 1}]
    for key, value in only["model"].items():
        assert torch.equal(average["model"][key], value), key
        assert average["model"][key].dtype == value.dtype, key


def test_the_average_of_two_is_their_mean_with_the_rest_of_the_last(checkpoints, tmp_path):
    first, last = load_checkpoint(checkpoints[0]), load_checkpoint(checkpoints[1])
    average = average_checkpoints(checkpoints[:2])

    assert average["model"].keys() == last["model"].keys()
    for key, value in last["model"].items():
        torch.testing.assert_close(average["model"][key], (first["model"][key] + value) / 2,
                                   msg=key)
    assert not torch.equal(average["model"]["lm_head.weight"], last["model"]["lm_head.weight"])
    assert average["progress"] == last["progress"] and average["progress"]["step"] == 2
    assert average["config"] == last["config"] and average["tokenizers"] == last["tokenizers"]
    torch.testing.assert_close(average["optimizer"], last["optimizer"], rtol=0, atol=0)
    assert average["averaged_from"] == [{"file": "checkpoint_step1.pt", "step": 1},
                                        {"file": "checkpoint_step2.pt", "step": 2}]

    # Given in the order a shell sorts checkpoint_step1000.pt before _step900.pt: the same.
    reversed_order = average_checkpoints(checkpoints[1::-1])
    assert reversed_order["progress"]["step"] == 2
    assert reversed_order["averaged_from"] == average["averaged_from"]

    # Tied weights: one tensor in the checkpoints, one in the average, one in the model.
    pairs = tied_keys(last["model"])
    assert pairs, "the default config ties the target embedding and the output head"
    for a, b in pairs:
        assert average["model"][a] is average["model"][b]
    path = save_checkpoint(tmp_path / "average.pt", average)
    model = Translator.from_checkpoint(path, device="cpu").model
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for a, b in pairs:
        assert parameters[a] is parameters[b]
        torch.testing.assert_close(parameters[a].detach(), average["model"][a])


def test_integer_buffers_come_from_the_last_and_floats_keep_their_dtype():
    state_dicts = [{"weight": torch.tensor([1.0, 2.0]), "half": torch.tensor([60000.0]).half(),
                    "bf16": torch.tensor([1.0, 3.0]).bfloat16(), "count": torch.tensor(n),
                    "mask": torch.tensor([n % 2 == 0])} for n in (1, 2, 3)]
    for n, state_dict in enumerate(state_dicts):
        state_dict["weight"] = state_dict["weight"] * (n + 1)  # 1, 2, 3 times
    average = average_state_dicts(state_dicts)
    assert list(average) == list(state_dicts[0])
    torch.testing.assert_close(average["weight"], torch.tensor([2.0, 4.0]))
    # The sum 180000 overflows float16; the float64 sum does not.
    assert average["half"].dtype == torch.float16 and average["half"].item() == 60000.0
    assert average["bf16"].dtype == torch.bfloat16
    assert average["bf16"].tolist() == [1.0, 3.0]
    assert average["count"].item() == 3 and average["count"].dtype == torch.int64
    assert average["mask"].tolist() == [False]
    assert state_dicts[0]["weight"].tolist() == [1.0, 2.0]  # its inputs untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_low_precision_average_is_the_float64_mean_rounded_once(dtype):
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, generator=generator).to(dtype) for _ in range(5)]
    average = average_state_dicts([{"w": w} for w in weights])["w"]
    assert average.dtype == dtype
    expected = (sum(w.double() for w in weights) / 5).to(dtype)
    assert torch.equal(average, expected)


def test_a_tie_that_only_some_state_dicts_have_is_averaged_key_by_key():
    shared = torch.tensor([2.0])
    tied = {"a": shared, "b": shared}
    untied = {"a": torch.tensor([4.0]), "b": torch.tensor([6.0])}
    average = average_state_dicts([tied, untied])
    assert average["a"].item() == 3.0 and average["b"].item() == 4.0


@pytest.mark.parametrize("other, message", [
    ({"w": torch.zeros(2)}, r"state dict 1: expected the keys of state dict 0, got others: "
                            r"missing 'n'"),
    ({"w": torch.zeros(2), "n": torch.tensor(1), "x": torch.zeros(1)}, r"unexpected 'x'"),
    ({"w": torch.zeros(3), "n": torch.tensor(1)},
     r"state dict 1: 'w' has shape \(3,\), expected \(2,\) \(as in state dict 0\)"),
    ({"w": torch.zeros(2).double(), "n": torch.tensor(1)},
     r"state dict 1: 'w' is torch.float64, expected torch.float32"),
    ({"w": torch.zeros(2), "n": torch.tensor(1.0)}, r"'n' is torch.float32, expected torch.int64"),
])
def test_state_dicts_that_differ_are_refused_naming_the_key(other, message):
    first = {"w": torch.ones(2), "n": torch.tensor(0)}
    with pytest.raises(ValueError, match=message):
        average_state_dicts([first, other])


def test_nothing_to_average_is_refused(checkpoints):
    with pytest.raises(ValueError, match="at least one"):
        average_state_dicts([])
    with pytest.raises(ValueError, match="at least one checkpoint"):
        average_checkpoints([])
    with pytest.raises(ValueError, match="checkpoint_step1.pt: given twice"):
        average_checkpoints([checkpoints[0], checkpoints[1], checkpoints[0]])


def test_checkpoints_of_another_model_are_refused_naming_the_file(checkpoints, make_trainer,
                                                                  tmp_path):
    other = make_trainer("model.d_ff=48", name="other")
    wider = other.save("wider.pt")
    with pytest.raises(ValueError, match=r"wider.pt: not the same model as .*checkpoint_step1"
                                         r".pt: its config's model.d_ff is 48, expected 32"):
        average_checkpoints([checkpoints[0], wider])

    checkpoint = load_checkpoint(checkpoints[1])
    checkpoint["tokenizers"] = {**checkpoint["tokenizers"],
                                "target": checkpoint["tokenizers"]["source"]}
    retokenized = save_checkpoint(tmp_path / "retokenized.pt", checkpoint)
    with pytest.raises(ValueError, match=r"retokenized.pt: not the same model as .*: its target "
                                         r"tokenizer differs \(\d+ tokens, expected \d+ tokens"):
        average_checkpoints([checkpoints[0], retokenized])

    checkpoint = load_checkpoint(checkpoints[1])
    del checkpoint["model"]["lm_head.weight"]
    pruned = save_checkpoint(tmp_path / "pruned.pt", checkpoint)
    with pytest.raises(ValueError, match=r"pruned.pt: expected the keys of .*checkpoint_step1.pt,"
                                         r" got others: missing 'lm_head.weight'"):
        average_checkpoints([checkpoints[0], pruned])

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        average_checkpoints([checkpoints[0], tmp_path / "missing.pt"])


def test_the_command_writes_a_checkpoint_that_translates(checkpoints, tmp_path, capsys):
    output = tmp_path / "average.pt"
    assert average_main([*map(str, checkpoints), "--output", str(output)]) == 0
    summary = capsys.readouterr().err.strip()
    assert summary == f"averaged 3 checkpoints (steps 1, 2, 3) into {output}"

    average = load_checkpoint(output)
    assert [source["step"] for source in average["averaged_from"]] == [1, 2, 3]
    assert average["progress"]["step"] == 3
    expected = average_checkpoints(checkpoints)["model"]
    for key, value in expected.items():
        assert torch.equal(average["model"][key], value), key
    translations = Translator.from_checkpoint(output, device="cpu").translate(["a cat runs"])
    assert len(translations) == 1 and isinstance(translations[0], str)


def test_the_command_refuses_to_overwrite(checkpoints, tmp_path, capsys):
    inputs = [str(path) for path in checkpoints[:2]]
    before = checkpoints[1].read_bytes()
    assert average_main([*inputs, "--output", inputs[1], "--force"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is one of the checkpoints to average" in error
    assert checkpoints[1].read_bytes() == before

    output = tmp_path / "average.pt"
    output.write_text("an earlier average")
    assert average_main([*inputs, "--output", str(output)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert output.read_text() == "an earlier average"
    assert average_main([*inputs, "--output", str(output), "--force"]) == 0
    assert load_checkpoint(output)["averaged_from"][-1]["step"] == 2


def test_the_command_fails_in_one_line_on_a_bad_checkpoint(checkpoints, tmp_path, capsys):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    assert average_main([str(checkpoints[0]), str(broken), "--output",
                         str(tmp_path / "average.pt")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "broken.pt" in error
    assert not (tmp_path / "average.pt").exists()


def test_the_script_runs_the_command():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "average.py"), "--help"],
                            capture_output=True, text=True, check=True)
    assert "--output" in result.stdout and "attention-average" in result.stdout
