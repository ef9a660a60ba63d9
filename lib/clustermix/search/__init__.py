"""CLIMB mixture search (Diao et al., 2025): sample mixtures over clusters, train small proxy LMs
on them as Ray tasks, fit a LightGBM predictor from weights to target loss, and iterate on the
mixtures it ranks best.

- :mod:`.mixtures`: the search space (size-biased Dirichlet prior, repetition caps, super-clusters)
- :mod:`.predictor`: the LightGBM predictor and candidate ranking
- :mod:`.proxy`: the tokenizer and the small torch language model
- :mod:`.climb`: the iterative loop and the Ray task that trains one proxy
- :mod:`.stage`: ``run_search``, the pipeline stage that writes ``mixtures`` and the best mixture
"""
