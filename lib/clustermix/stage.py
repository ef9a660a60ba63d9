"""What a stage is: one declaration (name, tables read and written, the config keys of its fingerprint,
help, and one ``run(ctx, inputs) -> counts``), and the context its ``run`` gets.

The runner, the CLI, the refresh and the report derive everything from the declarations in
:mod:`clustermix.registry`. A stage's code is named by ``"module:function"`` strings and imported
only when the stage runs, so ``clustermix --help`` never imports an engine.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from clustermix.config import Config
    from clustermix.inputs import InputSpec
    from clustermix.lake import Lake
    from clustermix.tableio import TableWriter


@dataclass(frozen=True)
class Stage:
    """One stage's declaration.

    ``fingerprint``: dotted config keys (a whole section, or one key of it) whose values shape the
    stage's output; ``ignore`` drops resource knobs from a section named there; ``salt`` is a
    constant bumped when the output's layout changes for the same inputs. ``run`` and ``inputs``
    name functions as ``"module:function"``: ``run(ctx, inputs) -> counts`` and
    ``inputs(ctx) -> dict``, what the stage depends on besides tables and config (an input
    listing, a file's digest). ``in_run``: part of ``clustermix run`` (a callable of the config
    decides for optional stages). ``engine``: ``"ray"`` for a stage that must run on a Ray image
    with no Java: its context refuses Spark, and the runner prepares no Spark state for it."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    fingerprint: tuple[str, ...]
    help: str
    run: str
    inputs: str | None = None
    ignore: tuple[str, ...] = ()
    salt: dict[str, Any] = field(default_factory=dict)
    in_run: bool | Callable[[Config], bool] = True
    engine: str = "spark"  # "ray": runs where there is no JVM (commits with delta-rs, never opens Spark)

    def function(self) -> Callable[..., dict[str, Any]]:
        return _resolve(self.run)

    def extra_inputs(self, ctx: Context) -> dict[str, Any]:
        return _resolve(self.inputs)(ctx) if self.inputs else {}

    def config_hash(self, cfg: Config) -> str:
        """A stable hash of the config values named in ``fingerprint`` (less ``ignore``), and ``salt``."""
        tree = cfg.to_dict()
        values: dict[str, Any] = {}
        for key in self.fingerprint:
            node: Any = tree
            for part in key.split("."):
                node = node[part]
            if isinstance(node, dict):
                node = {k: v for k, v in node.items() if f"{key}.{k}" not in self.ignore}
            values[key] = node
        payload = {"stage": self.name, "config": values, "salt": self.salt}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def runs_in(self, cfg: Config) -> bool:
        return self.in_run(cfg) if callable(self.in_run) else self.in_run


def _resolve(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    fn: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return fn


class Context:
    """What a stage's ``run`` gets: the config, the lake, the run id, the writer of its tables, the
    engines (Spark on first use; :meth:`ray` connects Ray), and the run's shared state (the input
    listing, options such as ``recluster``, the manifest for extra figures)."""

    def __init__(self, run: Any, write: TableWriter | None = None, engine: str = "spark") -> None:
        self._run = run
        self._write = write
        self._engine = engine

    @property
    def write(self) -> TableWriter:
        """The writer of the stage's tables (none while the runner asks for the stage's inputs)."""
        if self._write is None:
            raise RuntimeError("a stage's inputs function cannot write tables")
        return self._write

    @property
    def cfg(self) -> Config:
        cfg: Config = self._run.cfg
        return cfg

    @property
    def lake(self) -> Lake:
        lake: Lake = self._run.lake
        return lake

    @property
    def run_id(self) -> str:
        return str(self._run.run_id)

    @property
    def spark(self) -> SparkSession:
        if self._engine == "ray":  # a Ray image has no JVM: fail here, not in a Java gateway error
            raise RuntimeError("a Ray stage cannot use Spark: read and commit with delta-rs (clustermix.deltars)")
        spark: SparkSession = self._run.spark
        return spark

    def ray(self) -> None:
        self._run.ray()

    @property
    def manifest(self) -> dict[str, Any]:
        manifest: dict[str, Any] = self._run.manifest
        return manifest

    @property
    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = self._run.options
        return options

    @property
    def input_spec(self) -> InputSpec | None:
        spec: InputSpec | None = self._run.input_spec
        return spec

    @input_spec.setter
    def input_spec(self, spec: InputSpec) -> None:
        self._run.input_spec = spec


def fingerprint(stage: str, config_hash: str, inputs: dict[str, Any]) -> str:
    """What makes a stage's output what it is: its config and the versions of what it read."""
    payload = json.dumps({"stage": stage, "config": config_hash, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]
