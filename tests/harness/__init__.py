"""Test harnesses (not shipped): run the trainer and read its steps (`trainer`), the feature
matrix (`feature_matrix`), dataset copies (`data`). Importable as `harness.*` (pytest's
`pythonpath` puts tests/ on sys.path)."""
