"""Update codecs: composable select -> quantize -> code stages with exact size accounts."""
