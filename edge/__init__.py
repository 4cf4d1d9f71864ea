"""Everything about artifacts and devices: export, weight-only updates, signed artifacts, the registry, the agent.

`export` (ONNX fp32/INT8/FP16), `weights` (weight-only updates), `artifacts`
(signed manifests and their folders on disk), `tls`, `registry` (the gRPC
service), `publish` (its admin client), `fleet` (a local fleet of processes),
`runtime` and `tensorrt_engine` (what a device serves with), and `agent` (the
device side). Imports only the core; the agent imports neither torch nor peft.
"""
