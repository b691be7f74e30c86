"""`ptr-kernels demo`: RL with verifiable rewards on a CPU, trained with cppo, dppo and ppo in turn.

A tiny causal transformer learns to write the sorted distinct digits of a prompt (`task`), starting from a
short supervised warm start; RL then trains it with group rollouts and `ptr_kernels.policy_loss` (`train`),
and `report` plots where each method rejects updates. `cli` holds the subcommand's options.
"""
