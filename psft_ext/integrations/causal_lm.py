"""The PSFT loss and the token log-probs of a Hugging Face style causal LM (framework-free).

``CausalLMPSFT`` runs a causal LM on a batch (a mapping with ``input_ids``, ``attention_mask``,
``position_ids``, ... and ``labels`` aligned with the input ids, or pre-shifted ``shift_labels``)
and computes the PSFT loss or the per-token log-probs of the targets.

The fused linear path. The (tokens x vocabulary) logits are the largest activation of LLM training,
so by default the loss is computed from the final hidden states and the LM head's weight with
:func:`psft_ext.linear_psft_loss`, which never materializes them. The model is called through its
own forward (so DDP / accelerate wrappers, autocast and hooks all apply) with ``logits_to_keep=1``
(the LM head then projects only the last position), and the final hidden states are taken from a
forward hook on the backbone (``model.base_model``), whose output is what the LM head reads. A hook
is used rather than ``output_hidden_states=True`` because the latter keeps every layer's hidden
states alive, which costs memory in the no-grad pass of the old policy.

This is only correct when ``logits = hidden @ W.T + b`` exactly. Models with a final-logit
transform (Gemma's soft-capping, Cohere's / Granite's scaling, ...) are recognized from their
config and use the logits path, with a warning; for the others, the first call checks that the
one kept position's logits equal ``F.linear`` of its hidden state, and falls back to the logits
path (with a warning) if they do not. The caller can also block the fused path (``block_fused``).

Sharded models. Under FSDP2 and FSDP1 (the LM head in the root unit or a unit of its own) and
DeepSpeed ZeRO-3 the head's weight is whole only inside the model's forward: the fused loss (and
the old log-probs) are computed there, by a forward pre-hook on the LM head, which runs after the
sharding's (which gathers the weight); the gradient the single pass computed reaches the weight in
the backward, and the sharding reduces it as any other. FSDP1 and ZeRO-3 run their backward hooks
from the model's outputs, so there the loss is joined to the output through an exact zero. A
tensor-parallel LM head (``ColwiseParallel`` over the vocabulary: a weight sharded on its rows)
takes the vocabulary-parallel loss.
"""

import contextlib
import inspect
import warnings
import weakref
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import torch
from torch import nn

from ..labels import shift_labels
from ..linear import linear_loss, linear_token_logprobs
from ..loss import logits_loss, token_logprobs
from ..params import OPTION_NAMES, LossParams, loss_params

# Key under which a batch carries the old policy's per-token log-probs (see old_policy.py).
OLD_LOGPROBS_KEY = "psft_old_logprobs"
# Keys of a batch that belong to the loss, never passed to the model: the model would compute its
# own cross-entropy from labels (a wasted N x V pass) or choke on the others.
LOSS_KEYS = ("labels", "shift_labels", OLD_LOGPROBS_KEY, "num_items_in_batch")

# Config attributes of final-logit transforms found in transformers' models; the value that means
# "no transform" follows. Soft-capping: tanh(z / c) * c (Gemma 2/3). Scales: logits * s (Cohere's
# logit_scale, Falcon-H1's lm_head_multiplier, output_multiplier) or logits / s (Granite's and
# MiniCPM's logits_scaling).
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,
    "logit_scale": 1.0,
    "output_multiplier": 1.0,
    "lm_head_multiplier": 1.0,
    "logits_scaling": 1.0,
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def batch_targets(batch: Mapping[str, Any], ignore_index: int = -100) -> torch.Tensor:
    """Targets aligned with the logits' positions: ``batch["shift_labels"]`` when the collator
    provides them (padding-free / context-parallel collators do), else the shifted ``labels``.

    Label masking (-100 on prompt, padding and packed-sequence boundary tokens) carries over: a
    position whose next token is masked gets ``ignore_index``.
    """
    targets = batch.get("shift_labels")
    if targets is not None:
        return targets
    labels = batch.get("labels")
    if labels is None:
        raise KeyError("a PSFT batch needs 'labels' (aligned with input_ids, -100 where there is "
                       "no loss) or pre-shifted 'shift_labels'")
    return shift_labels(labels, ignore_index)


def count_targets(batches: Iterable[Mapping[str, Any]], ignore_index: int = -100) -> torch.Tensor:
    """Number of non-ignored targets in ``batches`` (0-d int64 tensor, no host sync): the
    token-mean denominator of one optimizer step (``num_items`` of the loss)."""
    total = None
    for batch in batches:
        n = (batch_targets(batch, ignore_index) != ignore_index).sum()
        total = n if total is None else total + n.to(total.device)
    return torch.zeros((), dtype=torch.int64) if total is None else total


def model_inputs(batch: Mapping[str, Any]) -> dict:
    """The batch without the loss's keys."""
    return {k: v for k, v in batch.items() if k not in LOSS_KEYS}


def logit_transform(config) -> Optional[str]:
    """``"name=value"`` of the first final-logit transform ``config`` declares, else None."""
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    configs = [config]
    if callable(get_text_config):
        text_config = get_text_config()
        if text_config is not config:
            configs.append(text_config)
    for cfg in configs:
        for name, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(cfg, name, None)
            if value is not None and value != neutral and not (neutral is None and value == 0):
                return f"{name}={value}"
    return None


class HeadInputs(NamedTuple):
    """What the loss reads: the final hidden states and the LM head (fused path), or the logits."""

    hidden: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]
    amp: Optional[torch.dtype] = None  # autocast dtype of the model's LM head (fused path)
    # Fused path under DDP with static_graph=True: the model's own output (the logits of its one
    # kept position), which the loss joins through an exact 0 (see _joined); None otherwise.
    output: Optional[torch.Tensor] = None

    def autocast(self):
        """The autocast the model's LM head runs under, for the fused loss's matmuls."""
        if self.amp is None or self.hidden is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.hidden.device.type, dtype=self.amp)


class _Capture:
    """Forward hook keeping the backbone's output while armed (and only then)."""

    def __init__(self):
        self.armed = False
        self.value = None

    def __call__(self, module, args, output):
        if self.armed:
            self.value = output


class _FusedPlan:
    def __init__(self, backbone: nn.Module, head: nn.Linear, forward_kwargs: dict,
                 sharding: "_Sharding"):
        self.head = head
        self.forward_kwargs = forward_kwargs
        self.capture = _Capture()
        self.handles = [backbone.register_forward_hook(self.capture),
                        head.register_forward_pre_hook(self._head_pre_hook)]
        self.verified = False
        self.amp = None  # autocast dtype the model's LM head runs under, if any
        # The LM head's weight is whole only inside its own forward (FSDP, ZeRO-3): the fused
        # loss is computed there, by a forward pre-hook (it runs after FSDP's / DeepSpeed's,
        # which gather the parameters), from the backbone's output the capture holds.
        self.sharding = sharding
        self.request = None  # while armed: fn(HeadInputs) -> result
        self.result = None

    def _head_pre_hook(self, module, args):
        if self.request is None or self.capture.value is None:
            return
        hidden = _last_hidden(self.capture.value)
        weight = module.weight
        request, self.request = self.request, None  # once per forward
        if (self.amp or weight.dtype) == torch.float16 and torch.is_grad_enabled():
            # float16 takes the fused loss's two passes, whose backward reads the weight again:
            # gone by then here.
            raise ValueError("psft_ext: a float16 LM head under FSDP / ZeRO-3 needs its weight "
                             "in the fused loss's backward, after the sharding released it: "
                             "train in bfloat16, or pass use_fused_linear=False")
        self.result = request(HeadInputs(hidden.to(weight.device), weight, module.bias, None,
                                         self.amp))

    def release(self):
        for handle in self.handles:
            handle.remove()


def _last_hidden(output) -> Optional[torch.Tensor]:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)) and output:
        hidden = output[0]
    if hidden is None and isinstance(output, torch.Tensor):
        hidden = output
    return hidden if isinstance(hidden, torch.Tensor) else None


def _logits_of(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if logits is None and isinstance(output, torch.Tensor):
        logits = output
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__} without logits")
    return logits


def _local(t):
    """A DTensor's local tensor (a tensor-parallel LM head's input and output), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and isinstance(t, torch.Tensor) else t


def _forward_parameters(lm: nn.Module):
    try:
        return inspect.signature(type(lm).forward).parameters
    except (TypeError, ValueError):
        return {}


class CausalLMPSFT:
    """PSFT loss / token log-probs of a Hugging Face style causal LM on a batch.

    Args:
        params: the loss's options as a :class:`psft_ext.LossParams` (reduction "mean": the loss
            is a token mean over ``num_items``); or, instead, its fields as keywords
            (``clip_low=0.2, clip_high=0.28, ...``; authors' recipe by default).
        use_fused_linear: compute from the hidden states and the LM head without forming the
            logits (falls back to the logits by itself where that would be wrong).
        chunk_size: rows of logits formed at a time by the fused linear loss (None: automatic).
        accumulate_float32: for a bfloat16 / float16 LM head split into several chunks, the fused
            linear loss accumulates the LM head's gradient across chunks in float32 (default: one
            rounding at the end, a float32 V x H buffer) or, with False, in the weight's dtype
            (one rounding per chunk, no extra buffer); see :func:`psft_ext.linear_psft_loss`.
            No effect on float32 weights, on the logits path or on the token log-probs.

    The options read back as attributes (``head.clip_low``). ``model`` is what is called
    (possibly a DDP / accelerate wrapper); ``lm`` is the unwrapped causal LM, where the LM head
    and the config are looked up (default: ``unwrap_model(model)``).
    """

    def __init__(self, params: Optional[LossParams] = None, *, use_fused_linear: bool = True,
                 chunk_size: Optional[int] = None, accumulate_float32: bool = True, **options):
        if not isinstance(accumulate_float32, bool):
            raise TypeError(f"CausalLMPSFT: accumulate_float32 must be a bool, got "
                            f"{accumulate_float32!r} ({type(accumulate_float32).__name__})")
        if params is not None and options:
            raise TypeError("CausalLMPSFT: pass the options either as params or as keywords")
        self.params = params if params is not None else loss_params("CausalLMPSFT", options)
        if self.params.reduction != "mean":
            raise ValueError(f"CausalLMPSFT: the loss is a token mean over num_items; reduction "
                             f"must be 'mean', got {self.params.reduction!r}")
        self.use_fused_linear = use_fused_linear
        self.chunk_size = chunk_size
        self.accumulate_float32 = accumulate_float32
        self._blocked: Optional[str] = None
        # One decision per model: a _FusedPlan, or False for the logits path.
        self._plans = weakref.WeakKeyDictionary()

    def __getattr__(self, name):
        params = self.__dict__.get("params")
        if params is not None and name in OPTION_NAMES:
            return getattr(params, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ---------------------------------------------------------------------------------------
    # Choosing the path
    # ---------------------------------------------------------------------------------------

    def block_fused(self, reason: str) -> None:
        """Use the logits path from now on (``reason`` goes into the one warning)."""
        self._blocked = reason
        for lm in list(self._plans.keys()):
            self._drop(lm)

    def uses_fused(self, model: nn.Module) -> bool:
        """Whether calls with this model (or a wrapper of it) take the fused linear path, as
        decided so far (the check of the first call may still turn it off)."""
        return bool(self._plan(unwrap_model(model), model))

    def _drop(self, lm):
        plan = self._plans.get(lm)
        if plan:
            plan.release()
        self._plans[lm] = False

    def _fallback(self, lm, why):
        warnings.warn(f"psft_ext: {why}; computing the PSFT loss from the full logits instead of "
                      f"the fused linear path (same result, more memory)", stacklevel=4)
        self._drop(lm)

    def _plan(self, lm: nn.Module, model: Optional[nn.Module] = None):
        plan = self._plans.get(lm)
        if plan is not None:
            return plan
        if not self.use_fused_linear:
            self._plans[lm] = False
            return False
        if self._blocked is not None:
            self._fallback(lm, self._blocked)
            return False
        # PEFT models forward to their base model; the head, the backbone and the signature are
        # the base model's.
        target = lm.get_base_model() if callable(getattr(lm, "get_base_model", None)) else lm
        get_head = getattr(target, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        head = _fsdp1_inner(head)
        if type(head) is not nn.Linear and not _fsdp2_linear(head):
            # A subclass (a LoRA-wrapped or quantized head) may compute something else than
            # F.linear with its weight (FSDP2's wrapper of an nn.Linear does not).
            self._fallback(lm, f"the LM head is {type(head).__name__}, not a torch.nn.Linear")
            return False
        transform = logit_transform(getattr(target, "config", None))
        if transform is not None:
            self._fallback(lm, f"the model transforms its final logits ({transform}), which the "
                               f"fused linear loss does not apply")
            return False
        params = _forward_parameters(target)
        if "logits_to_keep" not in params:
            self._fallback(lm, f"{type(target).__name__}.forward has no logits_to_keep argument")
            return False
        backbone = getattr(target, "base_model", None)
        if not isinstance(backbone, nn.Module) or backbone is target:
            self._fallback(lm, f"{type(target).__name__} has no separate backbone (base_model)")
            return False
        kwargs = {"logits_to_keep": 1}
        if "use_cache" in params:
            kwargs["use_cache"] = False
        plan = _FusedPlan(backbone, head, kwargs, _sharding(model, target, head))
        self._plans[lm] = plan
        return plan

    @staticmethod
    def _probe(output, hidden, head_calls) -> Optional[str]:
        """None when the model's logits are exactly the LM head's output and the LM head read the
        backbone's output, else why not. Exact comparisons (no tolerance): the same tensors flow
        through, so any difference is a transform the fused loss would not apply."""
        if hidden is None:
            return "the backbone's output holds no hidden states"
        if len(head_calls) != 1:
            return f"the LM head ran {len(head_calls)} times in one forward"
        head_in, head_out, _ = (_local(t) for t in head_calls[0])
        try:
            logits = _local(_logits_of(output))
        except TypeError as err:
            return str(err)
        if not isinstance(head_in, torch.Tensor) or head_in.dim() < 2 or hidden.dim() < 2 or \
                head_in.shape[:-2] != hidden.shape[:-2] or head_in.shape[-1] != hidden.shape[-1]:
            return "the LM head does not read the backbone's output"
        if not torch.equal(head_in[..., -1, :], hidden[..., -1, :]):
            return ("the LM head's input differs from the backbone's output (a transform between "
                    "them)")
        if head_out.shape != logits.shape or \
                not torch.equal(head_out.to(logits.dtype), logits):
            return "the model's logits differ from its LM head's output (a final-logit transform)"
        return None

    @staticmethod
    def _run(model, plan, inputs):
        """(output, captured final hidden states) of one forward with the plan's arguments."""
        plan.capture.armed = True
        try:
            output = model(**inputs, **plan.forward_kwargs)
            return output, _last_hidden(plan.capture.value)
        finally:
            plan.capture.armed = False
            plan.capture.value = None

    def _verify(self, lm, plan, inputs, model):
        # A separate no-grad forward of the unwrapped model (of the wrapper under FSDP1, whose
        # parameters are whole only inside its forward), once per model: checking inside the
        # training forward would, on a mismatch, need a second grad-enabled forward of the same
        # micro-batch, which DDP does not allow before a backward. In eval mode, so that it
        # draws no dropout randomness: the training run's random stream stays that of plain SFT.
        head_calls = []

        def on_head(module, args, output):
            device_type = output.device.type
            amp = (torch.get_autocast_dtype(device_type)
                   if torch.is_autocast_enabled(device_type) else None)
            head_calls.append((args[0] if args else None, output, amp))

        handle = plan.head.register_forward_hook(on_head)
        was_training = lm.training
        lm.eval()
        try:
            with torch.no_grad():
                output, hidden = self._run(model if plan.sharding.verify_wrapped else lm,
                                           plan, inputs)
                why = self._probe(output, hidden, head_calls)
        finally:
            lm.train(was_training)
            handle.remove()
        if why is None:
            # The model's LM head may run under an autocast that its forward enters itself
            # (accelerate's mixed precision wraps the forward): the fused loss then computes the
            # logits in that dtype too, as the model would.
            plan.amp = head_calls[0][2]
            plan.verified = True
        else:
            self._fallback(lm, why)

    # ---------------------------------------------------------------------------------------
    # Forward
    # ---------------------------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: Mapping[str, Any],
                lm: Optional[nn.Module] = None, fused=None, join=None):
        """Runs ``model`` on the batch's model inputs; returns the loss's inputs. With ``fused``
        (a function of the fused path's HeadInputs), returns ``fused``'s result on the fused path
        instead, computed inside the LM head's forward where FSDP / ZeRO-3 gather its weight
        only there; the HeadInputs of the logits path otherwise. ``join(result, logits)``, where
        given, ties a differentiable result to the model's output under FSDP1 / ZeRO-3, whose
        backward hooks (re-gathering, gradient reduction) hang on the model's outputs."""
        lm = unwrap_model(model) if lm is None else lm
        inputs = model_inputs(batch)
        plan = self._plan(lm, model)
        if plan and not plan.verified:
            self._verify(lm, plan, inputs, model)
            plan = self._plan(lm, model)
        if plan and plan.sharding.inside:
            if fused is None:
                raise ValueError("psft_ext: the LM head's weight is gathered only inside its "
                                 "forward (FSDP / ZeRO-3): CausalLMPSFT.forward needs the "
                                 "fused computation (fused=...) to run there")
            plan.request = fused
            try:
                output, _ = self._run(model, plan, inputs)
            finally:
                plan.request = None
            result, plan.result = plan.result, None
            if result is None:
                raise RuntimeError("psft_ext: the LM head did not run after the backbone in the "
                                   "model's forward; the fused loss could not be computed")
            if join is not None and plan.sharding.join and torch.is_grad_enabled():
                result = join(result, _logits_of(output))
            return result
        if plan:
            output, hidden = self._run(model, plan, inputs)
            if hidden is None:
                raise RuntimeError("psft_ext: the backbone's forward hook caught no hidden states")
            # On the head's device, as the head's own call would see it: a model split over GPUs
            # (device_map="auto") may keep the backbone's last layers and the head apart.
            weight = plan.head.weight
            joined = _logits_of(output) if _ddp_static_graph(model) else None
            head = HeadInputs(hidden.to(weight.device), weight, plan.head.bias, None, plan.amp,
                              joined)
            return head if fused is None else fused(head)
        kwargs = {"use_cache": False} if "use_cache" in _forward_parameters(lm) else {}
        return HeadInputs(None, None, None, _logits_of(model(**inputs, **kwargs)))

    def loss(self, model: nn.Module, batch: Mapping[str, Any],
             old_logprobs: Optional[torch.Tensor] = None, *, num_items=None,
             lm: Optional[nn.Module] = None):
        """``(loss, PSFTMetrics)`` of the batch: token-mean over ``num_items`` targets (default:
        this batch's). ``old_logprobs=None`` takes the batch's attached ones
        (``batch[OLD_LOGPROBS_KEY]``), and without those the ratio is exactly 1 (SFT's gradient).
        """
        if old_logprobs is None:
            old_logprobs = batch.get(OLD_LOGPROBS_KEY)
        targets = batch_targets(batch, self.ignore_index)

        def fused(head):
            with head.autocast():
                loss, metrics = linear_loss(
                    head.hidden, head.weight, targets.to(head.hidden.device),
                    _on(old_logprobs, head.hidden), self.params, bias=head.bias,
                    chunk_size=self.chunk_size, accumulate_float32=self.accumulate_float32,
                    num_items=num_items, return_metrics=True, fn="CausalLMPSFT.loss")
            return _joined(loss, head.output), metrics

        def join(result, output):
            return _joined(result[0], output), result[1]

        head = self.forward(model, batch, lm, fused=fused, join=join)
        if not isinstance(head, HeadInputs):
            return head
        return logits_loss(head.logits, targets.to(head.logits.device),
                           _on(old_logprobs, head.logits), self.params, num_items=num_items,
                           return_metrics=True, fn="CausalLMPSFT.loss")

    def token_logprobs(self, model: nn.Module, batch: Mapping[str, Any],
                       lm: Optional[nn.Module] = None) -> torch.Tensor:
        """float32 log-probs of the batch's targets (0 where ignored), shape of the targets,
        under ``torch.no_grad`` and without any tokens x vocabulary tensor on the fused path."""
        targets = batch_targets(batch, self.ignore_index)

        def fused(head):
            with head.autocast():
                return linear_token_logprobs(
                    head.hidden, head.weight, targets.to(head.hidden.device), bias=head.bias,
                    chunk_size=self.chunk_size, ignore_index=self.ignore_index,
                    temperature=self.temperature)

        with torch.no_grad():
            head = self.forward(model, batch, lm, fused=fused)
            if not isinstance(head, HeadInputs):
                return head
            return token_logprobs(head.logits, targets.to(head.logits.device),
                                  ignore_index=self.ignore_index, temperature=self.temperature)


def _fsdp2_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def _fsdp2_linear(head) -> bool:
    """An nn.Linear that FSDP2's fully_shard made a unit of its own (class FSDPLinear)."""
    fsdp_module = _fsdp2_module_class()
    return (fsdp_module is not None and isinstance(head, fsdp_module)
            and type(head).__bases__ == (fsdp_module, nn.Linear))


class _Sharding(NamedTuple):
    """How the LM head's weight is sharded, as far as the fused path cares."""

    inside: bool = False  # whole only inside the model's forward: compute the loss there
    join: bool = False  # backward hooks only on the model's outputs: join the loss to them
    verify_wrapped: bool = False  # the first call's check runs through the wrapper


def _sharding(model: Optional[nn.Module], lm: nn.Module, head: nn.Module) -> _Sharding:
    """FSDP2 (the head a unit of its own, or in a unit that may reshard): gathered in the
    forward, and FSDP2 runs its backward hooks for any use of the gathered weight. FSDP1: the
    flat parameters are whole only inside the wrapper's forward, and re-gathered for the
    backward (or reduced, for the root) from hooks on the wrapper's outputs. DeepSpeed ZeRO-3
    (partitioned parameters carry ds_id): gathered in the module's forward, its backward hooks
    on the module's outputs."""
    if model is not None and _fsdp1_modules(model):
        return _Sharding(inside=True, join=True, verify_wrapped=True)
    fsdp_module = _fsdp2_module_class()
    if fsdp_module is not None and (isinstance(lm, fsdp_module) or isinstance(head, fsdp_module)):
        return _Sharding(inside=True)
    if hasattr(getattr(head, "weight", None), "ds_id"):
        return _Sharding(inside=True, join=True)
    return _Sharding()


def _fsdp1_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without FSDP
        return None
    return FullyShardedDataParallel


def _fsdp1_modules(model: nn.Module) -> bool:
    fsdp1 = _fsdp1_class()
    return fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules())


def _fsdp1_inner(head):
    """The nn.Linear inside an FSDP1 unit of its own (FSDP1 gathers, then calls it)."""
    fsdp1 = _fsdp1_class()
    if fsdp1 is not None and isinstance(head, fsdp1) and type(head.module) is nn.Linear:
        return head.module
    return head


def _ddp_static_graph(model: nn.Module) -> bool:
    return (isinstance(model, nn.parallel.DistributedDataParallel)
            and bool(getattr(model, "static_graph", False)))


def _joined(loss: torch.Tensor, output: Optional[torch.Tensor]) -> torch.Tensor:
    """``loss`` plus an exact 0 computed from the model's output, under DDP with
    ``static_graph=True``, FSDP1 and ZeRO-3 only. The fused loss reads the backbone's hidden
    states and the head's weight, not what the model returned; these wrappers hang their backward
    work on the model's outputs (a static-graph DDP its gradient all-reduce, FSDP1 its root's
    backward state, ZeRO-3 the re-gathering of each module), so without the join each DDP rank
    would keep its own gradients and FSDP1 / ZeRO-3 would fail in the backward. The join costs
    a pass over the head's weight gradient (its zero gradient flows back through the head for
    the kept position), hence nowhere else. The sum of an empty slice is 0 whatever the output
    holds (inf or NaN included); it goes to the loss's device, which is the head's (a model split
    over GPUs returns its outputs on the first one)."""
    if output is None or not output.requires_grad:
        return loss
    return loss + output.narrow(-1, 0, 0).sum().to(loss.device)


def _on(tensor: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.to(like.device)
