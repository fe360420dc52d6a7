"""The framework-free core: OldPolicyGroups (scheduling, cache, state), with a stand-in for the
model (runs without transformers)."""

import pytest
import torch

from psft_ext.integrations.old_policy import (
    OLD_LOGPROBS_KEY,
    OldPolicyGroups,
    attach_old_logprobs,
    batch_fingerprint,
)


# --------------------------------------------------------------------------------------------
# OldPolicyGroups with a stand-in for the model
# --------------------------------------------------------------------------------------------


class FakePolicy:
    """old_logprobs_fn that records its calls and returns ``version + batch id`` per token, so a
    test can tell which weights ("version") computed each cached value."""

    def __init__(self):
        self.version = 0
        self.calls = []

    def __call__(self, batch):
        self.calls.append((self.version, int(batch["id"])))
        return torch.full((2, 3), float(self.version * 1000 + int(batch["id"])))


def batches(n):
    return [{"id": torch.tensor(i), "labels": torch.zeros(2, 4, dtype=torch.long)}
            for i in range(n)]


def run(groups, data, policy, micro=2, max_steps=None):
    """Plain loop: returns [(index_in_group, [(batch id, old value or None)])] per step and bumps
    the policy version after every step (the optimizer step)."""
    out = []
    for step in groups.steps(data, micro_batches_per_step=micro, max_steps=max_steps):
        out.append((step.index_in_group,
                    [(int(mb.batch["id"]), None if mb.old_logprobs is None
                      else float(mb.old_logprobs[0, 0])) for mb in step]))
        policy.version += 1
    return out


def test_groups_prefetch_and_reuse_first_step():
    policy = FakePolicy()
    groups = OldPolicyGroups(policy, steps_per_old_policy=3)
    steps = run(groups, batches(14), policy, micro=2)  # 7 steps: groups of 3, 3, 1
    assert [s[0] for s in steps] == [0, 1, 2, 0, 1, 2, 0]
    # First step of each group: no old log-probs. Others: computed with the group-start version.
    assert steps[0][1] == [(0, None), (1, None)]
    assert steps[1][1] == [(2, 2.0), (3, 3.0)] and steps[2][1] == [(4, 4.0), (5, 5.0)]
    assert steps[3][1] == [(6, None), (7, None)]
    assert steps[4][1] == [(8, 3008.0), (9, 3009.0)] and steps[5][1] == [(10, 3010.0), (11, 3011.0)]
    assert steps[6][1] == [(12, None), (13, None)]
    # The no-grad passes ran at the group starts only, for the steps after the first.
    assert policy.calls == [(0, 2), (0, 3), (0, 4), (0, 5), (3, 8), (3, 9), (3, 10), (3, 11)]


def test_one_step_per_group_never_computes_old_logprobs():
    policy = FakePolicy()
    steps = run(OldPolicyGroups(policy, steps_per_old_policy=1), batches(6), policy)
    assert all(old is None for _, mbs in steps for _, old in mbs) and not policy.calls


def test_groups_truncate_at_data_end_and_max_steps():
    policy = FakePolicy()
    groups = OldPolicyGroups(policy, steps_per_old_policy=4)
    steps = run(groups, batches(5), policy, micro=2)  # steps of 2, 2, 1 micro-batches
    assert [len(mbs) for _, mbs in steps] == [2, 2, 1]
    policy2 = FakePolicy()
    groups2 = OldPolicyGroups(policy2, steps_per_old_policy=4)
    steps2 = run(groups2, batches(20), policy2, micro=2, max_steps=3)
    assert len(steps2) == 3
    # Old log-probs computed only for the steps that run (not for a 4th step past max_steps).
    assert [c[1] for c in policy2.calls] == [2, 3, 4, 5]


def test_reuse_first_step_off_computes_every_step():
    policy = FakePolicy()
    steps = run(OldPolicyGroups(policy, steps_per_old_policy=2, reuse_first_step=False),
                batches(4), policy, micro=1)
    assert [mbs[0][1] for _, mbs in steps] == [0.0, 1.0, 2002.0, 2003.0]


def test_state_round_trip_resumes_mid_group():
    data = batches(16)
    policy = FakePolicy()
    reference = run(OldPolicyGroups(policy, steps_per_old_policy=4), data, policy, micro=2)

    policy = FakePolicy()
    groups = OldPolicyGroups(policy, steps_per_old_policy=4)
    it = iter(groups.steps(data, micro_batches_per_step=2))
    for _ in range(2):  # stop after 2 of the group's 4 steps
        next(it)
        policy.version += 1
    state = groups.state_dict()
    assert state["index_in_group"] == 2 and len(state["old_logprobs"]) == 2

    policy2 = FakePolicy()
    policy2.version = 2  # the weights have moved on: the cache must not be recomputed
    resumed = OldPolicyGroups(policy2, steps_per_old_policy=4)
    resumed.load_state_dict(state)
    assert resumed.index_in_group == 2 and resumed.pending_steps == 2
    rest = run(resumed, data[4:], policy2, micro=2)
    assert rest == reference[2:]
    assert [c[0] for c in policy2.calls] == [4, 4, 4, 4, 4, 4]  # only the next group's start


def test_state_with_different_data_starts_a_new_group():
    policy = FakePolicy()
    groups = OldPolicyGroups(policy, steps_per_old_policy=3)
    it = iter(groups.steps(batches(12), micro_batches_per_step=2))
    next(it)
    state = groups.state_dict()
    resumed = OldPolicyGroups(FakePolicy(), steps_per_old_policy=3)
    resumed.load_state_dict(state)
    other = [{"id": torch.tensor(100 + i), "labels": torch.zeros(2, 4, dtype=torch.long)}
             for i in range(12)]
    with pytest.warns(UserWarning, match="do not match the saved old-policy cache"):
        step = resumed.next_step(iter([other[0:2], other[2:4], other[4:6]]).__next__)
    assert step.index_in_group == 0 and all(mb.old_logprobs is None for mb in step)


def test_fingerprint_and_attach():
    b = {"input_ids": torch.arange(6).view(2, 3), "labels": torch.ones(2, 3, dtype=torch.long)}
    same = {"labels": torch.ones(2, 3, dtype=torch.long), "input_ids": torch.arange(6).view(2, 3)}
    changed = {"input_ids": torch.arange(6).view(2, 3).flip(1),
               "labels": torch.ones(2, 3, dtype=torch.long)}
    assert batch_fingerprint(b) == batch_fingerprint(same) != batch_fingerprint(changed)
    old = torch.zeros(2, 3)
    attached = attach_old_logprobs(b, old)
    assert attached[OLD_LOGPROBS_KEY] is old and OLD_LOGPROBS_KEY not in b
    assert batch_fingerprint(attached) == batch_fingerprint(b)
    with pytest.raises(ValueError):
        OldPolicyGroups(lambda x: x, steps_per_old_policy=0)
