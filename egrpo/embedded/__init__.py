"""The embedded default task: a tiny FLUX-architecture text-to-image model on scikit-learn's handwritten digits."""
