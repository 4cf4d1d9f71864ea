"""Adapter-only edge updates: devices keep an unmerged base and receive each new version as a coded adapter change.

`delta` (the update format: the coded change of an unmerged graph's adapter, and applying it) and `serving`
(an unmerged graph on ONNX Runtime: adapters per run, or merged on the device) run on devices and import no
torch; `export` (the unmerged graph from a peft model, checked against the merged one) runs where the model is
trained. docs/edge.md says why it works this way.
"""
