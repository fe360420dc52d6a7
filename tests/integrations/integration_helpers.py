"""Tiny models, data and configs shared by the integration tests (CPU, no downloads)."""

import os

# No Hub access in tests (and no telemetry pings from TRL): everything is built from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import this fixture into every integration test module. The models are tiny: torch's
    intra-op threads only add synchronization, and on a loaded machine their spinning makes these
    tests about ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
PAD = 0


def tiny_config(kind="llama", **overrides):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=PAD, bos_token_id=2, eos_token_id=1, tie_word_embeddings=False)
    common.update(overrides)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common)
    raise ValueError(kind)


def tiny_model(kind="llama", seed=0, **overrides):
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(kind, **overrides)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[kind]
    return cls(config).float()


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences with a masked "prompt" of varying length (labels -100 there) and,
    unless ``equal_lengths``, varying lengths (so batches are padded)."""

    def __init__(self, n=32, min_len=6, max_len=14, seed=1, equal_lengths=False):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = max_len
            if not equal_lengths:
                length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            ids = torch.randint(3, VOCAB, (length,), generator=g)
            prompt = int(torch.randint(1, length // 2, (1,), generator=g))
            labels = ids.clone()
            labels[:prompt] = -100
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pad_collate(features):
    """Right padding: pad id in input_ids, 0 in attention_mask, -100 in labels."""
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), longest), PAD, dtype=torch.long)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    labels = torch.full((len(features), longest), -100, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = f["input_ids"]
        mask[i, :n] = 1
        labels[i, :n] = f["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def psft_args(output_dir, **overrides):
    from psft_ext.integrations.transformers import PSFTConfig

    kwargs = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], disable_tqdm=True,
                  save_strategy="no", logging_steps=1, seed=0, data_seed=0,
                  per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
                  learning_rate=1e-2, warmup_steps=0, lr_scheduler_type="constant",
                  dataloader_num_workers=0)
    kwargs.update(overrides)
    return PSFTConfig(**kwargs)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def max_param_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def train_logs(trainer):
    """The per-step training logs (those with a loss)."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# --------------------------------------------------------------------------------------------
# TRL: a word-level tokenizer built in code and text datasets
# --------------------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(100)]

# {% generation %} marks the assistant's tokens, for assistant_only_loss.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : "
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} <eos>{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "user", "assistant",
                                         ":"] + WORDS)}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _words(rng, n):
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=rng))


def prompt_completion_dataset(n=32, seed=0):
    from datasets import Dataset

    rng = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p, c = (int(x) for x in torch.randint(2, 7, (2,), generator=rng))
        # The completion starts with a space: prompt + completion tokenizes as the two parts do.
        rows.append({"prompt": _words(rng, p), "completion": " " + _words(rng, c)})
    return Dataset.from_list(rows)


def conversation_dataset(n=32, seed=0):
    from datasets import Dataset

    rng = torch.Generator().manual_seed(seed)
    return Dataset.from_list([{"messages": [
        {"role": "user", "content": _words(rng, 3)},
        {"role": "assistant", "content": _words(rng, 4)},
    ]} for _ in range(n)])


def spy_accumulate_float32(monkeypatch):
    """Wraps causal_lm's fused linear loss (linear_loss); returns the list of accumulate_float32
    values it got."""
    from psft_ext.integrations import causal_lm

    seen = []
    real = causal_lm.linear_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("accumulate_float32", "not passed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(causal_lm, "linear_loss", spy)
    return seen
