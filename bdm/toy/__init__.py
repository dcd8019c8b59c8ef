"""The toy world: a procedural domain small enough to train every model of the BDM story on a CPU,
and the embedded default model that `python -m bdm.generate` uses when no weights are given."""
