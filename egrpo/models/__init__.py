"""Policy adapters of real text-to-image pipelines (FLUX, SD3 / SD3.5) and their text-embedding cache."""
