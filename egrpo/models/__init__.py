"""Policy adapters of real diffusers pipelines (FLUX, SD3 / SD3.5 text-to-image; Wan 2.1 / 2.2 text-to-video) and
their text-embedding cache."""
