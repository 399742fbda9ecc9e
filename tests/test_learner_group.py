"""The learner on Ray: two DeepSpeed ranks in a placement group (fake GPUs), bit-identical ranks
under ZeRO-2 and ZeRO-3, data parallelism equal to one rank, and exact logprob parity with a real
vLLM rollout worker - for the base weights, after a LoRA adapter push and after a full push."""

from __future__ import annotations

import pytest
import torch

from learner.config import AlgorithmConfig, LearnerConfig
from learner.synthetic import make_pages, synthetic_experiences
from learner.types import TrainBatch

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def policy(tiny_models):
    return str(tiny_models["policy"])


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    return make_pages(tmp_path_factory.mktemp("learner-group-pages"))


@pytest.fixture(scope="module")
def experiences(policy, pages):
    # 7 answers: not a multiple of the 2 ranks, so the plan pads with ghost rows
    exps = synthetic_experiences(policy, [pages[0], pages[1], None, pages[2]], answers_per_question=2)
    return exps[:7]


def _cfgs(zero_stage: int, gpus: float = 0.0):
    cfg = LearnerConfig(num_ranks=2, num_cpus_per_rank=1, num_gpus_per_rank=gpus, zero_stage=zero_stage,
                        micro_batch_size=2, learning_rate=1e-3, value_learning_rate=1e-3, collective_timeout_s=300,
                        zero3_partition_all=True)
    algo = AlgorithmConfig(advantage="gae", minibatch_size=4, ppo_epochs=2, kl_coef=0.05)
    return cfg, algo


@pytest.fixture(scope="module")
def zero2_group(ray_cluster, policy, tmp_path_factory):
    """Two ZeRO-2 ranks, one fake GPU each (the cluster has 2): all GPUs of the cluster."""
    from learner.group import LearnerGroup

    cfg, algo = _cfgs(2, gpus=1)
    group = LearnerGroup(policy, cfg, algo, export_dir=str(tmp_path_factory.mktemp("exports")), start_timeout_s=300)
    yield group
    group.shutdown()


def test_ranks_are_placed_in_a_placement_group_with_fake_gpus(zero2_group, ray_cluster):
    ray = ray_cluster
    table = ray.util.placement_group_table(zero2_group.pg)
    assert table["state"] == "CREATED"
    assert [b for b in table["bundles"].values()] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    ranks = zero2_group.describe()
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["placement_group_id"] == zero2_group.pg.id.hex() for r in ranks)
    assert sorted(g for r in ranks for g in r["gpu_ids"]) == ["0", "1"]  # one fake GPU each
    assert all(r["device"] == "cpu" for r in ranks)  # torch sees no GPU: the ranks fall back to CPU/gloo
    assert all(r["master_addr"] == "127.0.0.1" for r in ranks)  # one node: loopback rendezvous


def test_data_parallel_ranks_stay_identical_and_equal_one_rank(zero2_group, policy, experiences):
    """ZeRO-2 over 2 ranks: every rank holds the same bits after each update, and the result equals
    the same update on a single rank (the per-micro-batch loss weights make the split invisible)."""
    from learner.group import LearnerGroup

    assert zero2_group.update_calls == 0, "this test needs the fresh module group (run the file in order)"
    cfg, algo = _cfgs(2)
    single = LearnerGroup(policy, cfg.model_copy(update={"num_ranks": 1}), algo, local=True)
    for step in range(2):
        metrics = zero2_group.update(TrainBatch(experiences))
        single_metrics = single.update(TrainBatch(experiences))
        hashes = zero2_group.param_hashes()
        assert len(set(hashes)) == 1, f"ranks diverged after update {step}: {hashes}"
        assert metrics["first_micro_batch/ratio_mean"] == 1.0 and metrics["first_micro_batch/clip_fraction"] == 0.0
        assert metrics["optimizer_steps"] == 4 and metrics["num_experiences"] == 7
        assert metrics["policy_loss"] == pytest.approx(single_metrics["policy_loss"], abs=1e-5)
    distributed, alone = zero2_group.trainable_state(), single.trainable_state()
    assert distributed.keys() == alone.keys()
    for name in distributed:
        torch.testing.assert_close(distributed[name], alone[name], atol=2e-5, rtol=0, msg=name)
    assert zero2_group.version == 2


def test_zero3_ranks_stay_identical(ray_cluster, policy, experiences, tmp_path):
    from learner.group import LearnerGroup

    cfg, algo = _cfgs(3)
    group = LearnerGroup(policy, cfg, algo, export_dir=str(tmp_path), start_timeout_s=300)
    try:
        for _ in range(2):
            metrics = group.update(TrainBatch(experiences))
            hashes = group.param_hashes()
            assert len(set(hashes)) == 1, hashes
            assert metrics["first_micro_batch/ratio_mean"] == 1.0 and metrics["skipped_steps"] == 0
        # the ZeRO-3 gathered export has the checkpoint's names (every rank enters the gather); rank
        # 0 alone puts one copy into the object store, and the driver holds only its reference
        import ray
        from safetensors import safe_open

        full = group.export_weights("full")
        assert full.tensors is None and isinstance(full.object_ref, ray.ObjectRef)
        tensors = full.named_tensors()
        with safe_open(f"{policy}/model.safetensors", "pt") as f:
            assert set(tensors) == set(f.keys())
            for name in tensors:
                assert list(tensors[name].shape) == list(f.get_slice(name).get_shape()), name
        assert full.version == 2 and all(t.numel() > 0 for t in tensors.values())
    finally:
        group.shutdown()


def test_zero3_full_fine_tuning_partitions_the_reference(ray_cluster, policy, experiences, tmp_path):
    """Full fine-tuning with a KL penalty keeps a frozen reference; under ZeRO-3 each of the 2
    ranks holds about half of it (not a whole copy), and its logprobs are the starting policy's
    before and after the policy moves."""
    from learner.group import LearnerGroup

    cfg, algo = _cfgs(3)
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"enabled": False})})
    group = LearnerGroup(policy, cfg, algo, export_dir=str(tmp_path), start_timeout_s=300)
    try:
        held = [r["reference_numel"] for r in group.describe()]
        total = held[0][1]
        assert total > 0 and all(t == total for _, t in held), held
        assert sum(h for h, _ in held) >= total and all(h <= total // 2 + 64 for h, _ in held), held
        before, _ = group.compute_ref_and_old(TrainBatch(experiences))
        for old, ref in zip(before.old_logprobs, before.ref_logprobs):
            torch.testing.assert_close(ref, old, atol=1e-6, rtol=0)
        group.update(TrainBatch(experiences))
        after, _ = group.compute_ref_and_old(TrainBatch(experiences))
        moved = max(float((o - r).abs().max()) for o, r in zip(after.old_logprobs, after.ref_logprobs))
        assert moved > 1e-4, "the policy did not move: the test proves nothing"
        for ref_before, ref_after in zip(before.ref_logprobs, after.ref_logprobs):
            torch.testing.assert_close(ref_after, ref_before, atol=1e-6, rtol=0)
    finally:
        group.shutdown()


def test_a_rank_sigkilled_mid_update_is_named_with_its_node_and_the_resumed_update_equals_the_uninterrupted_one(
        ray_cluster, policy, experiences, tmp_path):
    """Rank 1's process is SIGKILLed (the OOM killer, a node agent) while the 2 ranks are in an
    update, rank 0 inside a gloo collective with it. The driver must hear of it at once (not after
    learner.collective_timeout_s), with the rank, its node and process named; and the update,
    redone from the checkpoint taken before it by a new group, must equal the update that was
    never interrupted. (Before: the error could name the surviving rank, whose collective failed
    first, and did not say where the dead one ran.)"""
    import os
    import signal
    import threading
    import time

    from learner.group import LearnerGroup, LearnerRankLost

    cfg, algo = _cfgs(2)
    before = tmp_path / "before"
    group = LearnerGroup(policy, cfg, algo, export_dir=str(tmp_path / "exports"), start_timeout_s=300)
    try:
        group.save_checkpoint(str(before))
        uninterrupted = group.update(TrainBatch(experiences))
        expected_hash = group.param_hashes()[0]
        group.load_checkpoint(str(before))
        rank1 = group.describe()[1]
        kill = threading.Timer(uninterrupted["update_seconds"] / 3, os.kill, (rank1["pid"], signal.SIGKILL))
        t0 = time.monotonic()
        kill.start()
        with pytest.raises(LearnerRankLost) as lost:
            group.update(TrainBatch(experiences))
        waited = time.monotonic() - t0
    finally:
        group.shutdown()
    message = str(lost.value)
    assert lost.value.rank == 1 and lost.value.node_alive, message
    assert "rank 1" in message and "rank 0" not in message.split(". ")[0], message
    assert f"pid {rank1['pid']}" in message and rank1["node_id"][:12] in message and "127.0.0.1" in message, message
    assert waited < 60 < cfg.collective_timeout_s, waited  # heard of at once, not at the timeout

    resumed = LearnerGroup(policy, cfg, algo, export_dir=str(tmp_path / "exports-2"), start_timeout_s=300)
    try:
        resumed.load_checkpoint(str(before))
        again = resumed.update(TrainBatch(experiences))
        assert resumed.param_hashes() == [expected_hash] * 2
    finally:
        resumed.shutdown()
    compared = [k for k in uninterrupted if not k.endswith(("seconds", "tokens_per_s", "tokens_per_s_per_rank"))]
    assert {"policy_loss", "grad_norm", "optimizer_steps", "weights_version"} <= set(compared)
    assert {k: again[k] for k in compared} == {k: uninterrupted[k] for k in compared}


@pytest.fixture(scope="module")
def rollout(ray_cluster, policy):
    from rollout.config import RolloutConfig
    from rollout.group import RolloutGroup

    cfg = RolloutConfig(num_workers=1, num_cpus_per_worker=1, max_model_len=1024, weight_sync_timeout_s=120)
    group = RolloutGroup(policy, cfg, max_lora_rank=8)
    group.ready()
    yield group
    group.shutdown()


def _rollout_batch(rollout, pages, seed: int) -> TrainBatch:
    from rollout.config import SamplingConfig
    from rollout.types import RolloutRequest

    requests = [RolloutRequest("qa", "What is the invoice number?", (pages[0],)),
                RolloutRequest("qb", "What is the total?", (pages[1],))]
    out = rollout.generate(requests, SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=seed))
    assert not out.skipped and len(out.results) == 2
    rewards = [[1.0, 0.0] for _ in out.results]
    return TrainBatch.from_rollouts(out.results, rewards, {p.page_id: p for p in pages},
                                    max_image_pixels=rollout.cfg.max_image_pixels)


def test_learner_logprobs_match_vllm_before_and_after_weight_pushes(zero2_group, rollout, pages):
    """The learner scores exactly what vLLM sampled (fp32: max |Δlogprob| < 1e-3): with the base
    weights, after a LoRA adapter export -> push, and after a merged full export -> push."""
    group = zero2_group
    if group.version > rollout.version:  # the module group may have trained already: sync first
        rollout.push_lora(group.export_weights("lora").adapter_dir, group.version)
    batch = _rollout_batch(rollout, pages, seed=1)
    assert {e.weights_version for e in batch.experiences} == {group.version}
    _, metrics = group.compute_ref_and_old(batch)
    mismatches = {"start": metrics["logprob_mismatch_max"]}

    group.update(batch)
    lora = group.export_weights()
    assert lora.kind == "lora" and lora.version == group.version
    rollout.push_lora(lora.adapter_dir, lora.version)
    batch = _rollout_batch(rollout, pages, seed=2)
    assert {e.weights_version for e in batch.experiences} == {lora.version}
    scores, metrics = group.compute_ref_and_old(batch)
    mismatches["after_lora_push"] = metrics["logprob_mismatch_max"]
    # the adapter moves logprobs far more than the tolerance: parity proves vLLM serves it
    adapter_effect = max(float((o - r).abs().max()) for o, r in zip(scores.old_logprobs, scores.ref_logprobs))
    assert adapter_effect > 1e-2, adapter_effect

    update_metrics = group.update(batch)
    assert update_metrics["logprob_mismatch_max"] == pytest.approx(mismatches["after_lora_push"])
    full = group.export_weights("full")  # LoRA merged into the base weights, put by rank 0
    rollout.push_full(full.object_ref, full.version)
    batch = _rollout_batch(rollout, pages, seed=3)
    mismatches["after_full_push"] = group.compute_ref_and_old(batch)[1]["logprob_mismatch_max"]
    print("rollout-vs-learner max |dlogprob|:", mismatches, "adapter effect:", adapter_effect)
    assert all(m < 1e-3 for m in mismatches.values()), mismatches
