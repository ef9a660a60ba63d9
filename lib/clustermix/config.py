"""The one typed, frozen config object, built from YAML plus ``--set key=value`` overrides.

Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the dotted key,
before any stage runs. YAML is read with ``yaml.safe_load`` only: no object construction.
This module is a leaf: it imports nothing of the project, and building a config has no side
effects (the runner applies the ``storage`` section and checks paths: :mod:`clustermix.pipeline`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_PREFIX = "builtin://"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "local.yaml"


class ConfigError(Exception):
    """A config key has a wrong name, type or value. Raised before any work is done (exit code 2).
    Defined here so the config imports nothing of the project; :mod:`clustermix.errors` re-exports it."""

    exit_code = 2

    def __init__(self, key: str, value: object, problem: str) -> None:
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"config error: {key}={value!r}: {problem}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LakeConfig(_Section):
    root: str = "./lake"
    lock_stale_seconds: int = Field(3600, ge=1)


class StorageConfig(_Section):
    """How to reach an S3-compatible object store when ``lake.root`` or ``input.path`` is ``s3://``.

    Credentials are not config: every engine uses the AWS default chain (AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY, a profile, web identity or an instance/pod role). ``clustermix.storage``
    maps these keys to s3a, pyarrow, delta-rs and boto3 settings."""

    endpoint: str | None = None  # e.g. http://minio:9000; None: AWS_ENDPOINT_URL, else AWS itself
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION
    path_style: bool | None = None  # None: path-style URLs when an endpoint is set, virtual-hosted on AWS
    retries: int = Field(5, ge=0)  # retries of a failed request (throttling, 5xx, network) in every engine
    connect_timeout_s: float = Field(10.0, gt=0)
    request_timeout_s: float = Field(60.0, gt=0)
    spark_credentials_provider: str | None = None  # s3a's provider class; None: the AWS SDK's default chain

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be a URL starting with http:// or https://")
        return v


class SparkConfig(_Section):
    master: str | None = "local[2]"  # None: use what spark-submit provides
    app_name: str = "clustermix"
    shuffle_partitions: int = Field(4, ge=1)
    driver_memory: str = "4g"
    # "local-m2": resolve the Delta jars offline from the local Maven repository filled by setup;
    # "packages": let Spark's resolver fetch them (cluster images that bake jars use "none").
    delta_jars: Literal["local-m2", "packages", "none"] = "local-m2"
    maven_repo: str | None = None  # default ~/.m2/repository
    conf: dict[str, str] = Field(default_factory=dict)


class RayConfig(_Section):
    address: str | None = None  # None: start a local instance; "auto" or ray://... on a cluster
    num_cpus: int | None = Field(None, ge=1)
    object_store_memory_mb: int | None = Field(None, ge=64)


class InputConfig(_Section):
    path: str = BUILTIN_PREFIX + "bbc-unbalanced"
    format: Literal["jsonl", "parquet", "delta"] = "jsonl"
    id_field: str = "id"
    text_field: str = "text"
    domain_field: str | None = "domain"
    quality_field: str | None = "quality"
    lang_field: str | None = "lang"


class IngestConfig(_Section):
    max_chars: int = Field(1_000_000, ge=1)
    chars_per_token: float = Field(4.0, gt=0)
    # a bad input file (not its format, unreadable, cut short, columns that do not fit): "skip" ingests
    # the rest and records it in the bad_files table (a landing folder's bad upload must not stop every
    # night); "fail" stops before anything is written (clustermix.badfiles)
    on_bad_file: Literal["skip", "fail"] = "skip"
    # ingest's shuffles (its duplicate windows and joins, MinHash) get one partition per this many MiB of
    # usable input (bytes as stored: compressed files count compressed), at least one per core of the
    # cluster; spark.shuffle_partitions sizes the other stages
    partition_mb: int = Field(128, ge=1)


class EmbedConfig(_Section):
    model: str = "all-MiniLM-L6-v2"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int | None = Field(None, ge=1)  # None: from the device (batch_size_for)
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    max_seq_length: int | None = Field(None, ge=8)
    long_docs: Literal["truncate", "chunk"] = "truncate"
    precision: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # rows per Parquet file of `embeddings`: the actors' small output blocks are gathered into files of
    # this many rows (~100 MB of 384-d float32 vectors at the default) instead of one file per block
    rows_per_file: int = Field(65_536, ge=1)

    def batch_size_for(self, device: str) -> int:
        """The explicit ``batch_size``, else the default for ``device``: 32 on CPU, 256 on CUDA."""
        # A CPU gains nothing from batches past a few dozen full-length sequences (the matmuls are
        # already large) and pads more; a GPU needs hundreds to stay busy.
        return self.batch_size or (256 if device == "cuda" else 32)

    def planned_device(self) -> str:
        """The device the actors will use, as far as the driver can tell (``auto`` with GPUs
        reserved per actor means CUDA)."""
        if self.device != "auto":
            return self.device
        return "cuda" if self.gpus_per_actor > 0 else "cpu"


# k-means++ seeding on the driver costs about k · (2 + ln k) · init_sample · d operations: a few
# seconds at k = 1,000 on 100,000 points, hours at k = 20,000
KMEANSPP_MAX_K = 1000


class ClusterConfig(_Section):
    k: int = Field(100, ge=1)
    niter: int = Field(300, ge=1)
    seed: int = 42
    tol: float = Field(1e-6, ge=0)
    nredo: int = Field(1, ge=1)
    num_shards: int = Field(2, ge=1)
    # the fit sample, as FAISS's max_points_per_centroid: k·this many documents (drawn by a seeded hash
    # of the id while reading) are held by the shard actors; every document is then assigned by a
    # streaming pass. The fraction fitted goes into the manifest and the report
    max_points_per_centroid: int = Field(256, ge=1)
    # random: k sample points (FAISS's seeding; O(k·d) on the driver, any k). kmeans++: k-means++ on
    # init_sample points on the driver, O(k·init_sample·d) time: for small k only. auto: kmeans++ up
    # to KMEANSPP_MAX_K centroids, random above
    init: Literal["auto", "random", "kmeans++"] = "auto"
    init_sample: int = Field(100_000, ge=1)
    block_rows: int = Field(65_536, ge=1)  # rows per block a shard actor or an assignment task reads
    cpus_per_shard: float = Field(1.0, gt=0)  # also the threads of each shard's FAISS search and sums
    use_gpu: Literal["auto", "never", "always"] = "auto"

    def init_method(self) -> Literal["random", "kmeans++"]:
        """The seeding ``init`` stands for (``auto``: k-means++ while k <= KMEANSPP_MAX_K)."""
        if self.init == "auto":
            return "kmeans++" if self.k <= KMEANSPP_MAX_K else "random"
        return self.init

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("fit_fraction", "fit_max_points"):
                if key in data:
                    raise ConfigError(f"cluster.{key}", data[key], "replaced by cluster.max_points_per_centroid "
                                      "(the fit keeps k × that many documents, drawn while reading; every "
                                      "document is assigned)")
        return data


class StatsConfig(_Section):
    min_share: float = Field(0.007, ge=0, le=1)
    n_exemplars: int = Field(3, ge=0)


class SampleConfig(_Section):
    budget: int = Field(..., gt=0)
    unit: Literal["docs", "tokens"] = "docs"
    clip: int = Field(4, ge=1)
    seed: int = 1234
    within: Literal["uniform", "quality"] = "uniform"
    order: Literal["random", "stratified", "g2s", "s2g"] = "stratified"
    # clusters: ClusterClip across clusters. groups_then_clusters: water-fill the budget across the
    # values of group_column first (a topically diverse source spans many clusters and would gain
    # share from equal cluster shares), then ClusterClip across the clusters inside each group
    balance: Literal["clusters", "groups_then_clusters"] = "clusters"
    group_column: str = "domain"  # a column of docs; documents without a value form their own group
    group_weights: dict[str, float] = Field(default_factory=dict)  # target weight per group; unnamed: 1

    @field_validator("group_column")
    @classmethod
    def _column_name(cls, v: str) -> str:
        if not v.strip() or "`" in v:
            raise ValueError("must name a column of docs")
        return v

    @field_validator("group_weights")
    @classmethod
    def _group_weights(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            if not (w >= 0 and w != float("inf")):
                raise ValueError(f"weight of group {name!r} must be finite and >= 0")
        return v


class BlendConfig(_Section):
    mode: Literal["clusterclip", "proportional", "quality", "mixture"] = "clusterclip"
    domain_weights: dict[str, float] = Field(default_factory=dict)
    quality_alpha: float = Field(1.0, ge=0)
    mixture_path: str | None = None
    # mode mixture: "exact" realises the file's weights as token shares, shrinking the whole blend below
    # the budget where the clip binds; "fill" water-fills the budget under the clip (the mix then
    # departs from the weights wherever a cluster hits its clip)
    mixture_fit: Literal["exact", "fill"] = "exact"
    # at most this many rows per file of `blended` (small blends get smaller files: see blend.position_ranges)
    target_rows_per_file: int = Field(250_000, ge=1)
    # plans of at most this many rows are broadcast to the join with docs, which then is never
    # shuffled; larger ones are joined by shuffling both sides by id. Memory on the driver and on each
    # executor: ~170 B a row with short ids (160 MiB at 1M rows). 0: always shuffle.
    broadcast_max_rows: int = Field(1_000_000, ge=0)

    @field_validator("domain_weights")
    @classmethod
    def _weights_positive(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            if w < 0:
                raise ValueError(f"weight of domain {name!r} must be >= 0")
        return v

    @model_validator(mode="after")
    def _mode_needs(self) -> BlendConfig:
        if self.mode == "proportional" and not self.domain_weights:
            raise ValueError("mode 'proportional' needs blend.domain_weights")
        return self


class SearchConfig(_Section):
    """CLIMB mixture search (``clustermix.search``). Local defaults train ~17 tiny proxies on CPU;
    the paper's schedule is ``iterations: [64, 32, 16]`` with GPU proxies (``gpus_per_proxy: 1``)."""

    iterations: list[int] = Field(default_factory=lambda: [8, 4, 4])  # proxies trained per iteration
    candidates: int = Field(2000, ge=1)  # mixtures the predictor ranks in each later iteration
    top_fraction: float = Field(0.05, gt=0, le=1)  # later proxies: the best + a draw from this top share
    dirichlet_strength: float = Field(1.0, gt=0)  # total concentration strength·S (smaller: sparser)
    size_power: float = Field(1.0, ge=0)  # prior mean ∝ (cluster tokens)^size_power; 0 = uniform
    clip: int | None = Field(None, ge=1)  # repetition bound per document; None: sample.clip
    seed: int = 2025
    baseline: bool = True  # also train the ClusterClip-uniform mixture in iteration 1
    merge_threshold: float | None = Field(None, ge=-1, le=1)  # merge clusters with centroid cosine >= this
    merge_to: int | None = Field(None, ge=1)  # or merge until this many super-clusters remain
    target_path: str | None = None  # JSONL of target texts ...
    target_text_field: str = "text"
    target_domain: str | None = None  # ... or a corpus domain, held out from training
    target_max_docs: int = Field(200, ge=1)
    target_max_tokens: int = Field(50_000, ge=1)
    tokenizer: Literal["bytes", "words"] = "words"  # byte-level, or hashed lowercase words
    vocab_size: int = Field(2048, ge=16)  # hashed-word buckets
    proxy_tokens: int = Field(40_000, ge=1)  # training budget per proxy, in proxy tokens
    pool_tokens_per_cluster: int | None = Field(None, ge=1)  # pre-drawn sample per cluster; None: proxy_tokens
    proxy_d_model: int = Field(64, ge=8)
    proxy_layers: int = Field(2, ge=1)
    proxy_heads: int = Field(2, ge=1)
    proxy_context: int = Field(64, ge=2)
    proxy_batch_size: int = Field(16, ge=1)
    proxy_lr: float = Field(3e-3, gt=0)
    predictor_estimators: int = Field(200, ge=1)
    predictor_learning_rate: float = Field(0.05, gt=0)
    predictor_num_leaves: int = Field(8, ge=2)
    predictor_min_child_samples: int = Field(2, ge=1)
    predictor_reg_lambda: float = Field(1.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus_per_proxy: float = Field(0.0, ge=0)
    cpus_per_proxy: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(1, ge=1)

    @field_validator("iterations")
    @classmethod
    def _iterations(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("must be a non-empty list of positive proxy counts")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SearchConfig:
        if self.target_path is not None and self.target_domain is not None:
            raise ValueError("set search.target_path or search.target_domain, not both")
        if self.merge_threshold is not None and self.merge_to is not None:
            raise ValueError("set search.merge_threshold or search.merge_to, not both")
        if self.proxy_d_model % self.proxy_heads:
            raise ValueError("search.proxy_d_model must be a multiple of search.proxy_heads")
        return self


_BASELINES: list[Literal["random", "natural", "climb"]] = ["random", "natural", "climb"]


class EvaluateConfig(_Section):
    """``clustermix evaluate`` (:mod:`clustermix.evaluate`): proxies trained on the blended mix and on
    baselines of the same size, scored on held-out documents. Off by default: it trains
    ``seeds × mixes`` proxies. On, the documents of the hold-out (a seeded hash of the id below
    ``holdout_fraction``) are left out of stats, sample, blend and search, so no plan draws them.

    The proxies' shape (width, depth, heads, context, batch, learning rate, device, threads) is the
    search's (``search.proxy_*``); the tokenizer is bytes, so losses are bits per byte."""

    enabled: bool = False
    holdout_fraction: float = Field(0.05, gt=0, le=0.5)  # documents no plan may draw
    holdout_seed: int = 27
    max_per_source: int = Field(200, ge=1)  # held-out documents scored per source (the first by hash)
    max_doc_bytes: int = Field(4096, ge=16)  # each scored document's first bytes
    seeds: int = Field(3, ge=2)  # proxies per mix: the seed spread needs at least two
    seed: int = 7  # seed i of every mix: its data draw, initialisation and window order, from (seed, i)
    proxy_tokens: int = Field(200_000, ge=1)  # bytes each proxy trains on, the same for every mix
    # climb: when a search wrote a best mixture
    baselines: list[Literal["random", "natural", "climb"]] = Field(default_factory=lambda: _BASELINES.copy())
    cpus_per_proxy: float = Field(1.0, gt=0)
    gpus_per_proxy: float = Field(0.0, ge=0)


class RefreshConfig(_Section):
    """When a nightly refresh refits k-means instead of assigning new documents to the old centroids.

    Any one figure over its threshold triggers the refit (see :mod:`clustermix.drift`)."""

    max_score_drop: float = Field(0.05, ge=0, le=2)  # old docs' mean cosine minus the new docs'
    max_share_shift: float = Field(0.10, ge=0, le=1)  # total variation: cluster shares after vs before
    far_score: float = Field(0.30, ge=-1, le=1)  # a new doc below this cosine to every centroid is "far"
    max_far_fraction: float = Field(0.20, ge=0, le=1)  # share of new docs that are far
    min_new_docs: int = Field(100, ge=1)  # fewer new docs than this: figures too noisy to refit on


class NearDedupConfig(_Section):
    """MinHash near-duplicates on text, found at ingest (:mod:`clustermix.minhash`).

    Signatures of ``bands·rows`` MinHash values over word shingles of normalised text; two documents
    that agree on all ``rows`` values of any band are candidates, and a candidate pair is a match
    when the share of equal signature values (the MinHash estimate of their Jaccard similarity) is at
    least ``threshold``. With 20 bands of 5 rows a pair at Jaccard 0.8 is a candidate with
    probability 0.9996, one at 0.3 with 0.05."""

    enabled: bool = True
    threshold: float = Field(0.8, gt=0, le=1)  # Jaccard similarity of the shingle sets
    shingle_words: int = Field(5, ge=1)  # words per shingle (a text with fewer words is one shingle)
    bands: int = Field(20, ge=1)
    rows: int = Field(5, ge=1)  # MinHash values per band
    seed: int = 17
    max_iterations: int = Field(40, ge=1)  # label propagation rounds before giving up (fails, never guesses)


class SemanticDedupConfig(_Section):
    """SemDeDup inside each k-means cluster (:mod:`clustermix.semdedup`): in each cluster's order
    (earlier ingests first, then ``keep``'s order), a document whose cosine similarity to a kept one
    is at least ``threshold`` is a duplicate of the most similar; otherwise it is kept."""

    enabled: bool = False
    threshold: float = Field(0.95, gt=0, le=1)  # cosine similarity of the (L2-normalised) embeddings
    keep: Literal["centroid", "quality"] = "centroid"  # closest to the centroid, or highest quality, first
    block_rows: int = Field(4096, ge=1)  # rows compared against the kept set at once (memory, not result)
    num_actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)  # > 0: the actors search on a GPU (faiss-gpu)


class MaintainConfig(_Section):
    """``clustermix maintain``: compaction of small files and vacuum of files no version needs."""

    # files of a table smaller than this are merged into files of about this size (delta-rs optimize)
    target_file_bytes: int = Field(128 * 1024 * 1024, ge=1024 * 1024)
    # files a version older than this stopped using are deleted (and files no commit names, older than
    # this); versions that needed them can no longer be read (time travel, older runs' reports)
    retention_hours: int = Field(168, ge=0)


class DedupConfig(_Section):
    near: NearDedupConfig = NearDedupConfig()
    semantic: SemanticDedupConfig = SemanticDedupConfig()


class Config(_Section):
    lake: LakeConfig = LakeConfig()
    storage: StorageConfig = StorageConfig()
    spark: SparkConfig = SparkConfig()
    ray: RayConfig = RayConfig()
    input: InputConfig = InputConfig()
    ingest: IngestConfig = IngestConfig()
    embed: EmbedConfig = EmbedConfig()
    cluster: ClusterConfig = ClusterConfig()
    stats: StatsConfig = StatsConfig()
    sample: SampleConfig
    blend: BlendConfig = BlendConfig()
    search: SearchConfig = SearchConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    refresh: RefreshConfig = RefreshConfig()
    dedup: DedupConfig = DedupConfig()
    maintain: MaintainConfig = MaintainConfig()

    def section_hash(self, *names: str) -> str:
        """A stable hash of some sections, used to tell whether a stage's output is current."""
        payload = {n: getattr(self, n).model_dump(mode="json") for n in names}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(key, value, f"{part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as a YAML scalar/flow value (safe loader)."""
    if "=" not in item:
        raise ConfigError(item, None, "an override must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(item, raw, "empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _first_error(err: ValidationError, tree: dict[str, Any]) -> ConfigError:
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    key = ".".join(loc) if loc else "<root>"
    value: Any = tree
    for part in loc:
        value = value.get(part) if isinstance(value, dict) else None
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key is missing"
    return ConfigError(key, value, msg.removeprefix("Value error, "))


def build_config(tree: dict[str, Any]) -> Config:
    """Validate a raw mapping into a :class:`Config`, raising one :class:`ConfigError`."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise _first_error(err, tree) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (default ``conf/local.yaml``), apply ``key=value`` overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError("--config", str(path), "file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("--config", str(path), f"not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(tree, dict):
        raise ConfigError("--config", str(path), "the top level must be a mapping")
    tree = copy.deepcopy(tree)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return build_config(tree)
