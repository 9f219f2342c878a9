"""E-GRPO: entropy-guided GRPO for flow-matching text-to-image models (arXiv 2601.00423)."""

__version__ = "0.1.0"
