"""Training workloads on mlkv tables, each beside the same model trained in memory with plain PyTorch.

- `dlrm`: DLRM on Criteo-format click logs (`criteo`: the format; `criteo_synth`: look-alike data).
- `kge`: DistMult / ComplEx / TransE on offline knowledge graphs (`kg_data`).
- `gnn`: GraphSAGE link prediction on the MovieLens-100k graph (`graph_data`).
- `runner`: the shared loop (look-ahead, checkpoints, resume, progress, report); `tables`: mlkv or in-memory
  embedding tables behind one interface; `metrics`: AUC, log loss, filtered ranks; `sources`: where the
  offline data live; `cli`: the `mlkv train dlrm|kge|gnn` flags (torch-free).
"""
