"""Methods added to vLLM's worker (`worker_extension_cls`), reached with `llm.collective_rpc`.

The OpenRLHF/veRL way of loading weights (`model_runner.model.load_weights`) fails on CPU, where
weights are pre-packed; vLLM's own in-place `reload_weights` works on CPU and GPU.
"""

from __future__ import annotations


class DocRLWorkerExtension:
    def docrl_reload_weights(self, named_tensors: list) -> int:
        """Load (checkpoint name, tensor) pairs in place; returns how many were given."""
        self.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        _retie_word_embeddings(self.model_runner.model)
        return len(named_tensors)


def _retie_word_embeddings(model) -> None:
    """With tied word embeddings (Qwen2-VL-2B, Qwen2.5-VL-3B) the output head is the input
    embedding and the checkpoint holds no lm_head. vLLM's in-place reload loads the embedding, but
    the head, given no tensor of its own ("ParallelLMHead: Failed to load weights"), gets its old
    kernel state back: on CPU, a GEMM weight packed from the old embedding, so after a push the
    model would score every token with the old head. Keep the head on the embedding's tensor and
    let it redo its post-load step (on CPU, repacking the new values; elsewhere nothing)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    if not (getattr(config, "tie_word_embeddings", False) or getattr(text_config, "tie_word_embeddings", False)):
        return
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    embeddings = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
    if len(heads) != 1 or len(embeddings) != 1:
        raise RuntimeError(f"tied word embeddings: expected one output head and one input embedding in "
                           f"{type(model).__name__}, found {len(heads)} and {len(embeddings)}")
    head, embedding = heads[0], embeddings[0]
    if head.weight is not embedding.weight:
        head.weight = embedding.weight
    head.quant_method.process_weights_after_loading(head)
