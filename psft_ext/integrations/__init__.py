"""Training integrations of psft_ext: drop-in PSFT for ``transformers``, TRL and plain loops.

Each integration is a submodule, imported on demand so that ``import psft_ext`` never needs the
training frameworks:

    from psft_ext.integrations.transformers import PSFTConfig, PSFTTrainer   # transformers.Trainer
    from psft_ext.integrations.trl import PSFTConfig, PSFTTrainer            # trl.SFTTrainer
    from psft_ext.integrations.old_policy import OldPolicyGroups            # plain PyTorch loops

``old_policy`` (the old-policy group scheduler and cache) and ``causal_lm`` (the PSFT loss and the
old log-probs of a Hugging Face style causal LM, through the fused linear loss when the LM head
allows it) are framework-free; the Trainer and TRL modules are thin layers over them.
"""
