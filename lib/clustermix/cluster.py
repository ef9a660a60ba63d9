"""The cluster stage: k-means over the embeddings of the configured model -> ``centroids``, ``assignments``
(the engine: :mod:`clustermix.kmeans_dist`). Ray and delta-rs only: no JVM."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clustermix.stage import Context


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    from clustermix.kmeans_dist import run_cluster
    from clustermix.models import model_id

    ctx.ray()
    return run_cluster(ctx.lake, ctx.cfg.cluster, model_id(ctx.cfg.embed.model), inputs["embeddings"],
                       ctx.run_id, ctx.write)
