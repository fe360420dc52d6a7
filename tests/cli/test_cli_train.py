"""``psft train`` end to end on a tiny Llama saved to a temporary folder, run as
``python -m psft_ext`` in a subprocess; its arguments (transformers' HfArgumentParser over
PSFTConfig), its refusals on resume and its errors on bad input, in this process."""

import json
import os
import shutil
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


def _data(tmp_path, lines=None, name="train.jsonl"):
    path = tmp_path / name
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


FAST = ("--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--warmup_steps", "0",
        "--logging_steps", "1", "--disable_tqdm", "true")


def _train(model, data, out, *extra, out_flag="--output_dir"):
    return psft("train", "--model_name_or_path", model, "--train_file", data, out_flag, out,
                *FAST, *extra)


def _one_line_error(err, *needles):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("psft train: error:"), err
    for needle in needles:
        assert needle in lines[0], err


@pytest.fixture(scope="module")
def first_run(tiny_model, tmp_path_factory):
    """A run of 2 steps (2 per old policy), checkpointed at step 2; `--output-dir` spelling."""
    tmp = tmp_path_factory.mktemp("first")
    data = _data(tmp)
    out = str(tmp / "out")
    r = _train(tiny_model, data, out, "--max_steps", "2", "--save_steps", "2",
               "--steps_per_old_policy", "2", out_flag="--output-dir")
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(model=tiny_model, data=data, out=out)


def test_train_then_resume(first_run, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(first_run["out"], out)
    final = os.path.join(out, "final")
    metrics = json.load(open(os.path.join(final, "metrics.json")))
    assert metrics["global_step"] == 2 and metrics["loss"] == "psft"
    assert any("clip_fraction" in row and "entropy" in row for row in metrics["log_history"])
    checkpoint = os.path.join(out, "checkpoints", "checkpoint-2")
    for folder in (final, checkpoint):  # the model with its tokenizer
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            assert os.path.isfile(os.path.join(folder, name)), (folder, name)
    settings = json.load(open(os.path.join(checkpoint, "psft_train.json")))["settings"]
    assert settings["learning_rate"] == 1e-3 and settings["steps_per_old_policy"] == 2
    assert settings["train_file"] == first_run["data"]

    # A finished output folder is not overwritten.
    r = _train(first_run["model"], first_run["data"], out, "--max_steps", "2")
    assert r.returncode == 2 and "already holds a finished run" in r.stderr

    # Resume from checkpoint-2 to step 4 naming nothing but the folder and the new length: the
    # model, data, learning rate, batch size, group size and logging come from the checkpoint.
    os.rename(final, os.path.join(out, "first"))
    r = psft("train", "--output_dir", out, "--resume_from_checkpoint", "last", "--max_steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.load(open(os.path.join(final, "metrics.json")))
    assert metrics["global_step"] == 4
    assert metrics["resumed_from"].endswith(os.path.join("checkpoints", "checkpoint-2"))
    hp = metrics["hyperparameters"]
    assert hp["learning_rate"] == 1e-3 and hp["steps_per_old_policy"] == 2
    assert hp["per_device_train_batch_size"] == 4 and hp["max_steps"] == 4
    assert metrics["settings"]["logging_steps"] == 1
    logged = {row["step"]: row for row in metrics["log_history"] if "loss" in row}
    assert {3, 4} <= set(logged)
    assert all(logged[s]["learning_rate"] == 1e-3 for s in (3, 4))


@pytest.fixture
def resumable(first_run, tmp_path):
    """A copy of the first run without its final folder: a run to resume."""
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    shutil.rmtree(out / "final")
    return out


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if psft train loads the model or tokenizer."""
    from psft_ext.cli import train

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(train, "load_model", refuse)
    monkeypatch.setattr(train, "load_tokenizer", refuse)


def _listing(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, files in os.walk(folder) for f in files)


@pytest.mark.parametrize("extra, flags, what", [
    (["--learning_rate", "1e-2"], ["--learning_rate 0.001", "--learning_rate 0.01"],
     "the learning-rate schedule"),
    (["--lr_scheduler_type", "linear"], ["--lr_scheduler_type"], "the learning-rate schedule"),
    (["--warmup_steps", "5"], ["--warmup_steps"], "the learning-rate schedule"),
    (["--loss", "sft"], ["--loss psft", "--loss sft"], "the loss"),
    (["--clip_high", "0.5"], ["--clip_high"], "the loss"),
    (["--steps_per_old_policy", "4"], ["--steps_per_old_policy 2", "--steps_per_old_policy 4"],
     "the old-policy group"),
    (["--per_device_train_batch_size", "2"], ["--per_device_train_batch_size"],
     "the old-policy group"),
    (["--gradient_accumulation_steps", "2"], ["--gradient_accumulation_steps"],
     "the old-policy group"),
    (["--weight_decay", "0"], ["--weight_decay"], "the optimizer"),
    (["--learning_rate", "1e-2", "--steps_per_old_policy", "4"],
     ["--learning_rate", "--steps_per_old_policy"],
     "the learning-rate schedule or the old-policy group"),
])
def test_resume_refuses_changes(resumable, no_model_loading, capsys, extra, flags, what):
    from psft_ext.cli.main import main
    before = _listing(resumable)
    assert main(["train", "--output_dir", str(resumable), "--resume_from_checkpoint", "last",
                 *extra]) == 2
    _one_line_error(capsys.readouterr().err, "a resume cannot change " + what, *flags)
    assert _listing(resumable) == before


def test_resume_of_a_length_dependent_schedule(resumable, no_model_loading, capsys):
    """Under a schedule that decays over the run, a resume may not change the run's length (the
    constant schedule of the resume test may)."""
    from psft_ext.cli.main import main
    path = resumable / "checkpoints" / "checkpoint-2" / "psft_train.json"
    saved = json.loads(path.read_text())
    saved["settings"]["lr_scheduler_type"] = "linear"
    path.write_text(json.dumps(saved))
    assert main(["train", "--output_dir", str(resumable), "--resume_from_checkpoint", "last",
                 "--max_steps", "6"]) == 2
    _one_line_error(capsys.readouterr().err, "--max_steps 2", "--max_steps 6",
                    "the learning-rate schedule")


def test_resume_errors(resumable, tiny_model, tmp_path, no_model_loading, capsys):
    from psft_ext.cli.main import main
    empty = tmp_path / "empty"
    assert main(["train", "--model_name_or_path", tiny_model, "--train_file", "x.jsonl",
                 "--output_dir", str(empty), "--resume_from_checkpoint", "last"]) == 2
    _one_line_error(capsys.readouterr().err, "--resume_from_checkpoint last", "no checkpoint")
    plain = tmp_path / "plain"
    shutil.copytree(resumable / "checkpoints" / "checkpoint-2", plain)
    os.remove(plain / "psft_train.json")
    assert main(["train", "--output_dir", str(resumable), "--resume_from_checkpoint",
                 str(plain)]) == 2
    _one_line_error(capsys.readouterr().err, "psft_train.json")
    # Without --resume_from_checkpoint, a folder with checkpoints is not trained over.
    assert main(["train", "--model_name_or_path", tiny_model, "--train_file", "x.jsonl",
                 "--output_dir", str(resumable)]) == 2
    _one_line_error(capsys.readouterr().err, "--resume_from_checkpoint last")
    assert not empty.exists()


def test_train_sft_chat_eval_and_checkpoint_limit(tiny_model, tmp_path):
    from transformers import AutoTokenizer
    # A copy of the model whose tokenizer has a chat template.
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
    evaluation = _data(tmp_path, [json.dumps(r) for r in rows[:2]], name="eval.jsonl")
    out = str(tmp_path / "out")
    r = _train(model, data, out, "--max_steps", "3", "--loss", "sft", "--save_steps", "1",
               "--save_total_limit", "1", "--report_to", "none", "--seed", "7",
               "--eval_file", evaluation)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.load(open(os.path.join(out, "final", "metrics.json")))
    assert metrics["hyperparameters"]["steps_per_old_policy"] == 1
    assert metrics["hyperparameters"]["seed"] == 7
    clips = [row["clip_fraction"] for row in metrics["log_history"] if "clip_fraction" in row]
    assert clips and all(c == 0 for c in clips)
    assert metrics["eval"]["eval_loss"] > 0
    assert os.listdir(os.path.join(out, "checkpoints")) == ["checkpoint-3"]


BAD_VALUES = [
    (["--clip_low", "-0.1"], "--clip_low"),
    (["--clip_low", "1.5"], "--clip_low"),
    (["--clip_high", "-1"], "--clip_high"),
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--learning_rate", "nan"], "--learning_rate"),
    (["--learning_rate", "abc"], "--learning_rate"),
    (["--max_steps", "0"], "--max_steps"),
    (["--num_train_epochs", "0"], "--num_train_epochs"),
    (["--warmup_steps", "-1"], "--warmup_steps"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--steps_per_old_policy", "0"], "--steps_per_old_policy"),
    (["--save_steps", "1.5"], "--save_steps"),
    (["--logging_steps", "0"], "--logging_steps"),
    (["--save_total_limit", "0"], "--save_total_limit"),
    (["--max_length", "0"], "--max_length"),
    (["--seed", "-1"], "--seed"),
    (["--report_to", "bogus"], "--report_to bogus"),
    (["--loss", "xyz"], "--loss"),
    (["--loss", "sft", "--steps_per_old_policy", "8"], "--steps_per_old_policy 8"),
    (["--eval_strategy", "steps"], "--eval_file"),
    (["--remove_unused_columns", "true"], "--remove_unused_columns"),
    (["--lr", "1e-3"], "--learning_rate"),
    (["--data", "x.jsonl"], "--train_file"),
]


@pytest.mark.parametrize("extra, flag", BAD_VALUES)
def test_train_bad_values(tiny_model, tmp_path, no_model_loading, capsys, extra, flag):
    """Every bad value: one line naming the flag, exit status 2, before the model is loaded or a
    file written."""
    from psft_ext.cli.main import main
    out = tmp_path / "out"
    argv = ["train", "--model_name_or_path", tiny_model, "--train_file", _data(tmp_path),
            "--output_dir", str(out), *extra]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, flag)
    assert not out.exists()


def test_train_bad_precision_on_cpu(tiny_model, tmp_path, no_model_loading, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --bf16 / --fp16 are valid")
    from psft_ext.cli.main import main
    for flag in ("--bf16", "--fp16"):
        assert main(["train", "--model_name_or_path", tiny_model, "--train_file",
                     _data(tmp_path), "--output_dir", str(tmp_path / "out"), flag]) == 2
        _one_line_error(capsys.readouterr().err, flag, "--use_cpu")


def test_train_bad_value_subprocess(tiny_model, tmp_path):
    """The same path as the console script: status 2, one line, no traceback, nothing written."""
    r = _train(tiny_model, _data(tmp_path), str(tmp_path / "out"), "--clip_low", "-0.1")
    assert r.returncode == 2
    _one_line_error(r.stderr, "--clip_low")
    assert not (tmp_path / "out").exists()


def test_train_parser(tmp_path):
    """Both spellings of every flag, the recipe's defaults, the seed every command shares."""
    from psft_ext.cli.common import DEFAULT_SEED
    from psft_ext.cli.train import build_parser
    parser = build_parser()
    for spelling in ("--output_dir", "--output-dir"):
        args = parser.parse_args([spelling, "o", "--per-device-train-batch-size", "2",
                                  "--save_total_limit", "3", "--report-to", "none"])
        assert args.output_dir == "o" and args.per_device_train_batch_size == 2
        assert args.save_total_limit == 3 and args.report_to == "none"
    args = parser.parse_args([])
    assert args.learning_rate == 1e-6 and args.warmup_steps == 10 and args.weight_decay == 0.1
    assert args.lr_scheduler_type == "constant_with_warmup" and args.max_grad_norm == 1.0
    assert args.per_device_train_batch_size == 8 and args.steps_per_old_policy == 8
    assert args.clip_low == 0.2 and args.clip_high == 0.28 and args.loss == "psft"
    assert args.seed == DEFAULT_SEED == 42


def test_train_bad_inputs(tiny_model, base_model, tmp_path, capsys):
    good = _data(tmp_path)
    out = tmp_path / "out"

    def fails(model, data, *needles, extra=()):
        from psft_ext.cli.main import main
        assert main(["train", "--model_name_or_path", model, "--train_file", data,
                     "--output_dir", str(out), "--disable_tqdm", "true", *extra]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("psft train: error:"), err
        assert "Traceback" not in err
        for needle in needles:
            assert needle in err, err

    fails(str(tmp_path / "nope"), good, "nope", "model folder not found")
    fails(str(tmp_path), good, "no config.json")
    fails(tiny_model, str(tmp_path / "missing.jsonl"), "missing.jsonl", "not found")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the cat", "completion": "sat"}\n\n{"prompt": "a dog", '
                   '"completion": \n')
    fails(tiny_model, str(bad), f"{bad}:3", "not valid JSON")

    keys = tmp_path / "keys.jsonl"
    keys.write_text('{"prompt": "the cat", "completion": "sat"}\n{"text": "hello"}\n')
    fails(tiny_model, str(keys), f"{keys}:2", "prompt")

    types = tmp_path / "types.jsonl"
    types.write_text('{"prompt": "the cat", "completion": 3}\n')
    fails(tiny_model, str(types), f"{types}:1", "strings")

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"},
                                             {"role": "assistant", "content": "world"}]}) + "\n")
    fails(tiny_model, str(chat), f"{chat}:1", "no chat template")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    fails(tiny_model, str(empty), str(empty), "empty")

    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "the cat", "completion": "sat"}\n'
                    + json.dumps({"prompt": "the cat " * 20, "completion": "sat"}) + "\n")
    fails(tiny_model, str(long), f"{long}:2", "longer than the limit of 24")
    fails(tiny_model, str(long), f"{long}:1", "longer than the limit of 3",
          extra=("--max_length", "3"))

    fails(base_model, good, "LlamaModel", "no language-modelling head")
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
