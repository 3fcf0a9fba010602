"""leap-dspy: LEAP for DSPy agents."""
