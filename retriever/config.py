"""The `retriever` config section: the ColPali-family model, the page index, and its actors."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.schema import Section


class RetrieverWarmStartConfig(Section):
    """Contrastive warm start of a multi-vector retriever before RL (retriever/finetune.py), on the
    (question, gold page) pairs of the first `fraction` of the shuffled training questions; the
    evaluation questions only measure it (held-out recall@1 before and after)."""

    steps: int = Field(0, ge=0)  # 0: none, the index is built with retriever.model as it is
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(5e-5, gt=0.0)  # for a pretrained retriever; the tiny preset sets its own
    negatives: int = Field(3, ge=1)  # per question: its document's other pages first, then other documents'
    temperature: float = Field(0.02, gt=0.0)
    # "embeddings": only the token embeddings and the output projection learn. A random tiny
    # retriever needs it: with every weight free, MaxSim falls into a state where each question
    # token's best match on every page is the same prompt token, and no gradient leaves it.
    trainable: Literal["all", "embeddings"] = "all"
    smooth_max: bool = False  # train with a log-sum-exp over page tokens (every token gets gradient)
    max_eval_questions: int = Field(64, ge=0)


class RetrieverLearnConfig(Section):
    """The retriever learning from the answers during RL (retriever/page_policy.py): each answer
    reads a page drawn from softmax(MaxSim / temperature) over its question's candidates (its
    document, or the corpus's best `shortlist` pages), and a query-side adapter learns from the
    answers' rewards. The page vectors, and so the index, do not change."""

    enabled: bool = False
    # pages drawn per question (with replacement), each read by rollout.sampling.n answers: the
    # policy's group is one drawn page's answers, the retriever's the question's draws
    pages_per_question: int = Field(4, ge=2)
    # of the page distribution, in raw MaxSim units (a sum over the query's tokens, so pages differ
    # by whole units): retriever/entropy should start well above 0, or one page takes every draw
    # and nothing is learned (the tiny retriever: entropy 0.1 of ln 4 at 0.25, 1.3 at 4)
    temperature: float = Field(1.0, gt=0.0)
    shortlist: int = Field(8, ge=2)  # scope corpus: the candidates are the corpus's best pages
    learning_rate: float = Field(1e-3, gt=0.0)  # Adam; measured on the tiny retriever: 3e-3 learns less, 1e-2 stalls
    # reward_weighted: each question's drawn pages, weighted by softmax(reward / reward_temperature),
    # pull softmax(MaxSim / contrastive_temperature) towards them (measured on the tiny retriever:
    # held-out recall@1 0.81 where REINFORCE reached 0.39, retriever/page_policy.py);
    # reinforce: the policy gradient with the question's draws as baseline
    loss: Literal["reward_weighted", "reinforce"] = "reward_weighted"
    contrastive_temperature: float = Field(0.25, gt=0.0)
    reward_temperature: float = Field(0.1, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    weight_cap: float = Field(2.0, ge=1.0)  # reinforce: truncated importance weights of pages drawn by an older version


class RetrieverConfig(Section):
    model: str = "tiny"  # "tiny" (built locally), a local path, or a hub id such as vidore/colqwen2-v1.0
    # the family (retriever.encoder.FAMILIES): multi-vector colqwen2, colqwen2_5, colpali; single-vector
    # biqwen2, biqwen2_5, gme. auto: from the checkpoint (retriever.encoder.infer_model_class says how)
    model_class: Literal["auto", "colqwen2", "colqwen2_5", "colpali", "biqwen2", "biqwen2_5", "gme"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    index_dir: str | None = None  # default <run.output_dir>/index
    top_k: int = Field(1, ge=1)
    use_gold_page: bool = False  # ablation: hand the policy the gold page instead of retrieving
    # corpus: search every page. document: only the pages of the question's own document (the
    # multi-page DocVQA setting, where a question comes with its document); recall@k then says
    # whether the right page of that document was among the k shown.
    scope: Literal["corpus", "document"] = "corpus"
    warm_start: RetrieverWarmStartConfig = RetrieverWarmStartConfig()
    learn: RetrieverLearnConfig = RetrieverLearnConfig()
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    num_cpus_per_actor: float = Field(1.0, gt=0.0)
    embed_batch_size: int = Field(8, ge=1)
    query_batch_size: int = Field(32, ge=1)
    max_visual_tokens: int | None = Field(None, ge=4)  # caps page resolution (pixels = n * 28 * 28)
    # -- the index at scale (docs/guides/retrieval.md, "Indexing at scale") --
    # exact: every page scored by MaxSim; two_stage: pooled vectors choose `shortlist` pages per
    # query, which are scored exactly; auto: two_stage from `two_stage_min_pages` pages per actor.
    # A single-vector family's index is always searched exactly (one vector has nothing to pool)
    search: Literal["auto", "exact", "two_stage"] = "auto"
    two_stage_min_pages: int = Field(20_000, ge=1)
    shortlist: int = Field(1024, ge=1)  # pages per query re-scored exactly after the first stage
    # first-stage vectors per page (token pooling): at most pooled_vectors, fewer when every token
    # of the page has one within cosine pooling_similarity
    pooled_vectors: int = Field(128, ge=1)
    pooling_similarity: float = Field(0.5, gt=0.0)
    vector_dtype: Literal["float32", "float16"] = "float32"  # how segments store the page vectors
    segment_pages: int = Field(256, ge=1)  # pages per segment file: the unit of streaming and of resuming

    def search_method(self, num_pages: int) -> str:
        """'exact' or 'two_stage' for an index (shard) of `num_pages` pages."""
        if self.search != "auto":
            return self.search
        return "two_stage" if num_pages >= self.two_stage_min_pages else "exact"

    def pooling(self):
        """The token pooling of the first stage (`retriever.pooling.Pooling`)."""
        from retriever.pooling import Pooling

        return Pooling(self.pooled_vectors, self.pooling_similarity)
