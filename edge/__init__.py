"""Everything about artifacts and devices: export, weight-only updates, signed artifacts, the registry, the agent.

`export` (one version: ONNX fp32/INT8/FP16, a reference set), `weights`
(weight-only updates), `artifacts` (a version's formats under one signed
manifest, and their folders on disk), `capabilities` (what a device can run),
`agreement` (a format against fp32), `tls`, `registry` (the gRPC service),
`publish` (its admin client), `fleet` (a local fleet of processes), `runtime`
and `tensorrt_engine` (what a device serves with), and `agent` (the device
side). Imports only the core; the agent imports neither torch nor peft.
"""
