"""Test support: the token-by-token oracle, seeded random cases, baselines (verl, a per-sequence loop), the fuzz."""
