"""Update codecs: composable select -> quantize -> code stages with exact size accounts.

`build_codec(name, **params)` returns a codec; `codec.encode(update)` gives an
`Encoded` (payload bytes, tensor specs, per-section size account) and
`codec.decode(payload, specs)` the reconstructed update. `entropy_report`
sets each section's coded size beside its Shannon bound.
"""

from fedge.codecs.base import Codec, CodecError, Encoded, Section, TensorSpec, specs_of
from fedge.codecs.registry import available_codecs, build_codec, known_codecs
from fedge.codecs.report import entropy_report

__all__ = ["Codec", "CodecError", "Encoded", "Section", "TensorSpec", "available_codecs", "build_codec",
           "entropy_report", "known_codecs", "specs_of"]
