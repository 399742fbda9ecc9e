"""The known-harmless library messages of common/quiet.py are dropped, and nothing else is."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import pytest

from common.quiet import KNOWN_HARMLESS_LOG_MESSAGES, KnownHarmlessFilter, quiet_known_library_messages

CPU_WORKER = "vllm.v1.worker.cpu_worker"
LAYERWISE = "vllm.model_executor.model_loader.reload.layerwise"
SET_NUM_THREADS = "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it."


class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def vllm_log():
    """vLLM's layout without importing vLLM (seconds): the handler sits on the `vllm` logger, the
    records come from its children. Afterwards the filters are removed: they are process-wide."""
    root = logging.getLogger("vllm")
    capture, saved = Capture(), (root.level, root.propagate)
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    root.propagate = False
    with warnings.catch_warnings():
        yield capture
    root.removeHandler(capture)
    root.setLevel(saved[0])
    root.propagate = saved[1]
    for name in KNOWN_HARMLESS_LOG_MESSAGES:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, KnownHarmlessFilter)]:
            logger.removeFilter(f)


def vllm_source(relative: str) -> str:
    """A file of the installed vLLM, read without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    return (Path(spec.submodule_search_locations[0]) / relative).read_text()


def test_the_filtered_texts_are_those_the_installed_vllm_emits():
    """A vLLM upgrade that rewords a message would silently disable its filter: fail instead."""
    cpu_worker = vllm_source("v1/worker/cpu_worker.py")
    assert '"CPU backend doesn\'t allow to use "\n                "`torch.set_num_threads` after the thread binding, skip it."' in cpu_worker
    assert 'logger.warning("%s: Failed to load weights", layer.__class__.__name__)' in vllm_source(
        "model_executor/model_loader/reload/layerwise.py")


def test_set_num_threads_warning_is_dropped_and_other_cpu_worker_warnings_pass(vllm_log):
    quiet_known_library_messages()
    log = logging.getLogger(CPU_WORKER)
    for _ in range(3):  # vLLM emits it around every image preprocessing
        log.warning(SET_NUM_THREADS)
    log.warning("%s is not found in LD_PRELOAD. For best performance, ...", "libtcmalloc")
    assert vllm_log.messages == ["libtcmalloc is not found in LD_PRELOAD. For best performance, ..."]


def test_failed_to_load_weights_is_dropped_only_for_buffer_only_layers(vllm_log):
    quiet_known_library_messages()
    log = logging.getLogger(LAYERWISE)
    for cls in ("RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm", "QKVParallelLinear", "FoPE"):
        log.warning("%s: Failed to load weights", cls)  # exactly as vLLM's finalize_layerwise_processing
    log.warning("Allocating %.1f MB of device memory to buffers to load %s layers.", 3.0, "['A', 'B']")
    assert vllm_log.messages == ["QKVParallelLinear: Failed to load weights", "FoPE: Failed to load weights",
                                 "Allocating 3.0 MB of device memory to buffers to load ['A', 'B'] layers."]


def test_without_the_installer_the_messages_show(vllm_log):
    logging.getLogger(CPU_WORKER).warning(SET_NUM_THREADS)
    logging.getLogger(LAYERWISE).warning("%s: Failed to load weights", "RotaryEmbedding")
    assert len(vllm_log.messages) == 2


def test_reduce_op_deprecation_is_dropped_and_other_future_warnings_pass():
    import torch.distributed as dist

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_library_messages()
        hasattr(dist.reduce_op, "__dict__")  # what vLLM's kernel-override scan does to every module object
        warnings.warn("`torch.foo` is deprecated, please use `torch.bar` instead", FutureWarning)
        warnings.warn("`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` "
                      "instead", DeprecationWarning)  # same text, another category: not ours to drop
    assert [(str(w.message)[:10], w.category) for w in caught] == [("`torch.foo", FutureWarning),
                                                                   ("`torch.dis", DeprecationWarning)]


def test_installing_twice_installs_one_filter_each(vllm_log):
    quiet_known_library_messages()
    quiet_known_library_messages()
    for name in KNOWN_HARMLESS_LOG_MESSAGES:
        assert sum(isinstance(f, KnownHarmlessFilter) for f in logging.getLogger(name).filters) == 1
    ours = [f for f in warnings.filters if f[1] is not None and "reduce_op" in f[1].pattern]
    assert len(ours) == 1
