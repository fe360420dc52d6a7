"""Old-policy groups, the heart of PSFT's schedule (framework-free).

PSFT clips the probability ratio against an "old" policy: the weights at the start of a group of
``steps_per_old_policy`` optimizer steps (the authors' recipe: 8). ``OldPolicyGroups`` runs that
schedule for any training loop:

* At the start of a group it pulls ahead the micro-batches of all the group's steps (every
  gradient-accumulation micro-batch of every step) and computes their old log-probs with the
  current weights, i.e. the group-start weights, under ``torch.no_grad``. Prefetching is what
  makes this exact: old log-probs computed lazily later would see updated weights, and keeping a
  frozen copy of the weights instead would double the model's memory.
* The first step of a group trains at the group-start weights, so its old log-probs equal its own
  (detached) log-probs: it gets ``old_logprobs=None`` (ratio exactly 1) and no separate no-grad
  pass, which saves 1/K of the extra compute. With ``steps_per_old_policy=1`` no no-grad pass runs
  at all and every step is an SFT step.
* The cache holds only per-token float32 log-probs (and the prefetched batches, which the loop
  would load anyway). ``state_dict`` / ``load_state_dict`` save and restore the rest of a group
  (its old log-probs, with a fingerprint of each micro-batch) so that a run resumed in the middle
  of a group continues against the same old policy: after a resume the weights differ from the
  group start, so the old log-probs could not be recomputed.

A group never extends past the end of the batches it is fed (the end of an epoch, in the Trainer):
the next batches start a new group.

Plain loop::

    head = CausalLMPSFT()                       # the PSFT loss of a Hugging Face causal LM
    groups = OldPolicyGroups(lambda b: compute_old_logprobs(model, b, head=head),
                             steps_per_old_policy=8)
    for step in groups.steps(loader, micro_batches_per_step=grad_accum):
        num_items = count_targets(step.batches)          # token-mean over the optimizer step
        for mb in step:
            loss, metrics = head.loss(model, mb.batch, mb.old_logprobs, num_items=num_items)
            loss.backward()
        optimizer.step(); optimizer.zero_grad()

Finish each step's optimizer update before asking for the next step: the next group's old
log-probs are computed when its first step is requested.
"""

import contextlib
import itertools
import warnings
from typing import Any, Callable, Iterable, Iterator, List, Mapping, NamedTuple, Optional

import torch
from torch import nn

from .causal_lm import (
    OLD_LOGPROBS_KEY,
    CausalLMPSFT,
    batch_targets,
    count_targets,
    unwrap_model,
)

__all__ = [
    "OLD_LOGPROBS_KEY",
    "MicroBatch",
    "OldPolicyGroups",
    "OldPolicyStep",
    "attach_old_logprobs",
    "batch_fingerprint",
    "batch_targets",
    "compute_old_logprobs",
    "count_targets",
    "eval_mode",
]

STATE_FORMAT = 1


class MicroBatch(NamedTuple):
    """One micro-batch and the old policy's per-token log-probs of its targets (None: the old
    policy is the current one, ratio exactly 1)."""

    batch: Any
    old_logprobs: Optional[torch.Tensor]


class OldPolicyStep(list):
    """The micro-batches (``MicroBatch``) of one optimizer step, and the step's position in its
    old-policy group (``index_in_group``, 0 for the step that starts the group)."""

    def __init__(self, micro_batches: Iterable[MicroBatch] = (), index_in_group: int = 0):
        super().__init__(micro_batches)
        self.index_in_group = index_in_group

    @property
    def batches(self) -> list:
        return [mb.batch for mb in self]

    def with_old_logprobs(self, key: str = OLD_LOGPROBS_KEY) -> List[dict]:
        """The batches (mappings) with their old log-probs attached under ``key``."""
        return [attach_old_logprobs(mb.batch, mb.old_logprobs, key) for mb in self]


def attach_old_logprobs(batch: Mapping, old_logprobs: Optional[torch.Tensor],
                        key: str = OLD_LOGPROBS_KEY) -> dict:
    """A shallow copy of the mapping ``batch`` carrying ``old_logprobs`` under ``key`` (left out
    when None)."""
    out = dict(batch)
    out.pop(key, None)
    if old_logprobs is not None:
        out[key] = old_logprobs
    return out


def batch_fingerprint(batch: Any) -> str:
    """A summary of a batch's tensors that changes with any of their values: per tensor (in key
    order), its path, shape, dtype and a position-weighted checksum. It tells whether the data fed
    after a resume are the micro-batches whose old log-probs were saved."""
    parts = []

    def visit(x, path):
        if isinstance(x, torch.Tensor):
            flat = x.detach().reshape(-1)
            w = torch.arange(flat.numel(), device=flat.device) % 65521 + 1
            if flat.is_floating_point() or flat.is_complex():
                # 12 significant digits: the same data summed in another order (a GPU
                # reduction) must give the same fingerprint; a changed value still changes it.
                s = f"{float((flat.double().real * w).sum()):.12g}"
            else:
                s = str(int((flat.long() * w).sum()))
            parts.append(f"{path}:{tuple(x.shape)}:{x.dtype}:{s}")
        elif isinstance(x, Mapping):
            for k in sorted(x, key=str):
                if k != OLD_LOGPROBS_KEY:
                    visit(x[k], f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                visit(v, f"{path}/{i}")

    visit(batch, "")
    return ";".join(parts)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` inside the block, the previous mode after it.

    The old log-probs are those of the policy itself, without dropout noise (as in PPO / verl),
    and an eval-mode pass draws no random numbers, so the training run's random stream is the same
    whether or not old log-probs are computed."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


_DEFAULT_HEAD = CausalLMPSFT()


def compute_old_logprobs(model: nn.Module, batch: Mapping[str, Any], *,
                         head: Optional[CausalLMPSFT] = None,
                         lm: Optional[nn.Module] = None) -> torch.Tensor:
    """Per-token log-probs (float32, targets' shape, 0 where ignored) of a Hugging Face style
    causal LM on ``batch``, in eval mode and under ``torch.no_grad``, with
    :func:`psft_ext.linear_token_logprobs` (no tokens x vocabulary memory) where the model allows,
    else :func:`psft_ext.token_logprobs` on the logits. Pass the ``head`` used for the loss so both
    take the same path (and the same temperature)."""
    head = _DEFAULT_HEAD if head is None else head
    with eval_mode(model), torch.no_grad():
        return head.token_logprobs(model, batch, unwrap_model(model) if lm is None else lm)


class _PendingStep:
    """A step of the current group not yet handed out. ``batches`` is None for a step restored
    from a checkpoint until the resumed data loader delivers it again."""

    __slots__ = ("batches", "olds", "fingerprints")

    def __init__(self, batches, olds, fingerprints=None):
        self.batches = batches
        self.olds = olds
        self.fingerprints = fingerprints


class OldPolicyGroups:
    """Groups of ``steps_per_old_policy`` optimizer steps sharing one old policy.

    Args:
        old_logprobs_fn: ``batch -> (targets-shaped) float32 log-probs`` with the current weights
            (e.g. ``lambda b: compute_old_logprobs(model, b, head=head)``); called under
            ``torch.no_grad`` at the start of each group, once per micro-batch of its steps after
            the first.
        steps_per_old_policy: optimizer steps per group (K). 1 is SFT.
        reuse_first_step: give the first step of a group ``old_logprobs=None`` (its own forward is
            the old policy's) instead of a separate no-grad pass. Only for tests and debugging:
            turning it off costs compute and changes nothing but rounding.
        fingerprint_fn: summary of a batch saved with the cache, compared after a resume.

    Use :meth:`steps` in a plain loop, or :meth:`next_step` where the loop fetches its own
    batches (the Trainer integration).
    """

    def __init__(self, old_logprobs_fn: Callable[[Any], torch.Tensor],
                 steps_per_old_policy: int = 8, *, reuse_first_step: bool = True,
                 fingerprint_fn: Callable[[Any], str] = batch_fingerprint):
        if isinstance(steps_per_old_policy, bool) or not isinstance(steps_per_old_policy, int) \
                or steps_per_old_policy < 1:
            raise ValueError(
                f"steps_per_old_policy must be an int >= 1, got {steps_per_old_policy!r}")
        self.old_logprobs_fn = old_logprobs_fn
        self.steps_per_old_policy = steps_per_old_policy
        self.reuse_first_step = reuse_first_step
        self.fingerprint_fn = fingerprint_fn
        self._pending: List[_PendingStep] = []
        self._index = 0  # position in its group of the next step handed out

    # ---------------------------------------------------------------------------------------

    @property
    def index_in_group(self) -> int:
        """Position in its group of the next step (0: the next step starts a new group)."""
        return self._index if self._pending else 0

    @property
    def pending_steps(self) -> int:
        """Steps of the current group not handed out yet."""
        return len(self._pending)

    def reset(self) -> None:
        """Forget the current group: the next step starts a new one."""
        self._pending = []
        self._index = 0

    def drop_prefetched(self) -> None:
        """Drop the prefetched rest of the current group (its data source ended or changed); a
        group restored from a checkpoint and still waiting for its batches is kept."""
        if self._pending and self._pending[0].batches is not None:
            self.reset()

    # ---------------------------------------------------------------------------------------

    def next_step(self, fetch_step: Callable[[], Iterable], *,
                  max_steps: Optional[int] = None) -> OldPolicyStep:
        """The next optimizer step's micro-batches with their old log-probs.

        ``fetch_step()`` returns the micro-batches of one step from the data (empty when the data
        are exhausted). At the start of a group it is called up to ``steps_per_old_policy`` times
        (at most ``max_steps``, the steps left in the run), and the group's old log-probs are
        computed. Returns an empty step when the data are exhausted.
        """
        if self._pending and self._pending[0].batches is None:
            self._refill(fetch_step)
        if not self._pending:
            n = self.steps_per_old_policy
            if max_steps is not None:
                n = max(1, min(n, int(max_steps)))
            steps = self._fetch(fetch_step, n)
            if not steps:
                return OldPolicyStep([], 0)
            self._start(steps)
        pending = self._pending.pop(0)
        step = OldPolicyStep([MicroBatch(b, o) for b, o in zip(pending.batches, pending.olds)],
                             self._index)
        self._index += 1
        return step

    def steps(self, batches: Iterable, micro_batches_per_step: int = 1,
              max_steps: Optional[int] = None) -> Iterator[OldPolicyStep]:
        """Yields the optimizer steps of ``batches`` (``micro_batches_per_step`` micro-batches
        each, the last one possibly fewer) with their old log-probs, for a plain loop. Finish each
        step's optimizer update before taking the next."""
        if micro_batches_per_step < 1:
            raise ValueError(f"micro_batches_per_step must be >= 1, got {micro_batches_per_step}")
        it = iter(batches)

        def fetch():
            return list(itertools.islice(it, micro_batches_per_step))

        taken = 0
        while max_steps is None or taken < max_steps:
            step = self.next_step(fetch, max_steps=None if max_steps is None else max_steps - taken)
            if not step:
                return
            taken += 1
            yield step

    # ---------------------------------------------------------------------------------------

    @staticmethod
    def _fetch(fetch_step, n):
        steps = []
        for _ in range(n):
            batches = list(fetch_step())
            if not batches:
                break
            steps.append(batches)
        return steps

    def _old_logprobs(self, batch):
        with torch.no_grad():
            old = self.old_logprobs_fn(batch)
        if not isinstance(old, torch.Tensor):
            raise TypeError(f"old_logprobs_fn must return a tensor, got {type(old).__name__}")
        return old.detach().to(torch.float32)

    def _start(self, steps):
        self._pending = []
        for i, batches in enumerate(steps):
            if i == 0 and self.reuse_first_step:
                olds = [None] * len(batches)
            else:
                olds = [self._old_logprobs(b) for b in batches]
            self._pending.append(_PendingStep(batches, olds))
        self._index = 0

    def _refill(self, fetch_step):
        """Gives the restored steps their batches, fetched again from the resumed data."""
        expected = self._pending
        fetched = self._fetch(fetch_step, len(expected))
        problem = None
        if len(fetched) != len(expected):
            problem = f"{len(fetched)} steps of data left where the cache has {len(expected)}"
        else:
            for i, (pending, batches) in enumerate(zip(expected, fetched)):
                if len(batches) != len(pending.olds):
                    problem = (f"step {i} has {len(batches)} micro-batches, the cache "
                               f"{len(pending.olds)}")
                    break
                if pending.fingerprints is not None and \
                        [self.fingerprint_fn(b) for b in batches] != list(pending.fingerprints):
                    problem = f"the micro-batches of step {i} differ from the saved ones"
                    break
        if problem is None:
            for pending, batches in zip(expected, fetched):
                pending.batches = batches
            return
        warnings.warn(f"psft_ext: the data after resuming do not match the saved old-policy cache "
                      f"({problem}); starting a new old-policy group with the current weights",
                      stacklevel=3)
        self.reset()
        if fetched:
            self._start(fetched)

    # ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The rest of the current group: its old log-probs (on CPU) and batch fingerprints."""
        return {
            "format": STATE_FORMAT,
            "steps_per_old_policy": self.steps_per_old_policy,
            "index_in_group": self.index_in_group,
            "old_logprobs": [[None if o is None else o.detach().cpu() for o in p.olds]
                             for p in self._pending],
            "fingerprints": [list(p.fingerprints) if p.batches is None
                             else [self.fingerprint_fn(b) for b in p.batches]
                             for p in self._pending],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restores the rest of a group saved by :meth:`state_dict`: the next ``pending_steps``
        steps take their batches from the data fed next (checked against the fingerprints) and
        their old log-probs from the state."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown old-policy state format {state.get('format')!r}")
        olds, fingerprints = state["old_logprobs"], state["fingerprints"]
        if len(olds) != len(fingerprints):
            raise ValueError("corrupt old-policy state: old_logprobs and fingerprints differ in "
                             "length")
        self._pending = [_PendingStep(None, list(o), list(f)) for o, f in zip(olds, fingerprints)]
        self._index = int(state["index_in_group"]) if self._pending else 0
