"""Benchmarks of the kit's own code, one module per concern, each registering its command.

- `decode`: `bench-decode`, dicomsdl vs pydicom on this competition's files (the benchmark itself is
  competition-independent: `core.bench_decode`);
- `epoch`: `bench-epoch`, a box-model epoch from the study cache vs decoding DICOMs on the fly;
- `backbones`: `bench-backbones`, training / inference images per second of the 3rd place's networks;
- `train`: `bench-train`, steady-state throughput of a real training stage beside its network alone
  and its data alone, naming the bottleneck;
- `cost`: `bench-cost`, a profile's training cost (runs, images, FLOPs, GPU hours), and the cost model
  the others share;
- `inference`: `bench-inference`, the submission's cost per test study and its Kaggle projection.
"""
