"""Training: recipes (YAML -> validated dataclasses), the data pipeline, and the QAT loop."""
