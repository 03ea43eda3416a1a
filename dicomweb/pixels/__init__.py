"""Pixel data: where frames lie in a Part 10 file (`layout`), the native encodings (`native`), decoding (`decode`),
encoding (`encode`), lossless storage compression (`compress`) and rendering for display (`render`)."""
