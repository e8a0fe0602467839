"""Runtime contexts for the models of a run: the reference pass, activation checkpointing, the attention kernel,
frozen weights in bf16 and eval mode for no-grad passes."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn


def reference_context(policy):
    """A context in which `policy` computes the reference model's outputs (LoRA: adapters disabled)."""
    if hasattr(policy, "disable_adapter"):
        return policy.disable_adapter()
    return nullcontext()


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (non-reentrant, so LoRA needs no input grads)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def attention_for(setting: str) -> str | None:
    """The attention kernel `setting` asks for; None (``auto``) keeps the model's own (SDPA for Llama).

    ``eager`` is faster on CPU (forward + backward of the SmolLM2-135M body in bf16: 20 % at 122 tokens, 21 % at 512,
    with about 1 GB more memory at 2 x 512 tokens), but it is not the default: whole updates were only 6 % faster for
    bf16 PPO and 13 % slower for fp32 GRPO in the side-by-side benchmark. It learns as SDPA does: over 12 smoke seeds
    its gains match SDPA's with rounding-sized noise added to the weights (docs/PERFORMANCE.md)."""
    return None if setting == "auto" else setting


def set_attention(implementation: str | None, *models: nn.Module | None) -> None:
    """Switch each model (a PEFT model included) to `implementation`; None leaves them as loaded."""
    if implementation is None:
        return
    for model in models:
        if model is not None:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.set_attn_implementation(implementation)


def store_body_linears_in_bf16(model: nn.Module) -> None:
    """Keep a frozen model's body `nn.Linear` weights in bf16, for use under bf16 autocast only.

    Autocast casts every Linear weight to bf16 on each call, and it caches that cast only for weights that require
    grad, so a frozen model paid a full cast per forward. Stored in bf16 (the same round-to-nearest cast), its outputs
    are bit-identical and it uses half the memory. Embeddings, norms, the LM head and a score head stay fp32."""
    heads = [model.get_output_embeddings()] if hasattr(model, "get_output_embeddings") else []
    if hasattr(model, "score"):
        heads.append(model.score)
    skip = {id(p) for head in heads if head is not None for p in head.parameters()}
    skip |= {id(p) for p in model.get_input_embeddings().parameters()}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in skip:
            module.to(torch.bfloat16)


@contextmanager
def eval_mode(*models: nn.Module):
    """Temporarily put `models` in eval mode (restoring train mode afterwards)."""
    previous = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in zip(models, previous):
            m.train(was_training)


@contextmanager
def observe_precision(policy: nn.Module, observed: dict):
    """While `observed` is empty (the first update forward), record into it the dtype of the policy body's matmuls
    and of its LM head, and whether activation checkpointing is on."""
    if observed:
        yield
        return
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    checkpointing_on = getattr(base, "is_activation_checkpointing", None)
    if checkpointing_on is None:
        checkpointing_on = base.is_gradient_checkpointing
    observed["gradient_checkpointing_active"] = bool(checkpointing_on and base.training)

    def recorder(key):
        def record(module, inputs, output):
            observed.setdefault(key, str(output.dtype))

        return record

    body_linear = next(m for m in getattr(base, base.base_model_prefix).modules() if isinstance(m, nn.Linear))
    handles = [
        body_linear.register_forward_hook(recorder("update_matmul_dtype")),
        base.get_output_embeddings().register_forward_hook(recorder("lm_head_dtype")),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
