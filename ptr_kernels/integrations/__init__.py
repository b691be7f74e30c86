"""Drop-in integrations: `ptr_kernels.integrations.verl` (verl policy losses, `register()`) and
`ptr_kernels.integrations.trl` (a `GRPOTrainer` subclass). Import the one you need; this package imports
neither verl nor TRL (docs/integrations.md)."""
