"""Volume 3: an inference engine for the LLaMA of Volumes 1-2 (see README.md, chapter 3)."""
