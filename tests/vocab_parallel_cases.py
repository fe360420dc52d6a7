"""The cases of the vocabulary-parallel tests: their options, their inputs (built the same on every
rank from the case's seed) and how the vocabulary is split (uneven slices, one of them empty in
one case). Shared by tests/vocab_parallel_worker.py (the ranks) and tests/test_vocab_parallel.py
(the references)."""

import torch

SHAPE = (3, 8)  # (sequences, tokens): 24 rows
VOCAB = 37
HIDDEN = 16

GRPO = dict(entropy_coef=0.02, kl_coef=0.1, dual_clip=3.0)
GSPO = dict(importance_sampling="sequence", loss_agg_mode="seq-mean-token-mean",
            entropy_coef=0.01)

CASES = [
    dict(name="psft", form="logits", dtype=torch.float32, options={}),
    dict(name="ppo_bf16", form="logits", dtype=torch.bfloat16, advantages="token",
         options=dict(dual_clip=3.0, temperature=0.8), num_items=40),
    dict(name="grpo", form="logits", dtype=torch.float32, advantages="token", options=GRPO,
         ref=True, rollout_is=True),
    dict(name="gspo", form="logits", dtype=torch.float32, advantages="row", options=GSPO),
    dict(name="none", form="logits", dtype=torch.float32, advantages="token",
         options=dict(reduction="none", entropy_coef=0.05)),
    dict(name="empty_slice", form="logits", dtype=torch.float32, options={}, empty_last=True),
    dict(name="linear", form="linear", dtype=torch.float32, options={}, chunk_size=5),
    dict(name="linear_grpo_bf16", form="linear", dtype=torch.bfloat16, advantages="token",
         options=GRPO, ref=True, rollout_is=True),
    dict(name="linear_gspo", form="linear", dtype=torch.float32, advantages="row", options=GSPO,
         chunk_size=4),
]

LOGPROB_CASES = [
    dict(name="logprobs", form="logits", dtype=torch.float32, temperature=0.7),
    dict(name="logprobs_bf16", form="logits", dtype=torch.bfloat16, temperature=1.0),
    dict(name="linear_logprobs", form="linear", dtype=torch.float32, temperature=0.9,
         chunk_size=3),
]


def slice_bounds(case, world):
    """[(lo, hi)] of each rank's vocabulary slice, in rank order: uneven sizes (rank r gets a
    share growing with r), or all of it but none on the last rank for empty_last."""
    if case.get("empty_last"):
        sizes = [0] * world
        base = VOCAB // (world - 1)
        for r in range(world - 1):
            sizes[r] = base
        sizes[0] += VOCAB - base * (world - 1)
    else:
        weights = [r + 1 for r in range(world)]
        sizes = [VOCAB * w // sum(weights) for w in weights]
        sizes[-1] += VOCAB - sum(sizes)
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def case_inputs(case):
    """The full (unsharded) inputs of a case, the same in every process."""
    g = torch.Generator().manual_seed(sum(map(ord, case["name"])))
    dtype = case["dtype"]
    targets = torch.randint(0, VOCAB, SHAPE, generator=g)
    targets[torch.rand(SHAPE, generator=g) < 0.2] = -100
    targets[2, :3] = -100
    out = dict(targets=targets)
    if case["form"] == "logits":
        logits = (torch.randn(SHAPE + (VOCAB,), generator=g) * 2.5).to(dtype)
        out["logits"] = logits
        full = logits.float()
    else:
        hidden = torch.randn(SHAPE + (HIDDEN,), generator=g).to(dtype)
        weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.6).to(dtype)
        bias = (torch.randn(VOCAB, generator=g) * 0.5).to(dtype)
        out.update(hidden=hidden, weight=weight, bias=bias)
        full = (hidden.float() @ weight.float().T + bias.float())
    temperature = case.get("options", {}).get("temperature", case.get("temperature", 1.0))
    logp = torch.log_softmax(full / temperature, -1).gather(
        -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    out["old_logprobs"] = logp + 0.4 * torch.randn(SHAPE, generator=g)
    kind = case.get("advantages", "scalar")
    if kind == "token":
        out["advantages"] = torch.randn(SHAPE, generator=g)
    elif kind == "row":
        out["advantages"] = torch.randn(SHAPE[0], 1, generator=g).expand(SHAPE)
    else:
        out["advantages"] = 1.0
    if case.get("ref"):
        out["ref_logprobs"] = logp + 0.3 * torch.randn(SHAPE, generator=g)
    if case.get("rollout_is"):
        out["rollout_is_weights"] = 0.5 + torch.rand(SHAPE, generator=g)
    out["upstream"] = torch.randn(SHAPE, generator=g)
    out["g_logp"] = torch.randn(SHAPE, generator=g)
    out["g_entropy"] = torch.randn(SHAPE, generator=g)
    return out
