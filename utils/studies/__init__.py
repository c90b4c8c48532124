"""The studies of `gen_attack_stats.py` (ccu, alpha, audit), and the toy experiments of "Know your limits"
(toy models, linear regions) that the limits figures are drawn from."""
