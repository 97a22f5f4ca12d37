"""Pipeline parallel in eager mode on vLLM 0.32's CPU backend: the later stages' input buffer.

vLLM's model runner allocates the buffer a later pipeline stage receives the previous stage's
hidden states into (``GPUModelRunner.intermediate_tensors``) only in its dummy/warm-up run.
The CPU worker skips that run in eager mode (``--enforce-eager`` with an explicit KV-cache
size: ``CPUWorker._should_warm_up_model``; ``CPUModelRunner.warming_up_model`` returns at once
for ``CompilationMode.NONE``), so the first real step of stage 1 fails in vLLM itself, for any
model (dense Llama too)::

    File ".../vllm/v1/worker/gpu_model_runner.py", line 3174, in
    sync_and_gather_intermediate_tensors
        assert self.intermediate_tensors is not None
    AssertionError

``install`` (called once per process by the plugin's ``register``) makes that method
allocate the buffer on first use, exactly as the dummy run would
(``make_empty_intermediate_tensors(batch_size=max_num_tokens)``). vLLM calls the method only
on a pipeline stage after the first; with the buffer present (compiled mode, or a fixed vLLM)
it changes nothing. Being patched at registration, the workaround serves any model in a
process with the plugin loaded, dense ones too.
"""

from __future__ import annotations

_MARK = "_harp_lazy_intermediate_buffer"


def install() -> bool:
    """Patch vLLM's model runner (once: a second call changes nothing); True if patched."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.sync_and_gather_intermediate_tensors
    if getattr(original, _MARK, False):
        return True

    def sync_and_gather_intermediate_tensors(self, num_tokens, intermediate_tensors,
                                             sync_self):
        if self.intermediate_tensors is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype,
                device=self.device)
        return original(self, num_tokens, intermediate_tensors, sync_self)

    setattr(sync_and_gather_intermediate_tensors, _MARK, True)
    GPUModelRunner.sync_and_gather_intermediate_tensors = (
        sync_and_gather_intermediate_tensors)
    return True
