"""Building blocks the codecs share: top-k selection, 1-D k-means, position coding, entropy coding, payload framing."""
