"""``psft train`` end to end on a tiny Llama saved to a temporary folder, run as
``python -m psft_ext`` in a subprocess, and its errors on bad input."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

WORDS = ["<pad>", "<eos>", "<unk>", "hello", "world", "the", "cat", "sat", "on", "mat", "a",
         "dog", "ran", "user:", "assistant:"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def _config(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=24, pad_token_id=0, eos_token_id=1,
                       bos_token_id=1, **kw)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    LlamaForCausalLM(_config()).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A LlamaModel: a backbone without an LM head."""
    import torch
    from transformers import LlamaModel
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    LlamaModel(_config()).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


def _data(tmp_path, lines=None):
    path = tmp_path / "train.jsonl"
    if lines is None:
        rows = [{"prompt": "the cat", "completion": "sat on the mat"},
                {"prompt": "a dog", "completion": "ran"},
                {"prompt": "hello", "completion": "world"}] * 8
        lines = [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def psft(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "psft_ext", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _train(model, data, out, *extra):
    return psft("train", "--model", model, "--data", data, "--output-dir", out,
                "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0",
                "--logging-steps", "1", "--no-progress", *extra)


def test_train_then_resume(tiny_model, tmp_path):
    data = _data(tmp_path)
    out = str(tmp_path / "out")
    # A first run of 2 steps, checkpointed at step 2; then a run of 4 steps resumes from it.
    r = _train(tiny_model, data, out, "--max-steps", "2", "--save-steps", "2",
               "--steps-per-old-policy", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    final = os.path.join(out, "final")
    metrics = json.load(open(os.path.join(final, "metrics.json")))
    assert metrics["global_step"] == 2 and metrics["loss"] == "psft"
    assert any("clip_fraction" in row and "entropy" in row for row in metrics["log_history"])
    assert os.path.isfile(os.path.join(final, "config.json"))
    assert os.path.isdir(os.path.join(out, "checkpoints", "checkpoint-2"))

    # A finished output folder is not overwritten.
    r = _train(tiny_model, data, out, "--max-steps", "2")
    assert r.returncode != 0 and "already holds a finished run" in r.stderr

    # Resume: move the finished model away, continue from checkpoint-2 to step 4.
    os.rename(final, os.path.join(out, "first"))
    r = _train(tiny_model, data, out, "--max-steps", "4", "--save-steps", "2",
               "--steps-per-old-policy", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.load(open(os.path.join(final, "metrics.json")))
    assert metrics["global_step"] == 4
    assert metrics["resumed_from"].endswith(os.path.join("checkpoints", "checkpoint-2"))
    steps = [row["step"] for row in metrics["log_history"] if "loss" in row]
    assert steps[-1] == 4 and 3 in steps


def test_train_sft_and_chat(tiny_model, tmp_path):
    from transformers import AutoTokenizer
    # A copy of the model whose tokenizer has a chat template.
    import shutil
    model = str(tmp_path / "chat_model")
    shutil.copytree(tiny_model, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}"
                         "{% if m['role'] == 'assistant' %}{{ eos_token + ' ' }}{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}"
                         "{% endif %}")
    tok.save_pretrained(model)
    rows = [{"messages": [{"role": "user", "content": "the cat"},
                          {"role": "assistant", "content": "sat on the mat"}]}] * 8
    data = _data(tmp_path, [json.dumps(r) for r in rows])
    out = str(tmp_path / "out")
    r = _train(model, data, out, "--max-steps", "2", "--loss", "sft")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.load(open(os.path.join(out, "final", "metrics.json")))
    assert metrics["hyperparameters"]["steps_per_old_policy"] == 1
    clips = [row["clip_fraction"] for row in metrics["log_history"] if "clip_fraction" in row]
    assert clips and all(c == 0 for c in clips)


def _fails_in_process(capsys, argv, *needles):
    """The error path in this process (one import of transformers for all the cases): exit
    status 2, a one-line message naming what is wrong, no traceback."""
    from psft_ext.cli.main import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("psft train: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_train_missing_model_subprocess(tmp_path):
    r = _train(str(tmp_path / "nope"), _data(tmp_path), str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "nope" in r.stderr and "model folder not found" in r.stderr
    assert not (tmp_path / "out").exists()


def test_train_bad_inputs(tiny_model, base_model, tmp_path, capsys):
    good = _data(tmp_path)
    out = tmp_path / "out"

    def argv(model, data, *extra):
        return ["train", "--model", model, "--data", data, "--output-dir", str(out),
                "--no-progress", *extra]

    _fails_in_process(capsys, argv(str(tmp_path / "nope"), good), "nope",
                      "model folder not found")
    _fails_in_process(capsys, argv(str(tmp_path), good), "no config.json")
    _fails_in_process(capsys, argv(tiny_model, str(tmp_path / "missing.jsonl")),
                      "missing.jsonl", "not found")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the cat", "completion": "sat"}\n\n{"prompt": "a dog", '
                   '"completion": \n')
    _fails_in_process(capsys, argv(tiny_model, str(bad)), f"{bad}:3", "not valid JSON")

    keys = tmp_path / "keys.jsonl"
    keys.write_text('{"prompt": "the cat", "completion": "sat"}\n{"text": "hello"}\n')
    _fails_in_process(capsys, argv(tiny_model, str(keys)), f"{keys}:2", "prompt")

    types = tmp_path / "types.jsonl"
    types.write_text('{"prompt": "the cat", "completion": 3}\n')
    _fails_in_process(capsys, argv(tiny_model, str(types)), f"{types}:1", "strings")

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"},
                                             {"role": "assistant", "content": "world"}]}) + "\n")
    _fails_in_process(capsys, argv(tiny_model, str(chat)), f"{chat}:1", "no chat template")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _fails_in_process(capsys, argv(tiny_model, str(empty)), str(empty), "empty")

    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "the cat", "completion": "sat"}\n'
                    + json.dumps({"prompt": "the cat " * 20, "completion": "sat"}) + "\n")
    _fails_in_process(capsys, argv(tiny_model, str(long)), f"{long}:2",
                      "longer than the limit of 24")
    _fails_in_process(capsys, argv(tiny_model, str(long), "--max-length", "3"), f"{long}:1",
                      "longer than the limit of 3")

    _fails_in_process(capsys, argv(base_model, good), "LlamaModel",
                      "no language-modelling head")

    _fails_in_process(capsys, argv(tiny_model, good, "--resume"), "no checkpoint")
    # None of the failures left an output folder behind.
    assert not out.exists()


def test_load_model_in_float32(tmp_path):
    """A bfloat16 checkpoint trains with float32 weights (transformers would keep it in bf16,
    where AdamW's small updates mostly round away; --bf16 is autocast over float32 weights)."""
    import torch
    from transformers import LlamaForCausalLM

    from psft_ext.cli.train import load_model
    torch.manual_seed(0)
    saved = LlamaForCausalLM(_config()).to(torch.bfloat16)
    saved.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for (name, p), q in zip(model.named_parameters(), saved.parameters()):
        assert torch.equal(p, q.float()), name
