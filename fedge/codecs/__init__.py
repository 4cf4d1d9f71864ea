"""Update codecs: composable select -> quantize -> code stages with exact size accounts.

`build_codec(name, **params)` returns a codec; `codec.encode(update)` gives an
`Encoded` (payload bytes, tensor specs, per-section size account) and
`codec.decode(payload, specs)` the reconstructed update. `entropy_report`
sets each section's coded size beside its Shannon bound. One module per codec,
registered by `@register_codec`; shared stages live in `primitives/`.
"""

from fedge.codecs import blockquant, dense, fedzip, flasc, ternary  # noqa: F401  (register the built-in codecs)
from fedge.codecs.base import Codec, CodecError, Encoded, Section, TensorSpec, specs_of
from fedge.codecs.registry import CODECS, available_codecs, build_codec, known_codecs, register_codec
from fedge.codecs.report import entropy_report

__all__ = ["CODECS", "Codec", "CodecError", "Encoded", "Section", "TensorSpec", "available_codecs", "build_codec",
           "entropy_report", "known_codecs", "register_codec", "specs_of"]
